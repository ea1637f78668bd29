"""Data-preparation benchmark: a large synthetic corpus, prepared under a memory limit.

The corpus is made on the fly from the bundled one (docs/quickstart.md) by recombining
its sentences into new documents, so it is as large as asked while its words, sentence
lengths and vocabulary stay those of real text; it is never committed. Each preparation
runs `pipelines/prepare_data.py` in a child process whose address space is capped with
RLIMIT_AS (every mapping counts, memory-mapped files included), and reports its wall
time, tokens per second and peak resident memory. Measures, never asserts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cached_mslt.data import load_corpus

ROOT = Path(__file__).resolve().parents[2]  # the checkout
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Runs in the child: cap the address space, run the script, record peak memory at exit
# (also when the script dies of MemoryError).
_CHILD = """
import atexit, json, resource, runpy, sys
out, limit, script, *argv = sys.argv[1:]
if int(limit):
    resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))
def record():
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    open(out, "w").write(json.dumps({"self_kib": own, "children_kib": kids}))
atexit.register(record)
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


def synthetic_corpus(path: Path, size_bytes: int, seed: int = 0) -> Path:
    """A .txt corpus of at least `size_bytes`: blank-line separated documents of 3 to 40
    sentences drawn at random from the bundled corpus."""
    sentences = [
        s
        for doc in load_corpus(["default"]).documents
        for s in _SENTENCE_END.split(" ".join(doc.split()))
        if len(s) > 20
    ]
    rng = np.random.default_rng(seed)
    written = 0
    with path.open("w", encoding="utf-8") as f:
        while written < size_bytes:
            sizes = rng.integers(3, 41, size=1000)
            picks = iter(rng.integers(0, len(sentences), size=int(sizes.sum())).tolist())
            block = "".join(
                " ".join(sentences[next(picks)] for _ in range(k)) + "\n\n" for k in sizes
            )
            written += f.write(block)
    return path


def measure_prepare(
    corpus: Path,
    out: Path,
    num_proc: int,
    limit_bytes: int = 0,
    repo: Path = ROOT,
    flags: tuple[str, ...] = ("--preset", "tiny"),
) -> dict[str, Any]:
    """Prepare `corpus` into `out` with `repo`'s pipelines/prepare_data.py in a child
    process (address space capped at `limit_bytes`; 0: no cap). One benchmark figure."""
    usage = out.with_name(out.name + ".rusage.json")
    command = [sys.executable, "-c", _CHILD, str(usage), str(limit_bytes)]
    command += [str(repo / "pipelines" / "prepare_data.py"), *flags, "--corpus", str(corpus)]
    command += ["--prepared_dir", str(out), "--num_proc", str(num_proc), "--overwrite"]
    env = {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    # cwd=repo: `python -c` puts the working directory first on sys.path.
    done = subprocess.run(command, capture_output=True, text=True, env={**_env(), **env}, cwd=repo)
    wall = time.perf_counter() - start
    peak = json.loads(usage.read_text()) if usage.exists() else {}
    figure: dict[str, Any] = {
        "name": "prepare_tokens_per_s",
        "unit": "tokens/s",
        "num_proc": num_proc,
        "corpus_bytes": corpus.stat().st_size,
        "rlimit_as_gib": round(limit_bytes / 2**30, 2) if limit_bytes else None,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(max(peak.values(), default=0) / 1024, 1),
        "completed": done.returncode == 0,
        "code": str(repo),
    }
    manifest = out / "manifest.json"
    if done.returncode == 0 and manifest.exists():
        splits = json.loads(manifest.read_text())["splits"]
        tokens = sum(s["tokens"] for s in splits.values())
        figure.update(value=round(tokens / wall), tokens=tokens)
    else:
        figure.update(value=None, error=done.stderr.strip().splitlines()[-3:])
    return figure


def _env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "HF_HOME", "HF_DATASETS_CACHE")
    return {k: os.environ[k] for k in keep if k in os.environ}


def data_benchmarks(
    scratch: str | None,
    size_bytes: int,
    procs: tuple[int, ...],
    limit_bytes: int,
    repo: Path = ROOT,
) -> list[dict[str, Any]]:
    """Make the corpus in a temporary folder under `scratch` (default: the system's),
    prepare it once per process count, and delete everything again."""
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)  # a named scratch folder may be new
    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=scratch))
    try:
        corpus = synthetic_corpus(work / "synthetic.txt", size_bytes)
        return [
            measure_prepare(corpus, work / f"prepared-{n}", n, limit_bytes, repo) for n in procs
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
