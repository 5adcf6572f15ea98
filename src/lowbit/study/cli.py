"""``lowbit study KIND ...``: one subcommand per registered study kind."""

from __future__ import annotations

import argparse

from .registry import discover


def add_commands(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("study", help="experiments over seeds x methods, written up as tables and plots")
    ssub = sp.add_subparsers(dest="study", required=True)
    for name, cls in sorted(discover().items()):
        kind = cls()
        p = ssub.add_parser(name, help=cls.help, description=cls.help)
        kind.add_arguments(p)
        p.set_defaults(fn=kind.run)
