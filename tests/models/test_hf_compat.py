"""Each seam to transformers' internals (models/hf_compat.py) does what the rest of lorafleet
relies on; a transformers release that moves one fails here first."""

from __future__ import annotations

import torch
from safetensors import safe_open

from lorafleet.models import hf_compat
from lorafleet.models.loading import load_base


def test_inner_and_language_model_of_a_causal_lm_and_a_vlm(tiny_lm_dir, tiny_vlm_dir):
    lm = load_base(tiny_lm_dir)
    assert hf_compat.language_model(lm.model) is hf_compat.inner_model(lm.model)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        hidden = hf_compat.inner_model(lm.model)(input_ids=ids).last_hidden_state
        torch.testing.assert_close(lm.model.get_output_embeddings()(hidden), lm.model(input_ids=ids).logits)
    vlm = load_base(tiny_vlm_dir)
    decoder = hf_compat.language_model(vlm.model)
    assert hasattr(decoder, "layers") and hasattr(decoder, "embed_tokens")
    assert not any("vision" in name for name, _ in decoder.named_modules())


def test_a_checkpointed_layer_runs_its_forward_again_in_backward(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    layer = hf_compat.language_model(base.model).layers[0]
    calls = []
    layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation stops early
    weight = layer.mlp.down_proj.weight.requires_grad_(True)
    hf_compat.checkpoint_layer(layer)
    base.model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
    assert len(calls) == 2 and weight.grad is not None


def test_prefill_with_cache_returns_every_layers_keys_and_values(tiny_lm_dir):
    base = load_base(tiny_lm_dir)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    with torch.no_grad():
        hidden, keys, values = hf_compat.prefill_with_cache(base.model, {"input_ids": ids})
        plain = hf_compat.inner_model(base.model)(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hidden, plain)
    config = base.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    assert len(keys) == len(values) == config.num_hidden_layers
    assert keys[0].shape == values[0].shape == (2, config.num_key_value_heads, 4, head_dim)


def test_a_registered_attention_function_is_the_one_the_model_calls(tiny_lm_dir):
    calls = []

    def counting(module, query, key, value, attention_mask, **kwargs):
        calls.append(query.shape)
        return hf_compat.sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    hf_compat.register_attention("lorafleet_test_counting", counting)
    base = load_base(tiny_lm_dir, attention="lorafleet_test_counting")
    with torch.no_grad():
        base.model(input_ids=torch.tensor([[5, 6, 7]]))
    assert len(calls) == base.model.config.num_hidden_layers


def test_reverted_weight_names_are_the_checkpoints_own(tiny_vlm_dir):
    base = load_base(tiny_vlm_dir)
    state = base.model.state_dict()
    reverted = hf_compat.revert_weight_conversion(base.model, dict(state))
    with safe_open(next(tiny_vlm_dir.glob("*.safetensors")), "pt") as checkpoint:
        stored = set(checkpoint.keys())
    assert set(reverted) <= stored | {k for k in reverted if "lm_head" in k}
    assert set(reverted) != set(state), "InternVL's names differ between the model and its checkpoint"


def test_a_float64_models_norms_compute_in_float64_and_other_dtypes_keep_transformers_forward(tiny_vlm_dir):
    """transformers' RMSNorm rounds to float32 on the way; a float64 base must not (two float64
    runs that differ in the last bits would round apart at float32 boundaries, tests/tolerances.py)."""
    x = torch.randn(3, 5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    base = load_base(tiny_vlm_dir, device="cpu", dtype=torch.float64)
    norm = hf_compat.language_model(base.model).norm
    x = x[..., : norm.weight.shape[0]]
    exact = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    assert (norm(x) - exact).abs().max().item() <= 4 * 2.0**-53 * exact.abs().max().item()
    # the float32 round trip is ~2^-24 off: what the float64 comparison above rules out
    assert (type(norm).forward(norm, x) - exact).abs().max().item() > 2.0**-40
    float32 = load_base(tiny_vlm_dir, device="cpu", dtype=torch.float32)
    assert "forward" not in vars(hf_compat.language_model(float32.model).norm)
