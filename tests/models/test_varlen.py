"""Variable-length attention for packed rows equals SDPA with the block-diagonal mask, and the
trainer really takes it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafleet.models import varlen


class Attention(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


def test_packed_row_attention_equals_the_block_diagonal_mask():
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3]
    total = sum(lengths)
    query = torch.randn(1, 4, total, 8, generator=generator)
    key, value = (torch.randn(1, 2, total, 8, generator=generator) for _ in range(2))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    sequence = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (sequence[:, None] == sequence[None, :]) & (torch.arange(total)[:, None] >= torch.arange(total)[None, :])

    ours, _ = varlen.varlen_attention(Attention().eval(), query, key, value, None, position_ids=position_ids)
    reference = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, enable_gqa=True)
    torch.testing.assert_close(ours, reference.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("multiple", "tail"), [(1, 0), (64, 1)], ids=["exact", "bucketed"])
def test_training_with_varlen_runs_sdpa_once_per_packed_sequence(tiny_lm_dir, tmp_path, monkeypatch, multiple, tail):
    """On CPU the reference path: one SDPA call per sequence (the padding tail of a bucketed row is
    one sequence more), never one over the whole row."""
    from lorafleet.config import AdapterSpec, FleetSpec
    from lorafleet.train.trainer import train_fleet
    from tests.conftest import write_text_dataset

    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(varlen.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    data = write_text_dataset(tmp_path / "d.jsonl", n=6, seed=0)
    adapters = [
        AdapterSpec(name=f"a{i}", data=str(data), rank=4, steps=1, micro_batch_size=3, seed=i) for i in range(2)
    ]
    spec = FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "out"), adapters=adapters, checkpoint_every=0,
                     packing=True, attention="varlen", length_multiple=multiple)  # fmt: skip
    train_fleet(spec, progress=False)
    layers, sequences = 2, 2 * 3
    assert len(calls) == layers * (sequences + tail)
