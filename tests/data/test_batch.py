"""Batches for training: lengths rounded up to a few shapes, and no attention mask needed."""

from __future__ import annotations

import pytest
import torch

from lorafleet.data.batch import collate, pack_micro_batches, stack_micro_batches
from lorafleet.data.dataset import load_examples
from lorafleet.data.encode import IGNORE_INDEX
from lorafleet.models.loading import load_base
from lorafleet.segments import Segment
from tests.conftest import write_text_dataset


@pytest.fixture(scope="module")
def base_and_examples(tiny_lm_dir, tmp_path_factory):
    base = load_base(tiny_lm_dir, device="cpu")
    data = write_text_dataset(tmp_path_factory.mktemp("batch") / "d.jsonl", n=8, seed=3)
    examples, _ = load_examples(data, base)
    return base, examples


def test_padded_lengths_are_rounded_up_to_the_multiple(base_and_examples):
    base, examples = base_and_examples
    pad = base.tokenizer.pad_token_id
    batch, segments = stack_micro_batches([("a", examples[:3]), ("b", examples[3:5])], pad, multiple_of=64)
    assert batch.input_ids.shape == (5, 64)
    assert segments == [Segment("a", 0, 3), Segment("b", 3, 5)]
    assert (batch.labels[:, max(e.num_tokens for e in examples[:5]) :] == IGNORE_INDEX).all()


def test_a_packed_row_ends_in_a_padding_sequence_of_no_adapter(base_and_examples):
    base, examples = base_and_examples
    batch, segments = pack_micro_batches([("a", examples[:2]), ("b", examples[2:3])], base.tokenizer.pad_token_id, 64)
    used = sum(e.num_tokens for e in examples[:3])
    length = -(-used // 64) * 64
    assert used % 64 and batch.input_ids.shape == (1, length)
    assert segments[-1] == Segment(None, used, length)
    assert batch.position_ids[0, used] == 0, "the tail is a sequence of its own: nothing attends across"
    assert (batch.labels[0, used:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_right_padded_rows_need_no_attention_mask(tiny_lm_dir, base_and_examples, attention):
    """Causal attention never lets a real token see the padding after it, so the model gives every
    real token the same output with the padding mask and without it."""
    base, examples = base_and_examples
    base = load_base(tiny_lm_dir, device="cpu", attention=attention)
    batch = collate(examples[:4], base.tokenizer.pad_token_id, multiple_of=64)
    with torch.no_grad():
        masked = base.model(**batch.model_inputs()).logits
        causal = base.model(**batch.causal_inputs()).logits
    real = batch.attention_mask.bool()
    assert not real.all(), "the rows must actually be padded"
    torch.testing.assert_close(causal[real], masked[real], rtol=1e-5, atol=1e-5)
