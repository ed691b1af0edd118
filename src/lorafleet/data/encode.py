"""Turn a chat record into model inputs: token ids, loss labels and image tiles.

Images are tiled by the model's own image processor (InternVL dynamic tiling: 1..max tiles by
aspect ratio, plus a thumbnail when there is more than one tile), and each `<image>` placeholder
becomes `<img>` + one image token per visual token + `</img>`. The text is rendered with the
model's chat template; labels cover only the assistant turns (their content and end-of-turn token,
not the newline ChatML writes after it: `end_of_turn` says why), found by rendering each
conversation prefix, so any template that renders prefixes stably works.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.data.records import IMAGE_PLACEHOLDER, ChatRecord, Message
from lorafleet.errors import DataError
from lorafleet.models.loading import FrozenBase

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: torch.Tensor  # (L,) long
    labels: torch.Tensor  # (L,) long, IGNORE_INDEX outside assistant turns
    pixel_values: torch.Tensor | None  # (tiles, 3, H, W) for all images of the record, in order
    source: str = ""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def encode_record(
    record: ChatRecord, base: FrozenBase, max_tiles: int | None = None, max_seq_len: int = 4096
) -> Example:
    """Tokens, labels (assistant turns only) and image tiles of a whole conversation."""
    messages, pixel_values = expand_images(record, base, max_tiles)
    input_ids, labels = tokenize_chat(messages, base.tokenizer)
    if len(input_ids) > max_seq_len:
        raise DataError(
            f"{record.source}: {len(input_ids)} tokens exceed max_seq_len {max_seq_len}; "
            "raise max_seq_len, lower max_tiles, or shorten the record"
        )
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"{record.source}: the assistant turns are empty, nothing to learn")
    return Example(torch.tensor(input_ids), torch.tensor(labels), pixel_values, record.source)


def encode_prompt(
    record: ChatRecord, base: FrozenBase, max_tiles: int | None = None, tools: list[dict] | None = None
) -> Example:
    """The conversation up to the start of the next assistant reply, for generation; `tools`
    (OpenAI's function list) are offered as the chat template describes them."""
    messages, pixel_values = expand_images(record, base, max_tiles)
    text = render(base.tokenizer, messages, add_generation_prompt=True, tools=tools)
    ids = base.tokenizer(text, add_special_tokens=False)
    input_ids = torch.tensor(ids["input_ids"])
    return Example(input_ids, torch.full_like(input_ids, IGNORE_INDEX), pixel_values, record.source)


def expand_images(
    record: ChatRecord, base: FrozenBase, max_tiles: int | None
) -> tuple[list[dict], torch.Tensor | None]:
    """Chat-template messages with each `<image>` expanded to its image tokens, and the tiles."""
    messages = [template_message(m) for m in record.messages]
    if not record.images:
        return messages, None
    if not base.is_multimodal:
        raise DataError(f"{record.source}: record has images but the base model {base.path} is text-only")
    pixel_values, tiles_per_image = tile_images(record, base, max_tiles)
    expanded = iter(image_token_block(base, tiles) for tiles in tiles_per_image)
    for message in messages:
        pieces = message["content"].split(IMAGE_PLACEHOLDER)
        message["content"] = pieces[0] + "".join(next(expanded) + piece for piece in pieces[1:])
    return messages, pixel_values


def tile_images(record: ChatRecord, base: FrozenBase, max_tiles: int | None) -> tuple[torch.Tensor, list[int]]:
    kwargs = {"crop_to_patches": True}
    if max_tiles is not None:
        kwargs["max_patches"] = max_tiles
    processed = base.image_processor(record.load_images(), return_tensors="pt", **kwargs)
    return processed["pixel_values"].to(base.dtype), [int(n) for n in processed["num_patches"]]


def image_token_block(base: FrozenBase, tiles: int) -> str:
    tokenizer = base.tokenizer
    return tokenizer.start_image_token + base.image_token * (base.image_seq_length * tiles) + tokenizer.end_image_token


def tokenize_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat, and labels that keep only the assistant turns."""
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(tokenizer, messages[:index], add_generation_prompt=True)
            _append(prompt, rendered, tokenizer, input_ids, labels, learn=False)
            rendered = prompt
        full = render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        _append(full, rendered, tokenizer, input_ids, labels, learn=message["role"] == "assistant")
        rendered = full
    return input_ids, labels


def template_message(message: Message) -> dict:
    turn = {"role": message.role, "content": message.text}
    if message.tool_calls:
        turn["tool_calls"] = message.tool_calls
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def render(tokenizer, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _append(text: str, before: str, tokenizer, input_ids: list[int], labels: list[int], learn: bool) -> None:
    if not text.startswith(before):
        raise DataError("the chat template does not render conversation prefixes stably; cannot mask labels")
    ids = tokenizer(text[len(before) :], add_special_tokens=False)["input_ids"]
    input_ids.extend(ids)
    if not learn:
        labels.extend([IGNORE_INDEX] * len(ids))
        return
    end = end_of_turn(ids, tokenizer)
    labels.extend(ids[: end + 1] + [IGNORE_INDEX] * (len(ids) - end - 1))


def end_of_turn(ids: list[int], tokenizer) -> int:
    """Where an assistant turn's labels stop: at its end-of-turn token, the turn's last special token
    (an added token marked special, as `<|im_end|>` is in ChatML whether or not the tokenizer calls
    it eos: Qwen2.5's base models say `<|endoftext|>`), or at its last token when it has none.

    What the template writes after that token (ChatML's newline) is not learned, in SFT and in
    preference training alike: generation stops at the end-of-turn token, so the model never
    produces the newline, and it is the next prompt's formatting. Learning it would only add a
    near-certain token to the mean over the reply (diluting the SFT loss) and to both answers of a
    pair (noise in their log-probability difference). TRL, which takes everything after the prompt
    as the answer, scores it too; tests/train/test_preference.py equals TRL less that token."""
    special = {index for index, token in tokenizer.added_tokens_decoder.items() if token.special}
    special |= set(tokenizer.all_special_ids)
    return max((i for i, token in enumerate(ids) if token in special), default=len(ids) - 1)
