"""How every sd35 command reports: one line per user mistake, never a traceback.

A user mistake (:class:`~sd35.errors.SD35Error`) prints ``sd35: error: ...`` and exits with code 2; an
error that names a request field (``param``) is prefixed with that field's flag, so a message written for
every front end ("width 1000 is not a multiple of 16") still points at the option to change. Warnings
print as ``sd35: warning: ...``; Ctrl-C exits with 130.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

from sd35.errors import SD35Error


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"sd35: warning: {message}", file=sys.stderr)


def report_error(e: SD35Error) -> None:
    """Print ``sd35: error: [--flag: ]message`` for a user mistake."""
    from sd35.cli.options import flag_for  # (imports the request types: only when there is an error)

    flag = flag_for(e.param)
    print(f"sd35: error: {flag + ': ' if flag else ''}{e}", file=sys.stderr)


def run_reporting_errors(command: Callable[[], int]) -> int:
    """Run a command the way every sd35 entry point does: warnings as ``sd35: warning: ...`` lines, a user
    mistake (SD35Error) as one ``sd35: error: ...`` line and exit code 2, Ctrl-C as exit code 130."""
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return command()
        except SD35Error as e:
            report_error(e)
            return 2
        except KeyboardInterrupt:
            print("sd35: interrupted", file=sys.stderr)
            return 130
