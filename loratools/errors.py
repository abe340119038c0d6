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
