"""Helpers for role CLIs with sub-actions, imported lazily so only the chosen action's
module (and its dependencies, e.g. torch) is loaded."""
from __future__ import annotations

import argparse
import importlib
import sys


def register_actions(sub: argparse._SubParsersAction, name: str, help_line: str,
                     actions: dict[str, tuple[str, str]], argv: list[str] | None = None) -> None:
    """Add command ``name`` whose actions map to modules with ``add_arguments``/``run``."""
    argv = sys.argv[1:] if argv is None else argv
    words = [a for a in argv if not a.startswith("-")]
    chosen = words[words.index(name) + 1] if name in words and words.index(name) + 1 < len(words) else None
    parser = sub.add_parser(name, help=help_line, description=help_line)
    subs = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, (module, text) in actions.items():
        if action != chosen:
            subs.add_parser(action, help=text, add_help=False)
            continue
        mod = importlib.import_module(module)
        p = subs.add_parser(action, help=text, description=text)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
