"""`pipelines/inspect_cache.py` on a real small run and on damaged stores: bad stores are
reported as such, with their own non-zero exit code, never as a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForMaskedLM

from cached_mslt.inspect.probe import probe_run
from cached_mslt.stages.runner import run_all
from pipelines.inspect_cache import main
from storage import StoreSpec
from tests.conftest import small_run
from tests.inspect_support import write_store

REPO = Path(__file__).resolve().parents[1]
SPEC = StoreSpec(
    num_rows=36, seq_len=16, hidden_size=12, dtype="float32", rows_per_chunk=4, chunks_per_shard=2
)


@pytest.fixture(scope="module")
def run_dir(prepared_dir, tmp_path_factory) -> Path:
    """A 3-stage run (1 -> 2 -> 3 layers): stores for stages 2 and 3."""
    path = tmp_path_factory.mktemp("inspect") / "run"
    run_all(
        small_run(
            prepared_dir, path, stage_layers="1,2,3", num_layers=3, stage_steps="2", eval_every=2
        )
    )
    return path


def inspect(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out


def test_run_summary_shows_every_stage_store_valid(run_dir, capsys):
    code, out = inspect(capsys, run_dir)
    assert code == 0
    assert "stage-1 live" in out and out.count("[OK]") == 2
    assert "stage 2, 1 frozen layers" in out and "stage 3, 2 frozen layers" in out
    assert "hidden [" in out and "compression ratio" in out and "shards done" in out
    assert out.count("weights: matches: stage-") == 2 and out.count("data: matches") == 2


def test_json_stats_similarity_and_plots(run_dir, capsys, tmp_path):
    code, out = inspect(
        capsys, run_dir, "--json", "--stats", "--similarity", "--plots", tmp_path / "png"
    )
    report = json.loads(out)
    assert code == report["exit_code"] == 0
    assert set(report["stores"]) == {"stage-2", "stage-3"}
    assert report["stores"]["stage-2"]["validity"]["valid"] is True
    assert report["stats"]["stage-3"]["tokens"] > 0
    cka = report["similarity"]["cka"]
    assert cka[0][0] == cka[1][1] == 1.0 and 0 < cka[0][1] <= 1
    assert {Path(p).name for p in report["plots"]} >= {"norm_histogram.png", "similarity.png"}
    assert all(Path(p).stat().st_size > 1000 for p in report["plots"])


def test_store_row_text_and_nearest_rows(run_dir, capsys):
    code, out = inspect(capsys, run_dir / "cache/stage-2", "--show-row", 3, "--nearest", 3, "-k", 2)
    assert code == 0
    assert "row 3 (prepared example 3)" in out and "[[" in out
    assert "rows nearest to row 3" in out and out.count("cos ") == 2


def test_incomplete_store_is_reported_with_exit_code_3(tmp_path, capsys):
    write_store(tmp_path / "s", SPEC, shards=[0, 2], commit=False)
    code, out = inspect(capsys, tmp_path / "s", "--stats")
    assert code == 3
    assert "[INCOMPLETE]" in out and "2/5 shards written" in out
    assert "not analysed (incomplete)" in out and "compression ratio ?" in out


def test_store_missing_a_shard_file_is_reported_corrupt_with_exit_code_5(tmp_path, capsys):
    write_store(tmp_path / "s", SPEC)
    (tmp_path / "s/hidden/c/1/0/0").unlink()
    code, out = inspect(capsys, tmp_path / "s")
    assert code == 5
    assert "[CORRUPT]" in out and "hidden/c/1/0/0" in out and "missing or empty" in out


@pytest.mark.parametrize("action", ["--verify", "--stats"])
def test_flipped_byte_is_reported_corrupt_when_read(tmp_path, capsys, action):
    write_store(tmp_path / "s", SPEC)
    shard = tmp_path / "s/hidden/c/2/0/0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0x01
    shard.write_bytes(bytes(data))
    assert inspect(capsys, tmp_path / "s")[0] == 0  # files present: only reading can tell
    code, out = inspect(capsys, tmp_path / "s", action)
    assert code == 5
    assert "[CORRUPT]" in out and "crc32c" in out and "rows 16-20" in out


def test_store_of_changed_weights_is_reported_stale_with_exit_code_4(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    checkpoint = run / "stage-3/model"
    model = BertForMaskedLM.from_pretrained(checkpoint)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.bias += 1e-3  # a frozen layer changed
    model.save_pretrained(checkpoint)
    code, out = inspect(capsys, run)
    assert code == 4
    assert out.count("[OK]") == 1 and "stage-3: " in out and "[STALE]" in out
    assert "weights: differs: store has" in out and "rebuild" in out.lower()


def test_store_checked_against_other_prepared_data_is_stale(run_dir, tmp_path, capsys):
    manifest = json.loads((Path(run_dir) / "config.json").read_text())["data"]["prepared_dir"]
    other = tmp_path / "prepared"
    shutil.copytree(manifest, other)
    meta = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    code, out = inspect(capsys, run_dir / "cache/stage-2", "--show-row", 0, "--prepared", other)
    assert code == 4 and "[STALE]" in out and "row_index would point at other text" in out


def test_missing_store_exits_6(tmp_path, capsys):
    code, out = inspect(capsys, tmp_path / "nothing-here")
    assert code == 6 and "[MISSING]" in out


# slow (`make test-slow`): 6-9 s; the default suite took 10.7 minutes on a fresh clone (2026-12-03)
@pytest.mark.slow
def test_script_runs_as_a_program_and_reports_without_traceback(tmp_path):
    """Run as a program, as users do: statuses, not tracebacks, and JSON on stdout."""
    write_store(tmp_path / "s", SPEC, shards=[1], commit=False)
    proc = subprocess.run(
        [sys.executable, "pipelines/inspect_cache.py", str(tmp_path / "s"), "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["stores"]["s"]["status"] == "incomplete"


@pytest.fixture(scope="module")
def bbc_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tasks")


def test_probe_reports_every_stage_bottom_from_one_forward(run_dir, bbc_dir):
    results = probe_run(run_dir, task_dir=bbc_dir, max_examples=30)
    assert [(r.name, r.layers) for r in results] == [
        ("embeddings", 0),
        ("stage-2 bottom", 1),
        ("stage-3 bottom", 2),
        ("final model", 3),
    ]
    # frozen layers never change in MSLT: the final checkpoint serves every stage
    assert {r.source for r in results} == {str(run_dir / "stage-3/model")}
    assert all(0.0 <= r.valid_accuracy <= 1.0 and 0.0 <= r.test_accuracy <= 1.0 for r in results)


def test_stage_whose_bottom_differs_is_probed_from_its_own_checkpoint(run_dir, bbc_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    manifest = run / "stage-2/manifest.json"
    m = json.loads(manifest.read_text())
    m["fingerprints"]["frozen_bottom"] = "0" * 64  # as if stage 2 had frozen other weights
    manifest.write_text(json.dumps(m))
    results = {r.name: r for r in probe_run(run, task_dir=bbc_dir, max_examples=30)}
    assert results["stage-2 bottom"].source == str(run / "stage-2/model")
    assert results["stage-3 bottom"].source == str(run / "stage-3/model")


def test_probe_flag_prints_accuracy_per_stage(run_dir, bbc_dir, capsys):
    code, out = inspect(capsys, run_dir, "--probe", "--probe-examples", 20, "--task-dir", bbc_dir)
    assert code == 0
    assert "BBC topic probe" in out and "stage-3 bottom" in out and "majority-class" in out


def test_compare_pairs_the_store_with_another(run_dir, capsys):
    code, out = inspect(
        capsys, run_dir / "cache/stage-2", "--compare", run_dir / "cache/stage-3", "--json"
    )
    sim = json.loads(out)["similarity"]
    assert code == 0 and sim["labels"] == ["stage-2", "compare:stage-3"]
    assert sim["cka"][0][0] == 1.0 and 0 < sim["cka"][0][1] < 1
