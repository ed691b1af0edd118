"""Real checkpoints bring their own conversation format: lorafleet renders with it, in training and
serving alike. The templates here are InternVL3's own texts: the `-hf` checkpoints' (transformers'
InternVL conversion script) and the original `internvl2_5` format with its default system prompt."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from lorafleet.data.dataset import load_examples
from lorafleet.data.encode import IGNORE_INDEX, encode_prompt
from lorafleet.data.records import parse_record
from lorafleet.models.loading import load_base

# transformers' convert_internvl_weights_to_hf.py `chat_template`, which InternVL3-*-hf ship.
INTERNVL_HF_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)
# InternVL's original `internvl2_5` conversation (ChatML with a default system message), as a template.
INTERNVL_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
INTERNVL_ORIGINAL_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + INTERNVL_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}" + INTERNVL_HF_TEMPLATE
)
# The language model's own template, as an older checkpoint's tokenizer_config.json keeps it.
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}" + INTERNVL_HF_TEMPLATE
)

RECORD = {
    "image": "red.png",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"},
        {"from": "gpt", "value": "Red."},
        {"from": "human", "value": "Sure?"},
        {"from": "gpt", "value": "Yes."},
    ],
}


def checkpoint_with_template(tiny_vlm_dir, tmp_path, template: str):
    model = tmp_path / "model"
    shutil.copytree(tiny_vlm_dir, model)
    (model / "chat_template.jinja").write_text(template)
    return model


def encode(base, tmp_path, record: dict):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    (tmp_path / "data.jsonl").write_text(json.dumps(record) + "\n")
    [example], _ = load_examples(tmp_path / "data.jsonl", base)
    text = base.tokenizer.decode(example.input_ids)
    pairs = zip(example.input_ids, example.labels, strict=True)
    learned = base.tokenizer.decode([int(token) for token, label in pairs if label != IGNORE_INDEX])
    return text, learned


def image_block(base, tiles: int = 1) -> str:
    tokenizer = base.tokenizer
    return tokenizer.start_image_token + base.image_token * base.image_seq_length * tiles + tokenizer.end_image_token


def test_the_hf_checkpoints_template_renders_as_internvl_trains(tiny_vlm_dir, tmp_path):
    base = load_base(checkpoint_with_template(tiny_vlm_dir, tmp_path, INTERNVL_HF_TEMPLATE))
    text, learned = encode(base, tmp_path, RECORD)
    assert text == (
        f"<|im_start|>user\n{image_block(base)}\nWhat colour is it?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\nYes.<|im_end|>\n"
    )
    assert learned == "Red.<|im_end|>Yes.<|im_end|>"  # the replies and their end token, nothing else

    prompt = encode_prompt(parse_record(json.dumps(RECORD), tmp_path, "r"), base)
    # Serving renders the same conversation up to the next reply (here: after the whole chat).
    assert base.tokenizer.decode(prompt.input_ids) == text + "<|im_start|>assistant\n"


def test_a_template_with_a_default_system_prompt_keeps_it_out_of_the_labels(tiny_vlm_dir, tmp_path):
    base = load_base(checkpoint_with_template(tiny_vlm_dir, tmp_path, INTERNVL_ORIGINAL_TEMPLATE))
    text, learned = encode(base, tmp_path, RECORD)
    assert text.startswith(f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>\n<|im_start|>user\n")
    assert learned == "Red.<|im_end|>Yes.<|im_end|>"

    own = {**RECORD, "conversations": [{"from": "system", "value": "Answer in one word."}, *RECORD["conversations"]]}
    text, learned = encode(base, tmp_path, own)
    assert INTERNVL_SYSTEM not in text and text.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n")
    assert learned == "Red.<|im_end|>Yes.<|im_end|>"


@pytest.mark.parametrize("layout", ["chat_template.json", "chat_template.jinja"])
def test_the_processors_template_wins_over_the_language_models(tiny_vlm_dir, tmp_path, layout):
    """Older checkpoints keep the processor's template in chat_template.json and the language
    model's (Qwen2.5's, default system prompt and all) in tokenizer_config.json."""
    model = tmp_path / "model"
    shutil.copytree(tiny_vlm_dir, model)
    (model / "chat_template.jinja").unlink()
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": QWEN_TEMPLATE}))
    if layout == "chat_template.json":
        (model / layout).write_text(json.dumps({"chat_template": INTERNVL_ORIGINAL_TEMPLATE}))
    else:
        (model / layout).write_text(INTERNVL_ORIGINAL_TEMPLATE)
    text, _ = encode(load_base(model), tmp_path, RECORD)
    assert QWEN_DEFAULT_SYSTEM not in text and INTERNVL_SYSTEM in text
