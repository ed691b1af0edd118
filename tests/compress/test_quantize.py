"""int8 weight-only quantization: close to the original, reloads exactly, carries adapters."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafleet.compress.prune import PruneRequest
from lorafleet.compress.quantize import Int8Linear, quantize_int8
from lorafleet.compress.run import CompressOptions, compress
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.data.batch import collate
from lorafleet.data.dataset import load_examples
from lorafleet.models.loading import load_base
from lorafleet.train.trainer import train_fleet
from tests.conftest import write_text_dataset

# Documented tolerance: per-position KL(original ∥ int8) below 1e-3 nats on the tiny model.
KL_TOLERANCE = 1e-3


def batch_logits(base, data):
    examples, _ = load_examples(data, base)
    batch = collate(examples[:6], base.tokenizer.pad_token_id)
    with torch.no_grad():
        return base.model(**batch.model_inputs()).logits, batch.attention_mask.bool()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("q") / "d.jsonl", n=12, seed=3)


def test_int8_logits_stay_close_to_the_original(tiny_lm_dir, data):
    base = load_base(tiny_lm_dir)
    original, mask = batch_logits(base, data)
    names = quantize_int8(base.language_model)
    assert len(names) == 14 and all(isinstance(base.language_model.get_submodule(n), Int8Linear) for n in names)
    quantized, _ = batch_logits(base, data)
    kl = torch.nn.functional.kl_div(
        quantized[mask].log_softmax(-1), original[mask].log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert 0 < kl < KL_TOLERANCE


def test_quantized_model_reloads_exactly_and_transformers_refuses_it(tiny_lm_dir, data, tmp_path):
    report = compress(
        CompressOptions(tiny_lm_dir, tmp_path / "q", calib=data, prune=PruneRequest(), quantize="int8"),
        log=lambda _: None,
    )
    stages = report["stages"]
    assert stages["quantized"]["bytes"] < 0.6 * stages["original"]["bytes"]  # fp32 embeddings stay
    reference = load_base(tiny_lm_dir)
    quantize_int8(reference.language_model)
    expected, _ = batch_logits(reference, data)
    reloaded, _ = batch_logits(load_base(tmp_path / "q"), data)
    assert torch.equal(reloaded, expected)
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # never int8 numbers read as weights


def test_adapters_train_on_a_quantized_base(tiny_lm_dir, data, tmp_path):
    compress(
        CompressOptions(tiny_lm_dir, tmp_path / "q", calib=data, prune=PruneRequest(), quantize="int8"),
        log=lambda _: None,
    )
    spec = FleetSpec(
        base=str(tmp_path / "q"),
        output=str(tmp_path / "fleet"),
        adapters=[AdapterSpec(name="a", data=str(data), rank=4, steps=8, learning_rate=1e-2, micro_batch_size=4)],
    )
    result = train_fleet(spec, progress=False)
    assert result.losses["a"][-1] < result.losses["a"][0]
