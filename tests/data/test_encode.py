"""Labels cover only assistant replies; images expand to one token per visual token per tile."""

from __future__ import annotations

import json

import torch
from PIL import Image

from lorafleet.data.batch import collate
from lorafleet.data.dataset import load_examples
from lorafleet.data.encode import IGNORE_INDEX
from lorafleet.models.loading import load_base
from lorafleet.segments import Segment
from lorafleet.train.loss import segment_losses


def test_only_assistant_replies_and_their_end_token_are_labelled(tiny_lm_dir, tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the total?"},
            {"role": "assistant", "content": "three"},
            {"role": "user", "content": "And the colour?"},
            {"role": "assistant", "content": "blue"},
        ]
    }
    (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n")
    base = load_base(tiny_lm_dir)
    [example], _ = load_examples(tmp_path / "c.jsonl", base)
    labelled = [int(t) for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert base.tokenizer.decode(labelled) == "three<|im_end|>blue<|im_end|>"
    assert base.tokenizer.decode(example.input_ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_labels_end_at_the_end_of_turn_token_even_where_eos_is_another_token(tiny_lm_dir, tmp_path):
    """Qwen2.5's own template (each turn "...<|im_end|>\n") with its base models' tokenizer, whose
    eos is <|endoftext|>: the labels still stop at each turn's <|im_end|>, never take the newline."""
    import shutil

    from tests.train.test_preference import QWEN25_CHAT_TEMPLATE

    model = tmp_path / "model"
    shutil.copytree(tiny_lm_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"eos_token": "<|endoftext|>"}))
    (model / "chat_template.jinja").write_text(QWEN25_CHAT_TEMPLATE)
    chat = {
        "messages": [
            {"role": "user", "content": "What is the total?"},
            {"role": "assistant", "content": "three"},
            {"role": "user", "content": "And the colour?"},
            {"role": "assistant", "content": "blue"},
        ]
    }
    (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n")
    base = load_base(model)
    assert base.tokenizer.eos_token == "<|endoftext|>"
    [example], _ = load_examples(tmp_path / "c.jsonl", base)
    labelled = [int(t) for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    assert base.tokenizer.decode(labelled) == "three<|im_end|>blue<|im_end|>"
    assert base.tokenizer.decode(example.input_ids).endswith("blue<|im_end|>\n")


def test_wide_image_is_tiled_with_a_thumbnail(tiny_vlm_dir, tmp_path):
    Image.new("RGB", (192, 64), "blue").save(tmp_path / "wide.png")
    record = {
        "image": "wide.png",
        "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "blue"}],
    }
    (tmp_path / "w.jsonl").write_text(json.dumps(record) + "\n")
    base = load_base(tiny_vlm_dir)
    [example], _ = load_examples(tmp_path / "w.jsonl", base)
    assert example.pixel_values.shape[0] == 4  # 3x1 tiles for a 3:1 picture, plus the thumbnail
    image_token = base.tokenizer.convert_tokens_to_ids(base.image_token)
    assert int((example.input_ids == image_token).sum()) == 4 * base.image_seq_length
    [small], _ = load_examples(tmp_path / "w.jsonl", base, max_tiles=1)
    assert small.pixel_values.shape[0] == 1


def test_loss_ignores_prompt_and_padding(tiny_lm_dir, tmp_path):
    base = load_base(tiny_lm_dir)
    lines = [
        {"messages": [{"role": "user", "content": "q" * n}, {"role": "assistant", "content": "ok"}]} for n in (1, 30)
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    examples, _ = load_examples(tmp_path / "p.jsonl", base)
    short_alone = collate(examples[:1], base.tokenizer.pad_token_id)
    short_padded = collate(examples, base.tokenizer.pad_token_id)
    with torch.no_grad():
        alone = base.model(**short_alone.model_inputs()).logits
        padded = base.model(**short_padded.model_inputs()).logits
        # Garbage where the prompt and the padding are must not change the loss.
        scrambled = padded.clone()
        scrambled[0][short_padded.labels[0].roll(-1) == IGNORE_INDEX] = 1e3
    expected = base.model(**short_alone.model_inputs(), labels=short_alone.labels).loss
    for logits, labels in (
        (alone, short_alone.labels),
        (padded, short_padded.labels),
        (scrambled, short_padded.labels),
    ):
        [loss] = segment_losses(logits[:1], labels[:1], [Segment("x", 0, 1)])
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
