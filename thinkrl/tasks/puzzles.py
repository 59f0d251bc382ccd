"""`thinkrl puzzles KIND ...`: generate task data files."""
from __future__ import annotations

import sys

KINDS = {"temporal-clue": "thinkrl.tasks.temporal_clue"}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in KINDS:
        print(f"usage: thinkrl puzzles {{{','.join(KINDS)}}} [args]", file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    import importlib

    return int(importlib.import_module(KINDS[argv[0]]).main(argv[1:]) or 0)
