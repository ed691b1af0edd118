"""The built-in tiny models: an InternVL-architecture VLM and a text-only Qwen2, both random.

They exist so that the demo and every test run the exact code path of a real checkpoint: each is
built deterministically from a seed and written as an ordinary Hugging Face directory (config,
safetensors weights, tokenizer, processor), then loaded back through `load_base` like any model.
The tokenizer is a small byte-level BPE trained in-process on a built-in corpus, with the ChatML and
InternVL image special tokens, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

IMAGE_SIZE = 64
PATCH_SIZE = 8
# Pixel shuffle with ratio 0.5 merges 2x2 patches: (64/8)^2 / 4 = 16 tokens per tile.
IMAGE_SEQ_LENGTH = (IMAGE_SIZE // PATCH_SIZE) ** 2 // 4
MAX_TILES = 6

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

# ChatML as Qwen2.5 and InternVL3 write it, tool calling included: the tools listed in the system
# turn, calls as <tool_call> JSON blocks, results as <tool_response> blocks in a user turn.
# (transformers renders with trim_blocks: a newline right after a tag is written as {{ '\n' }}.)
CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}You are a helpful assistant.{% endif %}"
    "{{ '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n\' }}'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\n<tool_response>\n' }}{{ message['content'] }}{{ '\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>{{ '\n' }}{% endif %}"
    "{% else %}<|im_start|>{{ message['role'] }}{{ '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<IMG_CONTEXT>{{ '\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% for call in message.get('tool_calls') or [] %}"
    "{% if message['content'] or not loop.first %}{{ '\n' }}{% endif %}"
    "<tool_call>{{ '\n' }}{\"name\": \"{{ call['function']['name'] }}\", \"arguments\": "
    "{{ call['function']['arguments'] | tojson }}}{{ '\n' }}</tool_call>"
    "{% endfor %}<|im_end|>{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

_CORPUS = """
system user assistant. You are a helpful assistant for the organisation.
What shape is in the picture? Which colour is the shape? What color is it? How many dots are there?
How many objects can you see? Answer with one word. Answer with a number.
circle square triangle cross star red green blue yellow purple orange white black
one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9
The invoice total is due in thirty days. The contract was signed by both parties.
Please summarise the policy for the finance, legal and human resources departments.
A quick brown fox jumps over the lazy dog. Hello, world! Thank you.
"""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE with ChatML and InternVL image tokens (any text encodes)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=_SPECIAL_TOKENS,
        show_progress=False,
    )
    bpe.train_from_iterator([_CORPUS] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=dict(_IMAGE_TOKENS),
        model_max_length=4096,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _text_config(vocab_size: int) -> dict:
    return dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # Wider than the usual 0.02 so that the tied output layer can express confident
        # predictions at hidden size 64: the demo's loss curves then mean something.
        initializer_range=0.1,
    )


def build_tiny_internvl(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny InternVL3-style model (InternViT + pixel shuffle + MLP + Qwen2) to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=[IMAGE_SIZE, IMAGE_SIZE],
            patch_size=[PATCH_SIZE, PATCH_SIZE],
            attention_bias=True,
        ),
        text_config=_text_config(len(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=IMAGE_SEQ_LENGTH,
        downsample_ratio=0.5,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    image_processor = GotOcr2ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=MAX_TILES,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    video_processor = InternVLVideoProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_length=IMAGE_SEQ_LENGTH,
        chat_template=CHATML_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen2(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny text-only Qwen2 causal LM with the same tokenizer to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    text = _text_config(len(tokenizer))
    text.pop("model_type")
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**text))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
