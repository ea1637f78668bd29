"""Look inside activation stores: summary, statistics, similarity, text, probe, plots.

    python pipelines/inspect_cache.py runs/tiny                      # every stage's store
    python pipelines/inspect_cache.py runs/tiny --stats --similarity --plots runs/tiny/inspect
    python pipelines/inspect_cache.py runs/tiny/cache/stage-2 --show-row 5 --nearest 5
    python pipelines/inspect_cache.py runs/tiny --probe

    python pipelines/inspect_cache.py runs/trial --storage_options '{"endpoint_url": "http://127.0.0.1:9000"}'

Exit code: 0 all stores fine, 3 incomplete, 4 stale, 5 corrupt, 6 missing (the worst
store decides), 2 a request that cannot be served, 7 an object store that cannot be
reached, 1 anything unexpected; every failure is one line on stderr. docs/inspect.md
has the details.
"""

from __future__ import annotations

import argparse
import json
import sys

from cached_mslt.inspect import (
    EXIT_CODES,
    InspectError,
    InspectOptions,
    format_report,
    gather,
    to_json,
)
from storage import StoreUnreachableError

UNREACHABLE = 7  # endpoint down or wrong, bucket missing, credentials refused
UNEXPECTED = 1  # not a refusal this tool knows: a bug, or an environment it did not expect


def rows_arg(text: str) -> int | None:
    return None if text == "all" else int(text)


def options_arg(text: str) -> dict:
    """--storage_options: a JSON object (never echoed back: it may hold a credential)."""
    try:
        value = json.loads(text)
    except ValueError:
        expected = 'expected e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\''
        raise argparse.ArgumentTypeError(f"not valid JSON; {expected}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON {type(value).__name__}; expected an object")
    return value


class OneLineParser(argparse.ArgumentParser):
    """A bad option is one line on stderr and exit code 2, like every other failure."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (--help lists the options)\n")


def parse(argv: list[str] | None) -> tuple[InspectOptions, bool, bool]:
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", help="a store (runs/<run>/cache/stage-K) or a run directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--stats", action="store_true", help="streaming statistics of hidden states")
    p.add_argument("--rows", type=rows_arg, default=None, help="N rows (whole chunks) or 'all'")
    p.add_argument("--compare", metavar="STORE", help="CKA and cosine against another store")
    p.add_argument("--similarity", action="store_true", help="CKA and cosine between stages")
    p.add_argument("--show-row", type=int, metavar="I", help="tokens and vectors of store row I")
    p.add_argument("--nearest", type=int, metavar="I", help="rows nearest to row I")
    p.add_argument("-k", type=int, default=5, help="neighbours to list (default 5)")
    p.add_argument("--probe", action="store_true", help="BBC topic probe per stage")
    p.add_argument("--probe-examples", type=int, help="cap examples per BBC split")
    p.add_argument("--plots", metavar="DIR", help="write PNG figures here")
    p.add_argument("--run", metavar="RUN_DIR", help="check the store's validity for this run")
    p.add_argument("--stage", type=int, help="in a run: the stage for --show-row/--nearest")
    p.add_argument("--verify", action="store_true", help="read every chunk (checksums)")
    p.add_argument("--prepared", metavar="DIR", help="prepared data for text (default: run's)")
    p.add_argument("--task-dir", default="data/tasks", help="where prepared tasks live")
    p.add_argument(
        "--storage_options",
        type=options_arg,
        default={},
        help="JSON for object-store URLs (endpoint, credentials); over a run's config.json",
    )
    p.add_argument("--traceback", action="store_true", help="on an unexpected error, the trace")
    args = vars(p.parse_args(argv))
    as_json, traceback = args.pop("json"), args.pop("traceback")
    return InspectOptions(**args), as_json, traceback


def main(argv: list[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # checkpoint loads would print one bar per stage
    opts, as_json, traceback = parse(argv)
    try:
        report = gather(opts)
        print(to_json(report) if as_json else format_report(report))
        return report.exit_code
    except InspectError as e:
        return fail(e, 2)
    except FileNotFoundError as e:  # a directory that is neither a store nor a run
        return fail(e, EXIT_CODES["missing"])
    except StoreUnreachableError as e:
        return fail(e, UNREACHABLE)
    except Exception as e:
        if traceback:
            raise
        return fail(e, UNEXPECTED, f"unexpected {type(e).__name__}: ", " (--traceback shows where)")


def fail(error: Exception, code: int, before: str = "", after: str = "") -> int:
    """One line on stderr, whatever the message's own line breaks; returns the exit code."""
    print(f"error: {before}{' '.join(str(error).split())}{after}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
