"""``lowbit study KIND ...``: experiments over seeds × methods × settings, written up as tables and plots.

A study kind is one module in :mod:`lowbit.study.kinds` defining a class decorated with
:func:`register_study` (``name``, ``help``, ``add_arguments(parser)``, ``run(args) -> int``); it is found by
itself, no other file changes. The shared machinery (:mod:`lowbit.study.core`) runs the grid with a
progress bar and a results file that lets an interrupted study continue, aggregates mean ± std over
seeds, measures epochs to reach a target accuracy, plots accuracy-per-epoch curves and writes the
markdown report with the exact command, the CPU and the wall time. Every kind has a ``--quick`` form
that the test suite runs in seconds.
"""

from .registry import STUDIES, StudyKind, get_study, register_study

__all__ = ["STUDIES", "StudyKind", "get_study", "register_study"]
