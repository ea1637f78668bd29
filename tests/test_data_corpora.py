"""Corpus readers: the bundled default and every user input format give plain documents."""

import json
import logging
import re
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from cached_mslt.data import corpora
from cached_mslt.data.corpora import DataError, load_corpus
from cached_mslt.data.tokenizer import load_tokenizer

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "heldout" / "sotu-2001-2021"
DOCS = ["First document.\nIt has two lines.", "Second document.", "Third, with ünïcode."]


@pytest.fixture(scope="module")
def default_corpus():
    return load_corpus(["default"])


def test_default_corpus_is_wikipedia_then_brown(default_corpus):
    sources = [(s["source"], s["documents"]) for s in default_corpus.sources]
    assert sources == [("wikipedia", 10033), ("brown", 500)]
    wiki, brown = default_corpus.documents[:10033], default_corpus.documents[10033:]
    assert 4.5e6 < sum(map(len, wiki)) < 5.3e6
    # Brown's word/tag pairs are untagged: no "/nn", "/at" ... left, quotes are plain.
    assert not any(re.search(r"\w/[a-z$*+-]+\b", doc) for doc in brown[:50])
    assert "``" not in brown[0] and "Fulton County Grand Jury" in brown[0]


def test_sotu_corpus_is_the_addresses_before_the_heldout_years():
    corpus = load_corpus(["sotu"])
    assert corpus.sources == [{"source": "sotu", "kind": "bundled", "documents": 212}]
    assert corpus.documents[0].startswith("Fellow-Citizens of the Senate and House")
    assert 1.6e6 < sum(len(d.split()) for d in corpus.documents) < 1.75e6
    # The held-out prose (data/heldout/sotu-2001-2021) shares no document with it.
    heldout = {" ".join(p.read_text().split()) for p in HELDOUT.glob("*.txt")}
    assert len(heldout) == 21 and not heldout & {" ".join(d.split()) for d in corpus.documents}


def test_sotu_corpus_refuses_an_address_of_the_heldout_years(tmp_path, monkeypatch):
    # A tarball that held a 2001 address would put held-out prose into training.
    (tmp_path / "sotu-1790-2000").mkdir()
    for name in ("1790_george_washington_n.txt", "2001_george_w_bush_r.txt"):
        (tmp_path / "sotu-1790-2000" / name).write_text("Fellow-Citizens.")
    with tarfile.open(tmp_path / "sotu.tgz", "w:gz") as tar:
        tar.add(tmp_path / "sotu-1790-2000", arcname="sotu-1790-2000")
    monkeypatch.setattr(corpora, "SOTU_TGZ", tmp_path / "sotu.tgz")
    with pytest.raises(DataError, match="2001_george_w_bush_r.txt.*held-out"):
        load_corpus(["sotu"])


def test_default_corpus_is_about_2_3m_tokens(default_corpus):
    # Tokenizing everything takes a while; estimate from a random 3% and the character count.
    tokenizer = load_tokenizer()
    docs = default_corpus.documents
    sample = np.random.default_rng(0).choice(len(docs), size=300, replace=False)
    texts = [docs[i] for i in sample]
    tokens_per_char = sum(map(len, tokenizer(texts, add_special_tokens=False)["input_ids"])) / sum(
        map(len, texts)
    )
    estimate = tokens_per_char * sum(map(len, docs))
    assert 2.0e6 < estimate < 2.6e6


def test_max_documents_stops_reading_early():
    corpus = load_corpus(["default"], max_documents=5)
    assert len(corpus.documents) == 5
    assert corpus.sources == [{"source": "wikipedia", "kind": "bundled", "documents": 5}]


def test_txt_documents_are_blank_line_separated_blocks(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(DOCS) + "\n\n\n")
    assert [d.strip() for d in load_corpus([str(tmp_path / "a.txt")]).documents] == DOCS


def test_every_input_format_gives_the_same_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS)) + "\n"
    )
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "a.parquet")
    Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "saved"))
    DatasetDict(
        {"a": Dataset.from_dict({"text": DOCS[:1]}), "b": Dataset.from_dict({"text": DOCS[1:]})}
    ).save_to_disk(str(tmp_path / "saved_dict"))
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "1.txt").write_text(DOCS[0])
    (folder / "sub" / "2.jsonl").write_text(json.dumps({"text": DOCS[1]}))
    pq.write_table(pa.table({"text": DOCS[2:]}), folder / "sub" / "3.parquet")
    for spec in ("a.jsonl", "a.parquet", "saved", "saved_dict", "folder"):
        assert load_corpus([str(tmp_path / spec)]).documents == DOCS, spec


def test_jsonl_reads_another_text_column(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "hello"}))
    assert load_corpus([str(tmp_path / "a.jsonl")], text_column="body").documents == ["hello"]


def test_undecodable_lines_are_skipped_with_a_count_and_a_warning(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes(b"good line\nbad \xff line\nanother good line\n")
    with caplog.at_level(logging.WARNING):
        corpus = load_corpus([str(tmp_path / "a.txt")])
    assert corpus.documents == ["good line\nanother good line\n"]
    assert corpus.undecodable_lines == 1
    assert "a.txt: skipped 1 lines that are not valid UTF-8" in caplog.text


def test_strict_names_the_file_and_byte_offset_of_undecodable_bytes(tmp_path):
    data = b'{"text": "ok"}\n{"text": "bad \xc3\x28"}\n'
    (tmp_path / "a.jsonl").write_bytes(data)
    offset = data.index(b"\xc3")
    with pytest.raises(DataError, match=rf"a\.jsonl: bytes at offset {offset} are not valid UTF-8"):
        load_corpus([str(tmp_path / "a.jsonl")], strict=True)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.csv", "text\nhello\n", "unsupported file type '.csv'"),
        ("a.jsonl", '{"body": "hello"}\n', r"a\.jsonl:1: no 'text' field \(found \['body'\]\)"),
        ("a.jsonl", "not json\n", r"a\.jsonl:1: not a JSON object"),
        ("empty_folder/", None, "holds no .txt/.jsonl/.parquet files"),
    ],
)
def test_bad_input_names_the_file_and_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_corpus([str(path)])


def test_missing_path_fails_before_reading_anything(tmp_path):
    with pytest.raises(DataError, match="nope.txt does not exist"):
        load_corpus(["default", str(tmp_path / "nope.txt")])


def test_parquet_without_the_text_column_is_refused(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"no column 'text' \(found \['body'\]\)"):
        load_corpus([str(tmp_path / "a.parquet")])


def test_files_stream_into_the_lines_a_whole_read_gives(tmp_path):
    # Read one line at a time, but broken exactly where bytes.splitlines breaks them.
    data = b"one\r\ntwo\rthree\n\nfour\r\r\nfive\n\n\nsix"
    (tmp_path / "a.txt").write_bytes(data)
    blocks, block = [], []
    for line in [*(raw.decode() for raw in data.splitlines(keepends=True)), ""]:
        if line.strip():
            block.append(line)
        elif block:
            blocks.append("".join(block))
            block = []
    assert load_corpus([str(tmp_path / "a.txt")]).documents == blocks
