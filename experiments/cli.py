"""Command-line conventions shared by the toolkit's entry points: one error line, fixed exit codes.

    from experiments.cli import ArgumentParser, run_main
    def main(argv=None):
        return run_main(lambda: _main(argv), argv)

Every failure a user can cause prints ONE line "error: ..." on stderr (no traceback) and exits
with a code that says what kind of failure it was; `--debug` anywhere on the command line
re-raises instead, so the traceback is shown.

    0  success                      3  a bad file (corrupt, truncated, not ours, failed SHA-256)
    1  an internal error (a bug)    4  a peer process failed (torchrun)
    2  bad input (flags, paths)     5  training diverged
    130 / 143  stopped by SIGINT / SIGTERM (a resumable checkpoint was written)

For files, `experiments.checkpoint.load_verified` is the verified load (SHA-256, no code
execution) that any tool reading a checkpoint or final.pt should use.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_BAD_FILE, EXIT_PEER, EXIT_DIVERGED = 0, 1, 2, 3, 4, 5
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and exit code 2."""

    def error(self, message):
        raise SystemExit(_fail(EXIT_BAD_INPUT, f"{self.prog}: {message}"))


def _fail(code: int, message: str) -> int:
    line = " ".join(str(message).split("\n")[0].split()) or "unknown error"
    print(f"error: {line}", file=sys.stderr, flush=True)
    return code


def exit_code(exc: BaseException) -> int:
    """The exit code of an exception (see the module docstring)."""
    from experiments.checkpoint import CheckpointFileError
    from experiments.data import CorruptFileError
    from experiments.distributed import PeerFailure
    from experiments.divergence import DivergenceError, Interrupted
    if isinstance(exc, Interrupted):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(exc, (CheckpointFileError, CorruptFileError)):
        return EXIT_BAD_FILE
    if isinstance(exc, PeerFailure):
        return EXIT_PEER
    if isinstance(exc, DivergenceError):
        return EXIT_DIVERGED
    if isinstance(exc, (ValueError, OSError)):   # OSError: missing / unreadable paths
        return EXIT_BAD_INPUT
    return EXIT_INTERNAL


def error_line(exc: BaseException) -> str:
    """The one line printed for `exc`."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    text = " ".join(str(exc).split("\n")[0].split())
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    if exit_code(exc) == EXIT_INTERNAL:
        return f"internal error {type(exc).__name__}: {text} (run again with --debug for the traceback)"
    return text or type(exc).__name__


def wants_debug(argv: list[str] | None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv)


def run_main(body: Callable[[], int], argv: list[str] | None = None) -> int:
    """Run `body()` (an entry point's work, returning its exit code); turn any exception into
    one error line and its exit code, unless --debug is in `argv` (then re-raise)."""
    try:
        return body()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    except BaseException as exc:  # noqa: BLE001 - the entry point's last word
        if wants_debug(argv):
            raise
        return _fail(exit_code(exc), error_line(exc))
