"""Downstream tasks: the shipped data reads as docs/evaluation.md counts it, splits are deterministic,
stratified and disjoint, bad task files fail with a clear error, and overlap is warned about."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from cached_mslt.evaluation.tasks import (
    SPLITS,
    TaskError,
    TaskOverlapWarning,
    _save,
    check_overlap,
    deduplicate,
    fetch_vader_sdist,
    load_task,
    prepare_task,
    read_bbc,
    read_sentiment,
    read_task_file,
)

# The sdist is cached in the repo's data dir so the download happens once, not per session.
DOWNLOADS = Path(__file__).resolve().parents[1] / "data" / "tasks" / "_downloads"


@pytest.fixture(scope="session")
def vader_downloads() -> Path:
    try:
        fetch_vader_sdist(DOWNLOADS)
    except TaskError as e:
        pytest.skip(f"package registry unreachable, cannot fetch the sentiment data: {e}")
    return DOWNLOADS


@pytest.fixture(scope="session")
def bbc(tmp_path_factory):
    return prepare_task("bbc", tmp_path_factory.mktemp("tasks"), verbose=False)


def test_sentiment_counts_match_data_md(vader_downloads):
    ex = read_sentiment(vader_downloads)
    # 10,605 rows minus the 37 scored exactly 0; no CRLF left in any text.
    assert len(ex.texts) == 10_568
    assert np.bincount(ex.labels).tolist() == [5_326, 5_242]
    assert ex.label_names == ["negative", "positive"]
    assert not any("\r" in t for t in ex.texts)
    kept, stats = deduplicate(ex)
    assert stats == {"read": 10_568, "duplicates_dropped": 2, "conflicting_dropped": 0}
    assert len(set(kept.texts)) == len(kept.texts) == 10_566


def test_bbc_counts_label_order_and_latin1_file():
    ex = read_bbc()
    assert ex.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert np.bincount(ex.labels).tolist() == [510, 386, 417, 511, 401]
    assert "£" in ex.texts[ex.ids.index("sports/199.txt")]  # latin-1, decoded, not dropped
    kept, stats = deduplicate(ex)
    assert stats["duplicates_dropped"] == 98 and len(kept.texts) == 2_127


def test_label_distribution_printed_and_stratified(tmp_path, capsys):
    task = prepare_task("bbc", tmp_path)
    printed = capsys.readouterr().out
    assert "98 duplicates" in printed and "2,127" in printed
    for name in task.label_names:
        assert name in printed
    dist = task.manifest["label_distribution"]
    assert {s: sum(d.values()) for s, d in dist.items()} == {
        "train": 1_701,
        "validation": 213,
        "test": 213,
    }
    for name, total in zip(task.label_names, [503, 369, 403, 505, 347]):
        assert sum(dist[s][name] for s in SPLITS) == total
        assert abs(dist["test"][name] - 0.1 * total) <= 1  # stratified: each class ~10% in test


def test_splits_are_deterministic_and_disjoint(bbc, tmp_path):
    again = prepare_task("bbc", tmp_path / "again", verbose=False)
    assert again.fingerprint == bbc.fingerprint
    ids = {s: bbc.splits[s]["id"] for s in SPLITS}
    assert ids == {s: again.splits[s]["id"] for s in SPLITS}
    texts = {s: set(bbc.splits[s]["text"]) for s in SPLITS}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not set(ids[a]) & set(ids[b])
        assert not texts[a] & texts[b]  # deduplicated before splitting
    other = prepare_task("bbc", tmp_path / "seed1", seed=1, verbose=False)
    assert other.fingerprint != bbc.fingerprint and other.splits["test"]["id"] != ids["test"]


def test_prepared_task_is_reused_when_fingerprint_matches(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"sample {i},{i % 2}\n" for i in range(40)))
    first = prepare_task(str(path), tmp_path, verbose=False)
    stamp = (first.path / "manifest.json").stat().st_mtime_ns
    assert prepare_task(str(path), tmp_path, verbose=False).fingerprint == first.fingerprint
    assert (first.path / "manifest.json").stat().st_mtime_ns == stamp
    path.write_text(path.read_text() + "one more,1\n")  # new data: new fingerprint, rebuilt
    assert prepare_task(str(path), tmp_path, verbose=False).fingerprint != first.fingerprint


def _prepare_at_once(barrier, path: str, task_dir: str, results) -> None:
    barrier.wait()
    results.put(prepare_task(path, task_dir, verbose=False).fingerprint)


def test_two_commands_preparing_one_task_at_once_both_get_it(tmp_path):
    """Two processes (two fine-tuning commands started side by side) prepare the same task
    at once: each writes its own scratch directory, neither fails, both read one task, and
    no scratch directory is left."""
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"sample {i},{i % 2}\n" for i in range(4000)))
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    writers = [
        context.Process(target=_prepare_at_once, args=(barrier, str(path), str(tmp_path), results))
        for _ in range(2)
    ]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=120)
    assert [w.exitcode for w in writers] == [0, 0]
    fingerprints = {results.get(timeout=5) for _ in writers}
    assert fingerprints == {prepare_task(str(path), tmp_path, verbose=False).fingerprint}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_task_placed_by_another_writer_is_kept_and_an_older_one_replaced(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\n" + "".join(f"sample {i},{i % 2}\n" for i in range(40)))
    first = prepare_task(str(path), tmp_path, verbose=False)
    stamp = (first.path / "manifest.json").stat().st_mtime_ns
    # A second writer that finishes the same task after the first placed it keeps the first's.
    _save(first.splits, first.manifest, first.path)
    assert (first.path / "manifest.json").stat().st_mtime_ns == stamp
    # Other data under the same name replaces it, and nothing of the old one stays behind.
    path.write_text(path.read_text() + "one more,1\n")
    second = prepare_task(str(path), tmp_path, verbose=False)
    assert second.fingerprint != first.fingerprint
    assert load_task(first.path).fingerprint == second.fingerprint
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_user_task_files_csv_and_jsonl(tmp_path):
    csv_file = tmp_path / "reviews.csv"
    csv_file.write_text('text,label\n"fine, really",10\nawful,2\nsame,2\nsame,2\n')
    ex = read_task_file(csv_file)
    assert ex.label_names == ["2", "10"]  # integer labels sort as numbers
    assert ex.labels == [1, 0, 0, 0] and ex.texts[0] == "fine, really"
    jsonl = tmp_path / "topics.jsonl"
    jsonl.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y", "extra": 1}\n')
    assert read_task_file(jsonl, label_names=["y", "x"]).labels == [1, 0]


def test_conflicting_duplicates_are_dropped(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nboth,a\nboth,b\nonce,a\ntwice,b\ntwice,b\n")
    kept, stats = deduplicate(read_task_file(path))
    assert kept.texts == ["once", "twice"]
    assert stats == {"read": 5, "duplicates_dropped": 2, "conflicting_dropped": 1}


@pytest.mark.parametrize(
    "name, content, label_names, expected",
    [
        ("nolabel.csv", "text,sentiment\ngood,pos\n", None, "missing column(s) ['label']"),
        ("unknown.csv", "text,label\ngood,pos\nbad,meh\n", ["pos", "neg"], "line 3: label 'meh'"),
        ("empty.csv", "", None, "missing column(s)"),
        ("header.csv", "text,label\n", None, "no examples"),
        ("blank.jsonl", "\n", None, "no examples"),
        ("notext.jsonl", '{"label": "a"}\n', None, "line 1: missing column(s)"),
        ("broken.jsonl", '{"text": "a", "label": 1}\n{"text": \n', None, "line 2: not valid JSON"),
        ("latin1.csv", b"text,label\n\xa3 5,a\n", None, "unreadable as UTF-8 CSV"),
        ("emptytext.csv", "text,label\n,a\nok,b\n", None, "line 2: empty text"),
        ("onelabel.csv", "text,label\nx,a\ny,a\n", None, "at least 2 labels"),
        ("task.tsv", "text\tlabel\n", None, "unknown task"),
    ],
)
def test_bad_task_file_raises_clear_error(tmp_path, name, content, label_names, expected):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TaskError) as err:
        prepare_task(str(path), tmp_path / "out", label_names=label_names, verbose=False)
    assert str(path) in str(err.value) and expected in str(err.value)


def test_missing_task_file_raises_clear_error(tmp_path):
    with pytest.raises(TaskError, match="does not exist"):
        read_task_file(tmp_path / "nope.jsonl")


def test_overlap_with_pretraining_corpus_warns(bbc):
    article = bbc.splits["test"]["text"][0]
    paragraph = max(article.split("\n"), key=len)  # a corpus may hold one paragraph only
    corpus = ["An unrelated encyclopedia article about rivers and their deltas.", paragraph]
    with pytest.warns(TaskOverlapWarning, match="1 of 2127 examples of task bbc"):
        counts = check_overlap(bbc, corpus)
    assert counts == {"train": 0, "validation": 0, "test": 1}


def test_no_overlap_no_warning(bbc, recwarn):
    assert (
        sum(check_overlap(bbc, ["The Brown corpus has five hundred samples of English."]).values())
        == 0
    )
    assert not [w for w in recwarn if issubclass(w.category, TaskOverlapWarning)]


def test_manifest_records_sizes_and_source(bbc):
    manifest = json.loads((bbc.path / "manifest.json").read_text())
    assert manifest["sizes"] == {"train": 1_701, "validation": 213, "test": 213}
    assert manifest["split"] == {"seed": 0, "valid_fraction": 0.1, "test_fraction": 0.1}
    assert manifest["source"].endswith("bbcnews/data") and len(manifest["fingerprint"]) == 64
