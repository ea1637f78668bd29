"""Documents on disk: read -> clean -> order by seeded hash -> deduplicate -> split, streamed.

Memory holds a bounded slice of the corpus at any time, never the corpus: documents flow
from the readers in batches into Arrow files (`read-*.arrow`, up to `shard_bytes` of text
each) beside their keys; the ordering is an external sort by hash partition.

- A document is cleaned by normalising its whitespace; empty documents are dropped.
- Its *position* is `blake2b("{split_seed}\\0{text}")` (8 bytes, as an unsigned integer):
  the split rule, and the order of the documents within a split (a deterministic shuffle,
  independent of input order, that mixes the sources).
- Duplicates have equal text, hence equal positions: after sorting by (position, 16-byte
  digest of the text) they are neighbours, and all but one are dropped. Which copy stays
  does not matter: they are the same text.
- The sort: positions are uniform, so the top bits of a position name its *bucket*; with
  2^k buckets of about `shard_bytes` of text each, sorting each bucket on its own and
  writing the buckets in order (`ordered-*.arrow`) sorts the whole corpus.
- The documents whose position is below `valid_fraction` (as a fraction of 2^64) are the
  validation split (at least one, and at least one training document remains): always
  the first `n_valid` documents in this order.

Before this module, documents were sorted by (position as a float, text). Positions that
are distinct integers but round to the same float64 (a chance of about n^2 / 2^54 for n
documents: none in the bundled corpus) are now ordered by their integer value; nothing
else in the order changed.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROW_BATCH = 1000  # documents per Arrow record batch and per tokenizer call
PIECE_DOCS = 4096  # at most this many documents per tokenization task ...
PIECE_BYTES = 16 << 20  # ... and at most this much text
SCHEMA = pa.schema(
    [("text", pa.string()), ("position", pa.uint64()), ("hi", pa.uint64()), ("lo", pa.uint64())]
)


@dataclass
class DocumentCounts:
    read: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    text_bytes: int = 0  # of the cleaned documents, duplicates included


@dataclass(frozen=True)
class Segment:
    """Documents `start:stop` of one ordered file."""

    path: str
    start: int
    stop: int


@dataclass
class OrderedDocuments:
    """The cleaned, deduplicated corpus in position order, as files of consecutive documents."""

    files: list[tuple[str, int]] = field(default_factory=list)  # (path, documents)
    n_valid: int = 0
    content: str = ""  # digest of every document's (position, digest), in order

    @property
    def total(self) -> int:
        return sum(n for _, n in self.files)

    def split_range(self, split: str) -> tuple[int, int]:
        return (0, self.n_valid) if split == "valid" else (self.n_valid, self.total)

    def documents(self, split: str) -> int:
        start, stop = self.split_range(split)
        return stop - start

    def segments(self, split: str) -> list[Segment]:
        """The split as pieces of at most PIECE_DOCS documents and about PIECE_BYTES of text."""
        lo, hi = self.split_range(split)
        pieces, offset = [], 0
        for path, n in self.files:
            start, stop = max(lo - offset, 0), min(hi - offset, n)
            if start < stop:
                lengths = _text_lengths(path)[start:stop]
                pieces += [Segment(path, start + a, start + b) for a, b in _cut(lengths)]
            offset += n
        return pieces

    def batches(self, split: str) -> Iterator[list[str]]:
        """The split's texts in order, ROW_BATCH at a time."""
        for segment in self.segments(split):
            texts = read_texts(segment)
            for i in range(0, len(texts), ROW_BATCH):
                yield texts[i : i + ROW_BATCH]


def _cut(lengths: np.ndarray) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of at most PIECE_DOCS documents and about PIECE_BYTES of text."""
    start, size = 0, 0
    for i, length in enumerate(lengths.tolist()):
        if i > start and (i - start >= PIECE_DOCS or size + length > PIECE_BYTES):
            yield start, i
            start, size = i, 0
        size += length
    if start < len(lengths):
        yield start, len(lengths)


def _open(path: str | Path) -> pa.Table:
    """The whole file, memory-mapped: only the columns touched are paged in."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _text_lengths(path: str) -> np.ndarray:
    return pc.binary_length(_open(path).column("text")).to_numpy()


def read_texts(segment: Segment) -> list[str]:
    table = _open(segment.path).slice(segment.start, segment.stop - segment.start)
    return table.column("text").to_pylist()


def clean(text: str) -> str:
    return " ".join(text.split())


