"""The one error type for bad user input: printed as a single line, exit code 2."""

from __future__ import annotations

import click


class InputError(click.ClickException):
    """Bad input (file, folder, flag). The message names the file or flag and says how to fix it."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep the promise of a one-line error whatever the caller passed.
        super().__init__(" ".join(str(message).split()))

    def format_message(self) -> str:
        return self.message


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster pre-empting the job), raised where Ctrl-C would raise KeyboardInterrupt.

    A subclass of KeyboardInterrupt so code that stops cleanly on Ctrl-C stops cleanly on SIGTERM too; the
    ``sd3`` command exits 143 for it and 130 for Ctrl-C."""
