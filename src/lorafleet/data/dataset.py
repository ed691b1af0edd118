"""Read and encode a whole JSONL dataset up front, so bad records fail before training starts."""

from __future__ import annotations

from pathlib import Path

from lorafleet.data.encode import Example, encode_record
from lorafleet.data.records import read_records
from lorafleet.errors import DataError
from lorafleet.models.loading import FrozenBase


def load_examples(
    path: str | Path,
    base: FrozenBase,
    max_tiles: int | None = None,
    max_seq_len: int = 4096,
    skip_bad: bool = False,
) -> tuple[list[Example], list[str]]:
    """Encoded examples of `path`, and the errors of skipped records (only with `skip_bad`)."""
    records, skipped = read_records(path, skip_bad)
    examples = []
    for record in records:
        try:
            examples.append(encode_record(record, base, max_tiles, max_seq_len))
        except DataError as err:
            if not skip_bad:
                raise
            skipped.append(str(err))
    if not examples:
        raise DataError(f"{path}: every record was skipped; first problem: {skipped[0]}")
    return examples, skipped
