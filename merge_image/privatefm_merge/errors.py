"""The one exception type the engine raises for expected failures, carrying its reason."""

from __future__ import annotations

from privatefm_merge.contract import Reason


class MergeError(Exception):
    """An expected failure with a machine-readable reason (see ``contract.Reason``)."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


class StorageError(MergeError):
    """Reading or writing the store failed (also raised for missing objects)."""

    def __init__(self, message: str) -> None:
        super().__init__(Reason.STORAGE_ERROR, message)


class NotFoundError(StorageError):
    """The object does not exist."""
