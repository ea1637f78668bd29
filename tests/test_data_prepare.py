"""prepare_dataset: packing, splitting, fingerprints, reuse and clean failure."""

import hashlib
import json
import logging
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

from cached_mslt.config import run_args
from cached_mslt.data.corpora import DataError
from cached_mslt.data.masking import IGNORE_INDEX
from cached_mslt.data.prepare import load_prepared, prepare_dataset
from cached_mslt.data.tokenizer import TokenizerError, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 32
CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def doc_words(tokenizer) -> list[str]:
    """Whole words that are one token each: document k is word k repeated, so every token
    of a packed sequence says which document it came from."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    words = [w for w, i in vocab if i >= 2000 and w.isascii() and w.isalpha() and len(w) > 3]
    return words[:60]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, doc_words) -> tuple[Path, list[str]]:
    rng = np.random.default_rng(0)
    texts = [" ".join([w] * int(rng.integers(5, 90))) for w in doc_words]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path, texts


def split_documents(texts: list[str], valid_fraction: float, split_seed: int) -> dict:
    """The split rule, as the list-based pipeline applied it before it streamed: documents
    ordered by a seeded hash of their text, those hashing below `valid_fraction` validate."""

    def position(text: str) -> float:
        digest = hashlib.blake2b(f"{split_seed}\0{text}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    ranked = sorted((position(t), t) for t in texts)
    n_valid = min(len(texts) - 1, max(1, sum(p < valid_fraction for p, _ in ranked)))
    return {"train": [t for _, t in ranked[n_valid:]], "valid": [t for _, t in ranked[:n_valid]]}


def args_for(corpus_path, prepared_dir, **overrides):
    settings = dict(
        corpus=[str(corpus_path)],
        tokenizer="bundled",
        seq_len=SEQ_LEN,
        valid_fraction=0.25,
        views=2,
        num_proc=1,
    )
    return run_args("tiny", prepared_dir=str(prepared_dir), **{**settings, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_dataset(args_for(corpus[0], out))
    return load_prepared(out)


def unmasked(split) -> np.ndarray:
    rows = split[:]
    ids, labels = rows["input_ids"].numpy(), rows["labels"].numpy()
    return np.where(labels != IGNORE_INDEX, labels, ids)


def test_packing_loses_no_tokens_and_never_crosses_the_split(
    prepared, corpus, tokenizer, doc_words
):
    texts = corpus[1]
    doc_of_token = {tokenizer.convert_tokens_to_ids(w): k for k, w in enumerate(doc_words)}
    splits = split_documents(texts, valid_fraction=0.25, split_seed=0)
    docs_in = {name: {texts.index(t) for t in docs} for name, docs in splits.items()}
    for name, split in (("train", prepared.train), ("valid", prepared.valid)):
        counts = prepared.manifest["splits"][name]
        rows = unmasked(split)[: counts["sequences"]]  # view 0
        assert (rows[:, 0] == CLS).all() and (rows[:, -1] == SEP).all()
        # The packed bodies are exactly the split's token stream, each document closed by
        # [SEP], minus only the documented remainder at the end.
        stream = [
            t
            for d in splits[name]
            for t in (*tokenizer(d, add_special_tokens=False)["input_ids"], SEP)
        ]
        body = rows[:, 1:-1].ravel()
        assert len(stream) - len(body) == counts["remainder_tokens"] < SEQ_LEN - 2
        np.testing.assert_array_equal(body, stream[: len(body)])
        docs_seen = {doc_of_token[t] for t in body if t != SEP}
        assert docs_seen <= docs_in[name]  # no token of the other split's documents
        # Only the split's last document can vanish whole into the remainder.
        assert docs_in[name] - docs_seen <= {texts.index(splits[name][-1])}
    assert not docs_in["train"] & docs_in["valid"]


def test_views_are_the_same_sequences_masked_differently(prepared):
    n = prepared.manifest["splits"]["train"]["sequences"]
    train = prepared.train[:]
    assert len(prepared.train) == 2 * n == prepared.manifest["splits"]["train"]["examples"]
    assert train["view"].tolist() == [0] * n + [1] * n
    assert train["sequence"].tolist() == list(range(n)) * 2
    tokens = unmasked(prepared.train)
    np.testing.assert_array_equal(tokens[:n], tokens[n:])
    labels = train["labels"].numpy()
    assert ((labels[:n] != IGNORE_INDEX) != (labels[n:] != IGNORE_INDEX)).any(axis=1).all()


def test_validation_keeps_one_view_whatever_the_training_views(prepared):
    # Validation measures: one mask per sequence keeps its loss and unigram reference the
    # same for every --views (docs/levers.md, growth that pays).
    valid = prepared.manifest["splits"]["valid"]
    assert len(prepared.valid) == valid["examples"] == valid["sequences"]
    assert set(prepared.valid[:]["view"].tolist()) == {0}


def test_load_prepared_gives_torch_columns_and_a_manifest(prepared):
    row = prepared.train[:4]
    assert set(row) == {"input_ids", "labels", "attention_mask", "sequence", "view"}
    for name in ("input_ids", "labels", "attention_mask"):
        assert row[name].shape == (4, SEQ_LEN) and str(row[name].dtype) == "torch.int64"
    assert (row["attention_mask"] == 1).all()
    m = prepared.manifest
    assert m["documents"] == {
        "read": 60,
        "empty_dropped": 0,
        "duplicates_dropped": 0,
        "undecodable_lines_skipped": 0,
        "kept": 60,
    }
    assert m["seq_len"] == SEQ_LEN and m["views"] == 2
    assert m["vocab_size"] == 30522 and m["special_token_ids"]["mask"] == 103


def test_prepare_twice_gives_the_same_fingerprint_and_identical_data(
    prepared, corpus, tmp_path, caplog
):
    again = tmp_path / "again"
    prepare_dataset(args_for(corpus[0], again, num_proc=2))  # num_proc must not matter
    second = load_prepared(again)
    assert second.manifest["fingerprint"] == prepared.manifest["fingerprint"]
    for split in ("train", "valid"):
        ours, theirs = getattr(prepared, split)[:], getattr(second, split)[:]
        for name in ours:
            assert (ours[name] == theirs[name]).all(), (split, name)
    with caplog.at_level(logging.INFO):
        prepare_dataset(args_for(corpus[0], again))
    assert "reusing" in caplog.text
    assert load_prepared(again).manifest["created"] == second.manifest["created"]


def test_changed_text_or_mask_seed_changes_the_fingerprint(prepared, corpus, tmp_path):
    path, texts = corpus
    edited = tmp_path / "edited.jsonl"
    edited.write_text(path.read_text().replace(texts[3], texts[3] + " extra", 1))
    changed_text = prepare_dataset(args_for(edited, tmp_path / "a"))
    changed_seed = prepare_dataset(args_for(path, tmp_path / "b", mask_seed=7))
    fingerprints = {load_prepared(p).manifest["fingerprint"] for p in (changed_text, changed_seed)}
    assert len(fingerprints | {prepared.manifest["fingerprint"]}) == 3


def test_other_data_in_the_target_is_refused_unless_overwrite(prepared, corpus, tmp_path):
    target = tmp_path / "data"
    prepare_dataset(args_for(corpus[0], target))
    with pytest.raises(DataError, match="already holds a different prepared dataset.*--overwrite"):
        prepare_dataset(args_for(corpus[0], target, mask_seed=7))
    prepare_dataset(args_for(corpus[0], target, mask_seed=7), overwrite=True)
    assert load_prepared(target).manifest["mask_seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def bad_input(tmp_path: Path, kind: str) -> tuple[dict, type, str]:
    """(run_args overrides, error type, message pattern) for one kind of bad input."""
    if kind == "missing path":
        return {"corpus": [str(tmp_path / "nope.txt")]}, DataError, "nope.txt does not exist"
    if kind == "empty corpus":
        (tmp_path / "blank.txt").write_text("\n  \n\t\n")
        return {"corpus": [str(tmp_path / "blank.txt")]}, DataError, "no text left after cleaning"
    if kind == "undecodable, strict":
        (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")
        return (
            {"corpus": [str(tmp_path / "bad.txt")], "strict": True},
            DataError,
            "bad.txt: bytes at offset 5 are not valid UTF-8",
        )
    if kind == "unsupported type":
        (tmp_path / "a.csv").write_text("text\nhello\n")
        return {"corpus": [str(tmp_path / "a.csv")]}, DataError, "unsupported file type '.csv'"
    if kind == "jsonl without text":
        (tmp_path / "a.jsonl").write_text('{"body": "hello"}\n')
        return {"corpus": [str(tmp_path / "a.jsonl")]}, DataError, "a.jsonl:1: no 'text' field"
    if kind == "vocab mismatch":
        return {"vocab_size": 30000}, TokenizerError, "expects vocab_size=30000"
    # Fails mid-build, after the train split is written: the staging dir must go too.
    long, short = "a long document " * 50, "short one"
    (tmp_path / "short.txt").write_text(f"{long}\n\n{short}\n")
    seed = next(
        s for s in range(100) if split_documents([long, short], 0.01, s)["valid"] == [short]
    )
    return (
        {"corpus": [str(tmp_path / "short.txt")], "valid_fraction": 0.01, "split_seed": seed},
        DataError,
        "the valid split has 2 tokens, less than one sequence",
    )


@pytest.mark.parametrize(
    "kind",
    [
        "missing path",
        "empty corpus",
        "undecodable, strict",
        "unsupported type",
        "jsonl without text",
        "vocab mismatch",
        "valid split too small",
    ],
)
def test_bad_input_gives_its_error_and_leaves_nothing_behind(tmp_path, corpus, kind):
    (tmp_path / "in").mkdir()
    overrides, error, message = bad_input(tmp_path / "in", kind)
    out = tmp_path / "out"
    with pytest.raises(error, match=message):
        prepare_dataset(args_for(corpus[0], out / "data", **overrides))
    assert not out.exists() or list(out.iterdir()) == []


def test_load_prepared_refuses_an_incomplete_directory(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="not a complete prepared dataset"):
        load_prepared(tmp_path)


def test_default_corpus_prepares(tmp_path):
    # The bundled corpus end to end, on its first documents only (the full run is the pipeline's).
    args = run_args(
        "tiny",
        max_documents=150,
        prepared_dir=str(tmp_path / "data"),
        num_proc=1,
        valid_fraction=0.1,
    )
    manifest = load_prepared(prepare_dataset(args)).manifest
    assert manifest["sources"] == [{"source": "wikipedia", "kind": "bundled", "documents": 150}]
    assert manifest["splits"]["train"]["tokens"] > 10_000
    assert manifest["splits"]["valid"]["sequences"] >= 1


def run_pipeline(monkeypatch, *flags: str) -> None:
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", *flags])
    runpy.run_path(str(ROOT / "pipelines" / "prepare_data.py"), run_name="__main__")


def test_pipeline_script_prepares_user_files(tmp_path, corpus, monkeypatch, capsys):
    out = tmp_path / "data"
    flags = ["--seq_len", str(SEQ_LEN), "--prepared_dir", str(out), "--num_proc", "1"]
    flags += ["--tokenizer", "bundled"]
    # A file and the folder holding it: every document comes twice.
    run_pipeline(
        monkeypatch, "--preset", "tiny", "--corpus", str(corpus[0]), str(corpus[0].parent), *flags
    )
    printed = capsys.readouterr().out
    assert f"prepared data: {out}" in printed and "tokens" in printed
    assert load_prepared(out).manifest["documents"]["duplicates_dropped"] == 60
    # A user error is a one-line message and a non-zero exit, not a traceback.
    with pytest.raises(SystemExit, match="error: .* already holds a different prepared dataset"):
        run_pipeline(monkeypatch, "--corpus", str(corpus[0]), "--mask_seed", "1", *flags)


def test_unigram_loss_is_the_cross_entropy_of_training_frequencies_on_valid_targets():
    from datasets import Dataset

    from cached_mslt.data.prepare import unigram_loss

    # Train holds tokens 5,5,5,6 in view 0 (one of them masked: its label carries it) and a
    # second view that must not be counted twice; validation asks for tokens 5 and 6.
    train = Dataset.from_dict(
        {
            "input_ids": [[2, 5, 4, 5, 6, 3], [2, 4, 4, 4, 4, 3]],
            "labels": [[-100, -100, 5, -100, -100, -100], [-100, 5, 5, 5, 6, -100]],
            "view": [0, 1],
        }
    )
    valid = Dataset.from_dict({"labels": [[-100, 5, -100, 6]], "view": [0]})
    vocab = 10  # add-one smoothing over every id; the 5 special ids get no counts of their own
    p5, p6 = (3 + 1) / (4 + vocab), (1 + 1) / (4 + vocab)
    expected = -(np.log(p5) + np.log(p6)) / 2
    assert unigram_loss(train, valid, vocab, [0, 1, 2, 3, 4]) == pytest.approx(expected)


def test_trained_vocabulary_is_saved_with_the_data_and_changes_its_fingerprint(tmp_path):
    from tests.conftest import synthetic_corpus

    corpus = synthetic_corpus(tmp_path / "corpus.txt", documents=80)
    prepared = {}
    for size in (120, 150):
        out = tmp_path / f"v{size}"
        prepare_dataset(
            run_args(
                "tiny",
                corpus=[str(corpus)],
                tokenizer="train",
                vocab_size=size,
                prepared_dir=str(out),
                seq_len=SEQ_LEN,
                num_proc=1,
                valid_fraction=0.1,
            )
        )
        prepared[size] = load_prepared(out)
    small, large = prepared[120], prepared[150]
    assert small.manifest["fingerprint"] != large.manifest["fingerprint"]
    assert (small.manifest["vocab_size"], large.manifest["vocab_size"]) == (120, 150)
    assert len(small.tokenizer()) == 120 and small.manifest["tokenizer"] == "train"
    # The saved tokenizer is the one the ids came from: decoding a row gives corpus words.
    words = small.tokenizer().decode(small.train[0]["labels"][small.train[0]["labels"] >= 0])
    assert words and all(w.isalpha() for w in words.replace("#", "").split())
    for p in (small, large):
        assert 0 < p.manifest["unigram_loss"] < np.log(p.manifest["vocab_size"])
