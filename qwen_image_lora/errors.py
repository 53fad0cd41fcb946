"""One base for every error a user can act on, and the exit map. The message says what went wrong and what to do;
`field` names what is at fault as the user wrote it (a dotted config key, a CLI option, a request field; None when
no single field is), so the server puts it in the 422's `loc` without reading the message; `exit_code` and `prefix`
are how the CLI and the recipe end. Anything else is a bug and keeps its traceback. (A failed write is an OSError
from the operating system, mapped by `io.is_write_error` / `io.describe_write_error`.)"""

from __future__ import annotations


class UserError(Exception):
    exit_code = 2
    prefix = "error: "

    def __init__(self, message: str = "", field: str | None = None, index: int | None = None):
        super().__init__(message)
        self.field, self.index = field, index  # index: which item of a list-valued field (0-based)

    def line(self) -> str:
        """The one console line this error ends a command with."""
        return f"{self.prefix}{self}".replace("\n", " ")


class InputError(UserError, ValueError):
    """A value the user gave does not fit (a config value, a flag, a request field, a line of a jobs file)."""


class NotFound(UserError, FileNotFoundError):
    """A file, folder or hub id the user named is not there."""


class AdapterError(InputError):
    """An adapter that cannot be found, read, applied or written as asked: wrong path, model, format or layout."""
