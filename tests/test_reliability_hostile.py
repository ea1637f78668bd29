"""Fault tests of the second campaign (docs/reliability.md, issue 28): secrets never
written or printed, torn appends, corrupt checkpoints, swapped weights, edited configs,
printed fixes that work, hanging object stores, config files that do not parse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cached_mslt.rundir import RunLayout, RunLockedError
from cached_mslt.stages.runner import run_stage
from tests.conftest import small_run

REPO = Path(__file__).resolve().parents[1]
PLANTED_KEY = "AKIAPLANTEDKEY7Q3Z"
PLANTED_SECRET = "planted-secret-Zq9/xW+4"


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def files_holding(root: Path, needles: tuple[str, ...]) -> list[str]:
    """Every file under `root` whose bytes contain one of `needles`."""
    found = []
    for path in root.rglob("*"):
        if path.is_file() and any(n.encode() in path.read_bytes() for n in needles):
            found.append(str(path))
    return found


def hold_stage_lock(lock: Path, argv: list[str]) -> subprocess.Popen:
    """A real process that takes `lock` the way a stage does, with `argv` as its command
    line, then sleeps: a first command still training."""
    code = (
        "import sys, time; from pathlib import Path; from cached_mslt.rundir import acquire; "
        f"assert acquire(Path({str(lock)!r}), 'stage-1') is None; print('held', flush=True); "
        "time.sleep(120)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, text=True,
        env=subprocess_env(), cwd=REPO,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_secrets_are_never_written_or_printed(
    prepared_dir, tmp_path, s3_bucket, monkeypatch, capfd
):
    bucket, options = s3_bucket
    planted = json.dumps({**options, "key": PLANTED_KEY, "secret": PLANTED_SECRET})
    run = tmp_path / "run"
    args = small_run(
        prepared_dir, run, stage_steps="2", cache_url=f"s3://{bucket}/run",
        cache_storage_options=planted,
    )  # fmt: skip
    argv = ["pipelines/stage.py", "--stage", "1", "--cache_storage_options", planted]
    monkeypatch.setattr(sys, "argv", argv)
    lock = RunLayout.of(args).lock(1)
    first = hold_stage_lock(lock, argv[1:])
    try:
        with pytest.raises(RunLockedError) as refused:  # the second command, refused
            run_stage(args, 1)
        assert f"pid {first.pid}" in str(refused.value)
    finally:
        first.send_signal(signal.SIGKILL)  # the first command dies, its lock stays behind
        first.wait()
    assert lock.exists() and files_holding(lock.parent, (PLANTED_KEY, PLANTED_SECRET)) == []
    with pytest.warns(UserWarning, match="taking over"):
        run_stage(args, 1)
    run_stage(args, 2)
    printed = capfd.readouterr()
    needles = (PLANTED_KEY, PLANTED_SECRET)
    for text in (str(refused.value), printed.out, printed.err):
        assert not any(n in text for n in needles), text
    assert files_holding(run, needles) == []
    import s3fs

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    objects = [p for p in fs.find(bucket) if any(n.encode() in fs.cat(p) for n in needles)]
    assert objects == []


@pytest.mark.parametrize(
    "name, text, where",
    [
        ("run.json", '{\n  "stage_layers": "2,4",\n  "seq_len": 32,,\n}', ":3:17: not valid JSON"),
        ("run.json", '{"stage_layers": "2,4', ":1:18: not valid JSON"),
        ("run.yaml", "stage_layers: 2,4\nseq_len: [32\n", ":3:1: not valid YAML"),
        ("run.yaml", "a: 1\n b: 2\n", ":2:3: not valid YAML"),
    ],
)
def test_config_file_that_does_not_parse_is_one_line_naming_file_line_and_column(
    tmp_path, name, text, where
):
    from cached_mslt.config import ConfigError, parse_args

    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", str(path)])
    message = str(err.value)
    assert message.startswith(f"config file {path}{where}") and "\n" not in message, message


def test_torn_metrics_line_is_skipped_and_reported_and_every_stage_still_starts(
    prepared_dir, tmp_path
):
    from cached_mslt.training.metrics import read_metrics

    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2")
    run_stage(args, 1)
    metrics = RunLayout.of(args).metrics
    with metrics.open("a") as f:  # a killed writer's half line, no newline
        f.write('{"stage": "stage-1", "step": 3, "train_lo')
    with pytest.warns(UserWarning, match=rf"{metrics}:\d+: skipped a torn line"):
        assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    with pytest.warns(UserWarning, match="skipped a torn line"):
        run_stage(args, 2)  # resuming rewrites the file without the torn line
    records = read_metrics(tmp_path / "run")
    assert [(r["stage"], r["step"]) for r in records] == [
        ("stage-1", 1), ("stage-1", 2), ("stage-2", 3), ("stage-2", 4),
    ]  # fmt: skip


def test_an_append_cut_short_by_a_full_disk_names_the_file_and_is_taken_back(tmp_path, monkeypatch):
    import errno

    from cached_mslt.rundir import DiskFullError
    from cached_mslt.training.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter(tmp_path)
    writer.log({"stage": "stage-1", "step": 1})
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFullError, match=rf"appending a line to {writer.path} .*MiB free"):
        writer.log({"stage": "stage-1", "step": 2, "train_loss": 6.5})
    monkeypatch.undo()
    assert writer.path.read_text() == '{"stage": "stage-1", "step": 1}\n'
    writer.log({"stage": "stage-1", "step": 2})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def _flip_last_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-9] ^= 0x10
    path.write_bytes(bytes(data))


CHECKPOINT_DAMAGE = {
    "flip optimizer.bin": ("optimizer.bin", _flip_last_bytes, "does not match its SHA-256"),
    "flip model.safetensors": ("model.safetensors", _flip_last_bytes, "does not match"),
    "truncate optimizer.bin": (
        "optimizer.bin",
        lambda p: p.write_bytes(p.read_bytes()[:100]),
        "is 100 bytes, expected",
    ),
}


def _trained_parameters(args) -> dict:
    from safetensors.torch import load_file

    return load_file(RunLayout.of(args).model_dir(1) / "model.safetensors")


@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
def test_corrupt_checkpoint_is_reported_and_never_resumed(
    prepared_dir, tmp_path, monkeypatch, damage
):
    import torch

    from cached_mslt.training import trainer
    from cached_mslt.training.metrics import read_metrics

    reference = small_run(prepared_dir, tmp_path / "reference", stage_steps="6")
    run_stage(reference, 1)
    args = small_run(prepared_dir, tmp_path / "run", stage_steps="6")
    real = trainer._phase_inputs

    def crash_at_step_5(model, phase, batch, *rest, calls=[0]):  # noqa: B006 - a counter
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(model, phase, batch, *rest)

    monkeypatch.setattr(trainer, "_phase_inputs", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_stage(args, 1)
    monkeypatch.undo()
    checkpoint = RunLayout.of(args).checkpoint_dir(1)
    name, harm, said = CHECKPOINT_DAMAGE[damage]
    harm(checkpoint / name)
    with pytest.warns(UserWarning, match=rf"checkpoint {checkpoint} is corrupt: {name} {said}"):
        run_stage(args, 1)
    # Restarted from the phase's beginning: what an uninterrupted run trains, bit for bit.
    done, expected = _trained_parameters(args), _trained_parameters(reference)
    assert all(torch.equal(done[k], expected[k]) for k in expected)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    assert (checkpoint.parent / "checkpoint.corrupt" / name).exists()


def test_an_undamaged_checkpoint_resumes(prepared_dir, tmp_path, monkeypatch):
    from cached_mslt.training import checkpointing, trainer

    args = small_run(prepared_dir, tmp_path / "run", stage_steps="6")
    real = trainer._phase_inputs

    def crash_at_step_5(model, phase, batch, *rest, calls=[0]):  # noqa: B006 - a counter
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(model, phase, batch, *rest)

    monkeypatch.setattr(trainer, "_phase_inputs", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_stage(args, 1)
    monkeypatch.undo()
    assert checkpointing.checkpoint_problem(RunLayout.of(args).checkpoint_dir(1)) is None
    steps = []
    monkeypatch.setattr(trainer, "_phase_inputs", lambda *a: steps.append(1) or real(*a))
    run_stage(args, 1)
    assert len(steps) == 2  # steps 5 and 6 only: resumed at step 4


def run_printed_fix(command: str) -> subprocess.CompletedProcess:
    """A printed fix, run exactly as printed through a shell (python in place of
    `accelerate launch`: one process, same script and flags)."""
    shell = command.replace("accelerate launch", f"{sys.executable}")
    return subprocess.run(
        shell, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600,
        env=subprocess_env(),
    )  # fmt: skip


# slow (`make test-slow`): 7-17 s; the default suite is kept under 10 minutes (2026-12-03)
@pytest.mark.slow
def test_weights_swapped_under_a_finished_stage_are_refused_and_the_fix_works(
    prepared_dir, tmp_path
):
    from cached_mslt.stages.runner import StageError

    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2")
    other = small_run(prepared_dir, tmp_path / "other", stage_steps="2", seed=7)
    first, _ = run_stage(args, 1), run_stage(other, 1)
    assert first["fingerprints"]["model"] != first["fingerprints"]["frozen_bottom"]
    weights = RunLayout.of(args).model_dir(1) / "model.safetensors"
    weights.write_bytes((RunLayout.of(other).model_dir(1) / "model.safetensors").read_bytes())
    with pytest.raises(StageError, match=rf"{weights}: these are not the weights stage 1 saved"):
        run_stage(args, 2)
    command = str(pytest.raises(StageError, run_stage, args, 2).value).rsplit("`", 2)[1]
    assert command.startswith("rm -rf ") and command.endswith("--stage 1")
    done = run_printed_fix(command)
    assert done.returncode == 0, done.stderr[-2000:]
    assert run_stage(args, 2)["stage"]["index"] == 2


@pytest.mark.parametrize(
    "group, key, value",
    [
        ("schedule", "stage_layers", "1,4"),
        ("data", "train_examples", 40),
        ("model", "hidden_size", 64),
        ("schedule", "growth_init", "fresh"),
    ],
)
def test_an_edited_config_json_is_refused_unless_overridden(
    prepared_dir, tmp_path, group, key, value
):
    from cached_mslt.config import parse_args
    from cached_mslt.stages.runner import StageError

    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2")
    run_stage(args, 1)
    layout = RunLayout.of(args)
    config = json.loads(layout.config.read_text())
    config[group][key] = value
    layout.config.write_text(json.dumps(config))
    edited, _ = parse_args(["--config", str(layout.config)])
    with pytest.raises(StageError, match=rf"(?s){group}.{key}: run has .*--override_run_config"):
        run_stage(edited, 2)
    assert layout.manifest(1).exists() and not layout.model_dir(2).exists()
    flags, _ = parse_args(["--config", str(layout.config), "--override_run_config"])
    assert flags.train.override_run_config
    try:  # accepted by the contract; the stage itself may still find the change unusable
        run_stage(flags, 2)
    except StageError as e:
        assert "does not match the run" not in str(e)
    assert json.loads(layout.identity.read_text())[f"{group}.{key}"] == value
    assert json.loads(layout.config.read_text())["train"]["override_run_config"] is False


@pytest.fixture
def silent_endpoint():
    """A loopback TCP endpoint that accepts connections and never answers."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept_forever():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


