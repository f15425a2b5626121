"""The one exception type of the data pipeline."""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data, data settings or tokenizer.

    The message always names where the problem is (file and line/row, setting name or
    tokenizer attribute) and what would be accepted.
    """


class RowError(DataError):
    """A problem with one row, raised without its location; the caller adds file and line."""
