"""Bad records name their file and line; both JSONL layouts parse to the same conversation."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from lorafleet.data.dataset import load_examples
from lorafleet.data.records import read_records
from lorafleet.errors import DataError

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def png_bytes(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_malformed_json_is_reported_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"messages": [', GOOD])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        read_records(path)


def test_bad_records_can_be_skipped_and_counted(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [GOOD, "not json", {"conversations": []}, GOOD])
    records, skipped = read_records(path, skip_bad=True)
    assert len(records) == 2
    assert [problem.split(": ")[0].rsplit(":", 1)[1] for problem in skipped] == ["2", "3"]


def test_a_record_without_an_assistant_turn_is_an_error(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "only a question"}]}])
    with pytest.raises(DataError, match=r"q\.jsonl:1: no assistant turn"):
        read_records(path)


def test_placeholder_count_must_match_images(tmp_path):
    record = {
        "image": ["a.png", "b.png"],
        "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "x"}],
    }
    with pytest.raises(DataError, match=r"1 '<image>' placeholders but 2 images"):
        read_records(write_lines(tmp_path / "p.jsonl", [record]))


def test_missing_image_is_reported_with_file_and_line(tiny_vlm_dir, tmp_path):
    from lorafleet.models.loading import load_base

    record = {
        "image": "nowhere.png",
        "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "x"}],
    }
    path = write_lines(tmp_path / "img.jsonl", [GOOD, record])
    with pytest.raises(DataError, match=r"img\.jsonl:2: image .*nowhere\.png does not exist"):
        load_examples(path, load_base(tiny_vlm_dir, device="cpu"))


def test_openai_and_internvl_layouts_give_the_same_tokens(tiny_vlm_dir, tmp_path):
    from lorafleet.models.loading import load_base

    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    data_url = "data:image/png;base64," + base64.b64encode((tmp_path / "red.png").read_bytes()).decode()
    internvl = {
        "image": "red.png",
        "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}],
    }
    openai = {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "Colour?"}],
            },
            {"role": "assistant", "content": "red"},
        ]
    }
    examples, _ = load_examples(write_lines(tmp_path / "both.jsonl", [internvl, openai]), load_base(tiny_vlm_dir))
    assert examples[0].input_ids.tolist() == examples[1].input_ids.tolist()
    assert examples[0].labels.tolist() == examples[1].labels.tolist()
    assert examples[0].pixel_values.equal(examples[1].pixel_values)
