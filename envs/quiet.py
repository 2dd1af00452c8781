"""Silencing what LIBERO and robosuite print on every start that is known to be harmless (and only
that): a run with 16 simulator workers otherwise opens with dozens of such lines before its
progress bar, and real warnings drown in them.

- robosuite warns at import that no private macro file exists (robosuite/__init__.py); its defaults
  are what LIBERO and openpi run with.
- LIBERO-PRO's benchmark prints "[info] Applying task order index 0 (permutation: [0, 1, ...])" when a
  suite is built: index 0 is the identity order, i.e. the standard task ids.
Anything else they print passes through.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys

_ROBOSUITE_HARMLESS = ("No private macro file found!", "It is recommended to use a private macro file",
                       "To setup, run: python ")
_LIBERO_HARMLESS = re.compile(r"^\[info\] Applying task order index 0 \(permutation: \[0(, \d+)*\]\)")


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_ROBOSUITE_HARMLESS)


def quiet_robosuite() -> None:
    """Install the filter on robosuite's logger (before robosuite is imported; idempotent)."""
    logger = logging.getLogger("robosuite_logs")
    if not any(isinstance(f, _DropHarmless) for f in logger.filters):
        logger.addFilter(_DropHarmless())


@contextlib.contextmanager
def quiet_libero_stdout():
    """Run a block that builds a LIBERO benchmark; print back whatever it wrote except the known line."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for line in buf.getvalue().splitlines():
            if not _LIBERO_HARMLESS.match(line):
                print(line, file=sys.stdout)