# slow (`make test-slow`): 6-9 s; the default suite took 10.7 minutes on a fresh clone (2026-12-03)
@pytest.mark.slow
def test_a_hanging_object_store_fails_within_the_timeouts_naming_the_endpoint(silent_endpoint):
    pytest.importorskip("s3fs")
    import time

    from cached_mslt.config import run_args
    from storage import StoreUnreachableError, check_reachable

    options = {"endpoint_url": silent_endpoint, "key": "k", "secret": "s"}
    args = run_args(
        "tiny", cache_url="s3://bucket/run", cache_storage_options=json.dumps(options),
        cache_read_timeout_s=1.0,
    )  # fmt: skip
    assert args.schedule.storage_options()["config_kwargs"]["read_timeout"] == 1.0
    start = time.monotonic()
    with pytest.raises(StoreUnreachableError, match=rf"endpoint {silent_endpoint}.*timeout"):
        check_reachable("s3://bucket/run/stage-1", args.schedule.storage_options())
    assert time.monotonic() - start < 10  # two 1-second reads and their backoff


def test_timeouts_the_user_sets_for_botocore_win():
    from storage import with_timeouts

    mine = {"config_kwargs": {"read_timeout": 300}}
    out = with_timeouts("s3://b/x", mine, connect_s=5, read_s=20)["config_kwargs"]
    assert out == {"connect_timeout": 5, "read_timeout": 300, "retries": {"max_attempts": 2}}
    assert with_timeouts("/local/path", mine, connect_s=5, read_s=20) == mine


