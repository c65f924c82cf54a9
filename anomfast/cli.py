"""Command line: `anomfast info`, `anomfast eval`, `anomfast fit`, `anomfast report`."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args) -> int:
    from . import build_info
    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:16s} {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anomfast", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="what this build contains (version, compiler, OpenMP, CUDA)")
    pi.add_argument("--json", action="store_true")
    pi.set_defaults(func=_cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as exc:
        print(f"anomfast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
