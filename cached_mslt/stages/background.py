"""Overlapping a cache build's reading and writing with its forward passes.

The forward runs in the main thread on torch's intra-op threads; reading the source store
ahead and writing finished shards happen on one background thread each, behind a bounded
queue (so at most a few batches or shards wait in RAM). Zarr's codecs, checksums and file
I/O release the GIL, so the threads run while the forward does.

Errors cross back: a failed read is raised where the main thread takes the next batch, a
failed write at the next `put` or at `close`. The build's invariants do not move: a
shard's marker is still set after its arrays (inside `write_shard`), and the store is
committed only after `close()` has joined the writer.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

_END = object()


def read_ahead(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """`items`, produced on a background thread up to `depth` ahead of the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any, error: BaseException | None = None) -> bool:
        """Wait for room; False once the consumer has gone."""
        while not stop.is_set():
            try:
                q.put((item, error), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            put(_END, e)

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()  # the consumer stopped early (or failed): let the producer end
        thread.join()


class ShardWriter:
    """Writes (shard, rows) with `store.write_shard` on a background thread, one shard at a
    time, at most `depth` shards queued."""

    def __init__(self, store, depth: int = 1):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not _END:
            if self.error is None:  # after a failure, drain without writing
                try:
                    self.store.write_shard(item[0], **item[1])
                except BaseException as e:
                    self.error = e

    def put(self, shard: int, rows: dict) -> None:
        self._raise()
        self.queue.put((shard, rows))

    def close(self, raise_error: bool = True) -> None:
        """Wait until every queued shard is written (or dropped after a failure)."""
        if self.thread.is_alive():
            self.queue.put(_END)
            self.thread.join()
        if raise_error:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
