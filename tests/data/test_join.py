"""Joining data files (a sweep's --retrain-full trains on its training and held-out files as one):
every record in order, each still pointing at its own images from the joined file's directory."""

from __future__ import annotations

from pathlib import Path

from lorafleet.data.join import join_jsonl
from lorafleet.data.records import read_records
from tests.conftest import write_image_dataset, write_text_dataset


def test_joined_records_keep_their_order_and_their_images(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "held-out").mkdir()
    train = write_image_dataset(tmp_path / "train/data.jsonl", 3, seed=0)
    held_out = write_text_dataset(tmp_path / "held-out/data.jsonl", 2, seed=1)
    joined = join_jsonl([train, held_out], tmp_path / "elsewhere/all.jsonl")
    records, skipped = read_records(joined)
    originals = read_records(train)[0] + read_records(held_out)[0]
    assert not skipped and len(records) == len(originals) == 5
    for record, original in zip(records, originals, strict=True):
        assert record.messages == original.messages
        assert [Path(image).resolve() for image in record.images] == [Path(i).resolve() for i in original.images]
    assert all(Path(image).exists() for record in records for image in record.images)
