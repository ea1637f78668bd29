"""Subprocess helper for the store tests: a build step in its own process.

    store_writer.py URL --spec JSON [--create] [--rank R --world W] [--delay S]
                        [--hold S] [--fsize-limit BYTES] [--commit]

Prints one JSON line: {"ok": true, "written": [...]} or {"ok": false, "error": type, "message": ...}.
Run with PYTHONPATH at the repository root.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from storage import ActivationStore, StoreError, StoreSpec
from storage.synthetic import synthetic_rows

FINGERPRINT = {"weights": "w0", "data": "d0"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--spec", required=True, help="StoreSpec fields as JSON")
    p.add_argument(
        "--create", action="store_true", help="create (take the lock) instead of open r+"
    )
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--delay", type=float, default=0.0, help="sleep after each shard")
    p.add_argument("--hold", type=float, default=0.0, help="sleep after create, holding the lock")
    p.add_argument("--fsize-limit", type=int, default=None, help="RLIMIT_FSIZE in bytes")
    p.add_argument("--commit", action="store_true")
    args = p.parse_args()

    spec = StoreSpec(**json.loads(args.spec))
    written: list[int] = []
    try:
        if args.create:
            store = ActivationStore.create(args.url, spec, fingerprint=FINGERPRINT)
            print(json.dumps({"ready": True}), flush=True)
            time.sleep(args.hold)
        else:
            store = ActivationStore.open(args.url, mode="r+")
        if args.fsize_limit is not None:
            # SIGXFSZ is left at its default (kill): write_shard must turn it into an error.
            resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize_limit, args.fsize_limit))
        for shard in store.pending_shards(args.rank, args.world):
            start, stop = store.shard_rows(shard)
            store.write_shard(shard, **synthetic_rows(spec, start, stop, seed=args.seed))
            written.append(shard)
            print(json.dumps({"shard_done": shard}), flush=True)
            time.sleep(args.delay)
        if args.commit:
            store.commit()
    except StoreError as e:
        print(
            json.dumps(
                {"ok": False, "error": type(e).__name__, "message": str(e), "written": written}
            )
        )
        sys.exit(1)
    print(json.dumps({"ok": True, "written": written}))


if __name__ == "__main__":
    main()
