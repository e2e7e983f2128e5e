"""The in-memory form every dataset reader returns, before preprocessing to Parquet."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "text", "categories")


class DataFormatError(ValueError):
    """Bad input data; the message names the file, the line (1-based) and the field."""

    def __init__(self, path: str, message: str, line: int | None = None, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path
        if line is not None:
            where += f", line {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class BadRow(Exception):
    """One row a reader cannot use; ``reason`` is the key it is counted under when skipped."""

    def __init__(self, field: str | None, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.field = field
        self.message = message
        self.reason = reason


class RowProblems:
    """Raises DataFormatError for a bad row, or counts it by reason when skipping is allowed."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def report(self, path: str | Path, line: int, bad: BadRow, count: int = 1) -> None:
        """Raise for ``bad`` (found at ``line``), or count it, plus ``count - 1`` like rows after it."""
        error = DataFormatError(str(path), bad.message, line=line, field=bad.field)
        if not self.skip:
            raise error
        self.counts[bad.reason] = self.counts.get(bad.reason, 0) + count
        self.first.setdefault(bad.reason, str(error))

    def log(self, name: str) -> None:
        """Warn once per reason with the count and the first skipped row."""
        for reason, count in self.counts.items():
            log.warning("%s: skipped %d %s row(s); first: %s", name, count, reason, self.first[reason])


@dataclass
class RawDataset:
    """Interactions and item side information with raw (string) ids.

    interactions: columns user_id (str), item_id (str), timestamp (int64), in the
        original file order (the order breaks timestamp ties in the split).
    items: columns item_id (str), text (str: what the item tower reads),
        categories (list[str]: used for diversity metrics; may be empty lists), and optionally
        title (str: a short display name; the text stands in where a reader has none).
    skipped: rows a reader skipped because config allowed it, by reason.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for col in INTERACTION_COLUMNS:
            if col not in self.interactions.columns:
                raise DataFormatError(self.name, f"interactions lack column '{col}'", field=col)
        for col in ITEM_COLUMNS:
            if col not in self.items.columns:
                raise DataFormatError(self.name, f"items lack column '{col}'", field=col)
