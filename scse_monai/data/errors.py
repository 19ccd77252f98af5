"""Errors raised while reading or preparing datasets."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DataPreparationError"]


class DataPreparationError(Exception):
    """An expected problem with the input data: names the patient and the offending file.

    The CLI prints ``str(error)`` as one line and exits with code 2, without a traceback.

    Args:
        message: what is wrong, in words a user can act on.
        patient: patient / case identifier, if known.
        file: the offending file or folder, if known.

    Example:
        >>> str(DataPreparationError("mask has no matching slice", patient="3", file="Ground/IMG-1.png"))
        'patient 3: Ground/IMG-1.png: mask has no matching slice'
    """

    def __init__(self, message: str, patient: str | None = None, file: str | Path | None = None) -> None:
        self.message = message
        self.patient = patient
        self.file = None if file is None else str(file)
        parts = []
        if patient is not None:
            parts.append(f"patient {patient}")
        if self.file is not None:
            parts.append(self.file)
        parts.append(message)
        super().__init__(": ".join(parts))

    def __reduce__(self):  # keeps the fields when the error crosses a process-pool boundary
        return (type(self), (self.message, self.patient, self.file))
