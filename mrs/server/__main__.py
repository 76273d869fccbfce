"""`python -m mrs.server [--model REF ...] [--host H] [--port P] [--max-batch N] [--preload]`.

The same as `mrs serve`, for when only the server is wanted (tests, containers).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mrs.errors import MrsError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mrs.server", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], help="default model (repeatable)")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int)
    ap.add_argument("--max-batch", type=int)
    ap.add_argument("--home")
    ap.add_argument("--preload", action="store_true", help="load the --model models before serving")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from mrs import compile_cache
    from mrs.config import Settings
    from mrs.server.app import serve

    compile_cache.set_reporter(compile_cache.terminal_reporter())   # a first compile is logged

    try:
        settings = Settings.load(host=args.host, port=args.port, max_batch=args.max_batch, home=args.home)
        serve(settings, args.model, preload=args.preload)
    except MrsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
