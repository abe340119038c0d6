"""Error types. Every user-facing failure is a LoratoolsError: the CLI prints its one-line
message on stderr and exits with its code; a traceback appears only with ``--debug``."""
from __future__ import annotations

import os


class LoratoolsError(Exception):
    """A problem with the user's input or environment, reported as one line. Raised as such
    for bad option values (a usage error: exit 2, as click's own usage errors)."""

    exit_code = 2

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(LoratoolsError):
    """A file that is missing, unreadable, malformed or inconsistent."""

    exit_code = 2


class IncompatibleError(LoratoolsError):
    """Inputs that are each valid but do not fit together (adapter vs base, shapes, ranks)."""

    exit_code = 3


class UnsupportedError(LoratoolsError):
    """A valid input that loratools deliberately does not handle (and says why)."""

    exit_code = 4


class OutputError(LoratoolsError):
    """An output that cannot be written (exists, is an input, no space)."""

    exit_code = 5


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``timeout``, a job scheduler, a closed terminal), raised in the main
    thread as Ctrl-C's KeyboardInterrupt is, so the same cleanup runs; the CLI prints one line and
    exits 128 + the signal's number."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM / SIGHUP: ``signum``) during ``train``: where it stopped and the last
    checkpoint ``--resume`` continues from (the CLI prints one line with the command and exits
    128 + the signal's number, 130 for Ctrl-C, as for any interrupt)."""

    def __init__(self, step: int, total: int, out, checkpoint_step: int | None, signum: int | None = None):
        from pathlib import Path

        self.step, self.total, self.out, self.checkpoint_step = step, total, Path(out), checkpoint_step
        self.signum = signum
        super().__init__(f"interrupted at step {step}/{total}")
