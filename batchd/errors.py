"""The exceptions batchd raises and understands.

Every error batchd raises derives from :class:`BatchdError`; the docstring of
each class is its default message, so ``raise ConfigError()`` already says
something useful.
"""

from __future__ import annotations


class BatchdError(Exception):
    """batchd failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(BatchdError):
    """The configuration is invalid."""


class StartupError(BatchdError):
    """batchd cannot start on this machine (port taken, spool locked or not writable).

    The CLI exits 73 for it, which the unit lists in RestartPreventExitStatus=:
    restarting every few seconds cannot fix it.
    """


class SpoolError(BatchdError):
    """The spool folder is missing, unwritable or not laid out as expected."""


class StoreError(BatchdError):
    """The database could not be read or written."""


class AlreadyRegistered(StoreError):
    """Another node registered this claimed folder first; leave it to that node."""

    def __init__(self, work_path: str) -> None:
        super().__init__(f"{work_path} is already registered as a batch (by another node)")
        self.work_path = work_path


class NameTaken(StoreError):
    """Another batch already uses this name as its outbox folder; pick the next free name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"batch name {name!r} is already taken; pick the next free name")
        self.name = name


class ProcessorError(BatchdError):
    """The processor failed on this file; the attempt may be retried."""


class PermanentError(ProcessorError):
    """The file cannot be processed; retrying will not help.

    Raise it from a processor for bad content (a damaged PDF, a binary file
    where text was expected) so the file fails at once without spending its
    retries.
    """


class Refusal(BatchdError):
    """A request refused with an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class ClientGone(BatchdError):
    """The client closed the connection before sending its whole request."""