# slow (`make test-slow`): 7-17 s; the default suite is kept under 10 minutes (2026-12-03)
@pytest.mark.slow
def test_divergence_fix_as_printed_reaches_a_finite_loss(prepared_dir, tmp_path):
    from cached_mslt.stages.runner import StageError

    args = small_run(
        prepared_dir, tmp_path / "run", stage_steps="6", learning_rate=1e5, nonfinite_patience=2
    )
    with pytest.raises(StageError, match="diverged") as err:
        run_stage(args, 1)
    command = str(err.value).rsplit("fix: ", 1)[1]
    assert "--learning_rate 0.001" in command  # straight back into the usual range, not 10000
    done = run_printed_fix(command)
    assert done.returncode == 0, done.stderr[-2000:]
    assert RunLayout.of(args).manifest(1).exists()


def test_divergence_at_a_tiny_rate_says_to_stop_not_to_lower_again():
    from cached_mslt.stages.fixes import lower_learning_rate

    assert lower_learning_rate(1e5) == 1e-3 and lower_learning_rate(1e-3) == 1e-4
    assert lower_learning_rate(2e-6) == 1e-6 and lower_learning_rate(1e-6) is None


def test_store_repair_hint_on_an_object_store_names_the_credentials():
    from cached_mslt.config import run_args
    from cached_mslt.stages.fixes import repair_command

    secret = json.dumps({"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"})
    with_secret = run_args("tiny", cache_url="s3://b/run", cache_storage_options=secret)
    hint = repair_command(with_secret, 2)
    assert "--rebuild_cache --cache_storage_options" in hint and "AWS_SECRET_ACCESS_KEY" in hint
    assert '"s"' not in hint and '"k"' not in hint
    from_env = run_args("tiny", cache_url="s3://b/run")
    assert "AWS_* environment" in repair_command(from_env, 2)
    assert repair_command(run_args("tiny"), 2).endswith("--stage 2 --rebuild_cache")


# slow (`make test-slow`): 7-17 s; the default suite is kept under 10 minutes (2026-12-03)
@pytest.mark.slow
def test_inspect_hint_for_a_half_built_store_of_a_finished_stage_works(prepared_dir, tmp_path):
    from cached_mslt.inspect.summary import summarize_store
    from storage import ActivationStore

    args = small_run(prepared_dir, tmp_path / "run", stage_steps="2")
    run_stage(args, 1)
    run_stage(args, 2)
    url = RunLayout.of(args).store_url(2)
    root = Path(url) / "zarr.json"  # the build stopped before its commit
    meta = json.loads(root.read_text())
    meta["attributes"]["complete"] = False
    root.write_text(json.dumps(meta))
    summary = summarize_store(url)
    assert summary.status == "incomplete"
    command = summary.problem.rsplit("rebuild it: ", 1)[1]
    assert command.endswith("--stage 2 --rebuild_cache")
    done = run_printed_fix(command)
    assert done.returncode == 0, done.stderr[-2000:]
    assert summarize_store(url).status == "ok" and ActivationStore.open(url).is_complete
