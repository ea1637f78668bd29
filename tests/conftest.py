"""Shared fixtures: a small prepared corpus and run arguments for a small staged model."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# Tests share 2 cores with each other's subprocesses; one thread each keeps them honest.
os.environ.setdefault("OMP_NUM_THREADS", "1")

WORDS = (
    "the a of to and in is was for on that with as by at from his her it an be this which "
    "or are were had have not but they one all their been has more when who would will there "
    "time new year city river music church school war state world game film team house"
).split()


def synthetic_corpus(path: Path, documents: int = 240, seed: int = 0) -> Path:
    """A text file of blank-line-separated documents of pseudo-English."""
    rng = random.Random(seed)
    docs = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 160))) + "."
        for _ in range(documents)
    ]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    """A prepared dataset (seq_len 32) built once for the whole session."""
    from cached_mslt.config import run_args
    from cached_mslt.data.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("prepared")
    corpus = synthetic_corpus(root / "corpus.txt")
    args = run_args(
        "tiny",
        corpus=[str(corpus)],
        prepared_dir=str(root / "data"),
        seq_len=32,
        num_proc=1,
        valid_fraction=0.1,
        views=1,  # the tests' small runs; the tiny preset's views are tested on their own
    )
    return prepare_dataset(args)


def device_under_test():
    """Where tests that can run on CUDA run: CACHED_MSLT_TEST_DEVICE (scripts/gpu_check.sh
    sets `cuda`), else the CPU."""
    import torch

    return torch.device(os.environ.get("CACHED_MSLT_TEST_DEVICE", "cpu"))


def small_run(prepared: Path, run_dir: Path, **overrides):
    """RunArgs for a 2-stage (2 -> 4 layers) hidden-32 model that trains in seconds."""
    from cached_mslt.config import run_args

    options = dict(
        num_layers=4,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        prepared_dir=str(prepared),
        seq_len=32,
        run_dir=str(run_dir),
        stage_layers="2,4",
        stage_steps="6",
        batch_size=8,
        eval_every=3,
        log_every=1,
        checkpoint_every=2,
        cache="always",
        cache_dtype="float32",
        learning_rate=1e-3,
        warmup_fraction=0.0,
        # Each stage its own schedule, copied growth: what the tests' expectations were
        # written for (tests/test_schedule.py covers the tiny preset's run-wide schedule).
        lr_scope="stage",
        growth_init="copy",
        stage_order="same",
        views=1,
    )
    options.update(overrides)
    return run_args("tiny", **options)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 API on 127.0.0.1 and a free port, for the whole session; stopped after.

    Yields the storage options a client needs (dummy credentials: moto accepts any)."""
    pytest.importorskip("moto.server", reason="pip install -e '.[dev]' (moto[server])")
    pytest.importorskip("s3fs", reason="pip install -e '.[dev]' (s3fs)")
    from storage.loopback import loopback_s3

    with loopback_s3() as options:
        yield options


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket on the loopback S3 server: (name, storage options)."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") + "-b"
    fs = s3fs.S3FileSystem(**s3_server, skip_instance_cache=True)
    fs.mkdir(name)
    return name, dict(s3_server)


def replace_stage_model(run_dir: Path, index: int, model) -> None:
    """Save `model` as stage `index`'s and record it in its manifest, as if the stage had
    been retrained to these weights (a swap without the manifest is refused: issue 28)."""
    import json

    from cached_mslt.models import model_fingerprint
    from cached_mslt.rundir import RunLayout, write_atomic

    layout = RunLayout(run_dir)
    model.save_pretrained(layout.model_dir(index))
    manifest = layout.read_manifest(index)
    manifest["fingerprints"]["model"] = model_fingerprint(model)
    write_atomic(layout.manifest(index), json.dumps(manifest, indent=2))