def keyed(texts: Iterable[str], split_seed: int, counts: DocumentCounts) -> Iterator[dict]:
    """Cleaned, non-empty documents as record-batch columns: text, position, digest."""
    seed = f"{split_seed}\0".encode()
    batch: dict[str, list] = {name: [] for name in SCHEMA.names}
    for text in texts:
        counts.read += 1
        text = clean(text)
        if not text:
            counts.empty_dropped += 1
            continue
        raw = text.encode()
        counts.text_bytes += len(raw)
        position = hashlib.blake2b(seed + raw, digest_size=8).digest()
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        batch["text"].append(text)
        batch["position"].append(int.from_bytes(position, "big"))
        batch["hi"].append(int.from_bytes(digest[:8], "big"))
        batch["lo"].append(int.from_bytes(digest[8:], "big"))
        if len(batch["text"]) == ROW_BATCH:
            yield batch
            batch = {name: [] for name in SCHEMA.names}
    if batch["text"]:
        yield batch


def write_read_files(
    texts: Iterable[str], split_seed: int, work: Path, shard_bytes: int
) -> tuple[list[Path], DocumentCounts]:
    """Stream the documents into `read-*.arrow` files of about `shard_bytes` of text each."""
    counts, paths = DocumentCounts(), []
    writer, written = None, 0
    for batch in keyed(texts, split_seed, counts):
        if writer is None or written >= shard_bytes:
            if writer is not None:
                writer.close()
            paths.append(work / f"read-{len(paths):05d}.arrow")
            writer, written = pa.ipc.new_file(str(paths[-1]), SCHEMA), 0
        record = pa.record_batch(batch, schema=SCHEMA)
        writer.write_batch(record)
        written += record.column(0).nbytes
    if writer is not None:
        writer.close()
    return paths, counts


def order_documents(
    read_files: list[Path],
    counts: DocumentCounts,
    work: Path,
    shard_bytes: int,
    valid_fraction: float,
) -> OrderedDocuments:
    """Sort the read files by (position, digest) into `ordered-*.arrow`, one bucket at a
    time, dropping duplicates; count the validation documents."""
    bits = max(0, math.ceil(math.log2(max(counts.text_bytes, 1) / shard_bytes)))
    ordered, below, content = OrderedDocuments(), 0, hashlib.sha256()
    for bucket in range(2**bits):
        table = _bucket(read_files, bucket, bits)
        if table.num_rows == 0:
            continue
        position, hi, lo = (table.column(c).to_numpy() for c in ("position", "hi", "lo"))
        order = np.lexsort((lo, hi, position))
        position, hi, lo = position[order], hi[order], lo[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = (position[1:] != position[:-1]) | (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        counts.duplicates_dropped += int((~first).sum())
        kept = table.select(["text", "position"]).take(order[first])
        for column in (position, hi, lo):
            content.update(column[first].tobytes())
        # position / 2^64 as a float, exactly as before (it is below 1, so float64 rounding
        # of the integer then an exact division by 2^64 is the correctly rounded quotient).
        below += int((position[first].astype(np.float64) / 2.0**64 < valid_fraction).sum())
        path = work / f"ordered-{len(ordered.files):05d}.arrow"
        _write_table(kept, path)
        ordered.files.append((str(path), kept.num_rows))
    n = ordered.total
    ordered.n_valid = min(n - 1, max(1, below))
    ordered.content = content.hexdigest()
    return ordered


def _bucket(read_files: list[Path], bucket: int, bits: int) -> pa.Table:
    parts = []
    for path in read_files:
        table = _open(path)
        if bits:
            top = table.column("position").to_numpy() >> np.uint64(64 - bits)
            table = table.take(np.flatnonzero(top == bucket))
        parts.append(table.combine_chunks())
    return pa.concat_tables(parts).combine_chunks()


def _write_table(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with pa.ipc.new_file(str(tmp), table.schema) as writer:
        writer.write_table(table, max_chunksize=ROW_BATCH)
    os.replace(tmp, path)


def text_digest(ordered: OrderedDocuments, splits: Iterable[str], h: hashlib._Hash) -> None:
    """Feed every split's documents into `h`: a count, then each text length-prefixed (no
    ambiguous joins), streamed in order."""
    for split in splits:
        h.update(f"\0{split}\0{ordered.documents(split)}".encode())
        for batch in ordered.batches(split):
            for text in batch:
                raw = text.encode()
                h.update(len(raw).to_bytes(8, "little") + raw)
