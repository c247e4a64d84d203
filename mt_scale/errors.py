"""The one exception type for errors a user of mt_scale can cause (bad config, missing files)."""

from __future__ import annotations

from pathlib import Path


class MtScaleError(Exception):
    """A user-fixable problem; the message names the file or setting and the fix.

    The command-line tools print it as one line on stderr and exit with status 2.
    """


def os_error_message(exc: OSError, path: str | Path | None = None) -> str:
    """'<path>: <reason>' for an OS error: the path it names (else `path`), and its plain reason."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" if where is not None else reason
