"""Weight-only quantization (int8, int4, fp8): close to the original, saved in the compressed-tensors
format that lorafleet reloads exactly and transformers + compressed-tensors read the same way."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

from lorafleet.compress.gptq import gptq_linear
from lorafleet.compress.prune import PruneRequest
from lorafleet.compress.quantize import quantize_language_model
from lorafleet.compress.run import CompressOptions, compress
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.data.batch import collate
from lorafleet.data.dataset import load_examples
from lorafleet.errors import ConfigError
from lorafleet.models.loading import load_base
from lorafleet.models.quantized import SCHEMES, QuantizedLinear
from lorafleet.train.trainer import train_fleet
from tests.conftest import write_image_dataset, write_text_dataset

# Documented tolerances: mean per-position KL(original ∥ quantized) on the tiny model, in nats.
KL_TOLERANCE = {"int8": 1e-3, "fp8": 1e-2, "int4": 5e-2}


def batch_logits(base, data, model=None):
    examples, _ = load_examples(data, base)
    batch = collate(examples[:6], base.tokenizer.pad_token_id)
    with torch.no_grad():
        return (model or base.model)(**batch.model_inputs()).logits, batch.attention_mask.bool()


def mean_kl(logits, reference, mask):
    return torch.nn.functional.kl_div(
        logits[mask].log_softmax(-1), reference[mask].log_softmax(-1), log_target=True, reduction="batchmean"
    )


def assert_transformers_reads_the_same_weights(auto_class, path, ours) -> None:
    """transformers with compressed-tensors (the library vLLM reads this format with) dequantizes to
    dense weights in the stored scale dtype (bf16): exactly our weights dequantized in bf16."""
    from transformers.utils.quantization_config import CompressedTensorsConfig

    dense = auto_class.from_pretrained(
        path, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    theirs = dense.state_dict()
    checked = 0
    for name, tensor in ours.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        module = ours.get_submodule(module_name)
        if isinstance(module, QuantizedLinear):
            if leaf == "weight_q":
                assert torch.equal(theirs[f"{module_name}.weight"], module.dequantized(torch.bfloat16).float())
                checked += 1
        elif name in theirs:
            assert torch.equal(theirs[name], tensor), name
    assert checked > 0


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_text_dataset(tmp_path_factory.mktemp("q") / "d.jsonl", n=12, seed=3)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantized_logits_stay_within_the_documented_tolerance(tiny_lm_dir, data, scheme):
    base = load_base(tiny_lm_dir)
    original, mask = batch_logits(base, data)
    names = quantize_language_model(base.language_model, SCHEMES[scheme], scale_dtype=torch.float32)
    assert len(names) == 14
    assert all(isinstance(base.language_model.get_submodule(n), QuantizedLinear) for n in names)
    quantized, _ = batch_logits(base, data)
    assert 0 < mean_kl(quantized, original, mask) < KL_TOLERANCE[scheme]


def test_int4_packs_two_values_per_byte_and_round_trips():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 24, bias=True)
    quantized = QuantizedLinear.from_linear(linear, SCHEMES["int4"], 128, torch.float32)
    assert quantized.weight_q.shape == (24, 128) and quantized.weight_scale.shape == (24, 2)  # groups of 128
    error = (quantized.weight - linear.weight).abs()
    step = quantized.weight_scale.repeat_interleave(128, dim=1)
    assert torch.all(error <= step / 2 + 1e-6)  # round to nearest: never off by more than half a step
    x = torch.randn(5, 256)
    assert torch.allclose(quantized(x), x @ quantized.weight.T + linear.bias, atol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_saved_model_reloads_exactly_and_transformers_reads_the_same_numbers(tiny_lm_dir, data, tmp_path, scheme):
    report = compress(
        CompressOptions(tiny_lm_dir, tmp_path / "q", calib=data, prune=PruneRequest(), quantize=scheme, gptq=False),
        log=lambda _: None,
    )
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    reloaded = load_base(tmp_path / "q")
    assert sum(isinstance(m, QuantizedLinear) for m in reloaded.model.modules()) == 14
    ours, mask = batch_logits(reloaded, data)

    reference = load_base(tiny_lm_dir)  # the same steps in memory: bf16 rounding, then quantization
    from lorafleet.compress.quantize import round_unquantized

    round_unquantized(reference.model, torch.bfloat16)
    quantize_language_model(reference.language_model, SCHEMES[scheme], scale_dtype=torch.bfloat16)
    assert torch.equal(ours, batch_logits(reference, data)[0])

    assert_transformers_reads_the_same_weights(AutoModelForCausalLM, tmp_path / "q", reloaded.model)
    stages = report["stages"]
    assert stages["quantized"]["kl_to_teacher"] < KL_TOLERANCE[scheme]


def test_quantized_vlm_keeps_vision_and_head_and_transformers_loads_it(tiny_vlm_dir, tmp_path):
    images = write_image_dataset(tmp_path / "calib.jsonl", n=6, seed=0)
    compress(
        CompressOptions(tiny_vlm_dir, tmp_path / "q", calib=images, prune=PruneRequest(), quantize="int4"),
        log=lambda _: None,
    )
    ignore = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "lm_head" in ignore and any(name.startswith("vision_tower.") for name in ignore)
    assert any(name.startswith("multi_modal_projector.") for name in ignore)
    reloaded = load_base(tmp_path / "q")
    quantized = {n for n, m in reloaded.model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized and all(n.startswith("model.language_model.layers.") for n in quantized)
    assert_transformers_reads_the_same_weights(AutoModelForImageTextToText, tmp_path / "q", reloaded.model)


def test_unknown_scheme_is_a_clear_error(tiny_lm_dir, data, tmp_path):
    with pytest.raises(ConfigError, match="int4"):
        compress(
            CompressOptions(tiny_lm_dir, tmp_path / "q", calib=data, prune=PruneRequest(), quantize="int3"),
            log=lambda _: None,
        )


def test_adapters_train_on_a_quantized_base(tiny_lm_dir, data, tmp_path):
    compress(
        CompressOptions(tiny_lm_dir, tmp_path / "q", calib=data, prune=PruneRequest(), quantize="int4"),
        log=lambda _: None,
    )
    spec = FleetSpec(
        base=str(tmp_path / "q"),
        output=str(tmp_path / "fleet"),
        adapters=[AdapterSpec(name="a", data=str(data), rank=4, steps=8, learning_rate=1e-2, micro_batch_size=4)],
    )
    result = train_fleet(spec, progress=False)
    assert result.losses["a"][-1] < result.losses["a"][0]


def test_gptq_has_lower_output_error_than_rounding_on_its_calibration_inputs():
    torch.manual_seed(0)
    # inputs that live near a low-dimensional subspace, as activations do: rounding error moved onto
    # other columns can then be cancelled almost entirely (plain rounding cannot)
    x = torch.randn(512, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(512, 64)
    linear = torch.nn.Linear(64, 32, bias=False)
    hessian = 2 * x.T @ x / x.shape[0]
    for scheme in ("int4", "int8"):
        rtn = QuantizedLinear.from_linear(linear, SCHEMES[scheme], 32, torch.float32)
        gptq = gptq_linear(linear, hessian, SCHEMES[scheme], 32, torch.float32)
        reference = linear(x)
        rtn_error = (rtn(x) - reference).pow(2).mean()
        gptq_error = (gptq(x) - reference).pow(2).mean()
        assert gptq_error < 0.3 * rtn_error, scheme
        assert gptq.weight_scale.shape == rtn.weight_scale.shape == (32, 2)


def test_gptq_model_is_closer_to_the_original_than_rounding(tiny_vlm_dir, tmp_path):
    images = write_image_dataset(tmp_path / "calib.jsonl", n=16, seed=0)
    kl = {}
    for gptq in (False, True):
        options = CompressOptions(
            tiny_vlm_dir, tmp_path / f"q{gptq}", calib=images, prune=PruneRequest(), quantize="int4", gptq=gptq
        )
        kl[gptq] = compress(options, log=lambda _: None)["stages"]["quantized"]["kl_to_teacher"]
    assert kl[True] < 0.8 * kl[False]


def test_lorafleet_serve_answers_with_a_compressed_model(tiny_vlm_dir, tmp_path):
    from openai import OpenAI

    from lorafleet.serve.gateway.server import ServeOptions
    from tests.serve.conftest import running_server

    images = write_image_dataset(tmp_path / "calib.jsonl", n=6, seed=0)
    out = tmp_path / "small"
    compress(
        CompressOptions(tiny_vlm_dir, out, calib=images, prune=PruneRequest(mlp=0.5), quantize="int4", gptq=False),
        log=lambda _: None,
    )
    with running_server(ServeOptions(fleet_dir=out)) as (url, _):
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        assert "small" in {m.id for m in client.models.list().data}  # and its alias, "base"
        reply = client.chat.completions.create(
            model="small", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0
        )
        assert reply.usage.completion_tokens > 0


def test_gptq_survives_degenerate_input_statistics():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8, bias=False)
    x = torch.randn(4, 1).repeat(1, 32)  # every input channel identical: a rank-1 Hessian
    hessian = 2 * x.T @ x / x.shape[0]
    quantized = gptq_linear(linear, hessian, SCHEMES["int4"], 32, torch.float32)
    assert torch.isfinite(quantized.weight).all()


def test_engine_serves_adapters_on_an_int4_base_as_the_model_computes(tiny_lm_dir, data, tmp_path):
    """Quantized bases cannot fuse projections in the decode step; the adapter layers take over."""
    from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
    from lorafleet.serve.engine.engine import Engine
    from lorafleet.serve.engine.sampling import SamplingParams

    compress(
        CompressOptions(tiny_lm_dir, tmp_path / "q", calib=data, prune=PruneRequest(), quantize="int4", gptq=False),
        log=lambda _: None,
    )
    base = load_base(tmp_path / "q")
    fleet = LoRAFleet(base.model)
    fleet.add_adapter("a", LoRAShape(8, 16.0, 0.0, find_target_modules(base.model, "", ["q_proj", "up_proj"])), seed=0)
    with torch.no_grad():
        for weight in fleet.parameters("a"):
            weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    examples, _ = load_examples(data, base)
    prompt = examples[0]
    engine = Engine(base, fleet)
    reply = engine.submit(prompt, "a", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    engine.run_until_idle()
    events = list(reply)
    with fleet.use("a", 1), torch.no_grad():
        expected = base.model.generate(
            prompt.input_ids[None], attention_mask=torch.ones_like(prompt.input_ids)[None], max_new_tokens=6,
            do_sample=False, min_new_tokens=6, pad_token_id=base.tokenizer.pad_token_id,
        )[0, prompt.num_tokens :]  # fmt: skip
    assert base.tokenizer.decode(expected, skip_special_tokens=True) == "".join(e.text for e in events)
    assert events[-1].completion_tokens == 6
