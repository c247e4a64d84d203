"""The base of every error a user can cause, and the one wrapper that makes it a command's last line.

ShardFormatError, PipelineError and MtScaleError subclass UserError (each package raises its own);
mt-shard, mt-train, mt-bench and the demo run their command through `run_cli`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C


class UserError(Exception):
    """A problem the user can fix; the message names the file or setting and the fix, on one line."""


def os_error_message(exc: OSError, path: str | Path | None = None) -> str:
    """'<path>: <reason>' for an OS error: the path it names (else `path`), and its plain reason."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{where}: {reason}" if where is not None else reason


def print_line(prog: str, text: str, *, first_rank_only: bool = False) -> None:
    """`prog: text` as one line on stderr (with `first_rank_only`, only where RANK is unset or 0)."""
    if first_rank_only and os.environ.get("RANK", "0") != "0":
        return  # every rank hits the same error or signal: one line from the first process is enough
    message = " ".join(str(text).split())
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def run_cli(
    prog: str,
    command: Callable[[], int],
    *,
    interrupted: str = "interrupted",
    os_hint: str = "",
    first_rank_only: bool = False,
) -> int:
    """`command()`'s exit status; a UserError or OSError becomes one line and status 2, Ctrl-C status 130.

    The line is `prog: error: <message>`; an OSError's message is '<path>: <reason>' then `os_hint`.
    """
    try:
        return command()
    except UserError as exc:
        text, status = f"error: {exc}", EXIT_USER_ERROR
    except OSError as exc:
        text, status = f"error: {os_error_message(exc)}" + (f"; {os_hint}" if os_hint else ""), EXIT_USER_ERROR
    except KeyboardInterrupt:
        text, status = interrupted, EXIT_INTERRUPTED
    print_line(prog, text, first_rank_only=first_rank_only)
    return status
