"""DoRA and rsLoRA adapters served beside plain LoRA ones: one engine batch mixing them gives each
row the greedy tokens peft gives its adapter alone; DoRA adapters load and unload while serving;
the vLLM backend refuses DoRA with a message saying where it can be served."""

from __future__ import annotations

import copy
import os

import httpx
import pytest
import torch
from peft import PeftModel

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.adapters.peft_io import load_adapter, save_adapter
from lorafleet.errors import AdapterError
from lorafleet.eval.greedy import GreedyRequest, decode_greedy
from lorafleet.models.loading import load_base
from lorafleet.serve.engine.decode import GraphDecoder
from lorafleet.serve.engine.kv_cache import SlotKVCache
from lorafleet.serve.gateway.server import ServeOptions
from lorafleet.serve.gateway.upstream import vllm_command
from tests.serve.test_decode import ALL, decode_greedily, example, reference_greedy

# name: (rank, targets, use_rslora, use_dora)
ADAPTERS = {"plain": (4, ["q_proj", "v_proj", "down_proj"], False, False), "rs": (8, ALL, True, False),
            "dora": (4, ALL, False, True), "rsdora": (8, ["k_proj", "o_proj", "up_proj"], True, True)}  # fmt: skip
PROMPTS = [[5, 9, 13, 2, 40], [7, 8, 9, 10], [100, 3, 56, 70, 11, 12, 30], [21, 22]]


def add_visible_adapter(fleet: LoRAFleet, base, name: str, seed: int) -> None:
    """`name` as ADAPTERS shapes it, with weights that change the answers (DoRA's magnitudes
    kept near the base's norms, where training leaves them)."""
    rank, targets, rslora, dora = ADAPTERS[name]
    modules = find_target_modules(base.model, "", targets)
    fleet.add_adapter(name, LoRAShape(rank, 2.0 * rank, 0.0, modules, rslora, dora), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, weight in fleet.named_weights(name):
            if key.endswith("lora_magnitude_vector"):
                weight.mul_(1 + 0.3 * torch.randn(weight.shape, generator=generator))
            else:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)


@pytest.fixture(scope="module")
def adapter_dirs(tiny_lm_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("variants")
    base = load_base(tiny_lm_dir)
    fleet = LoRAFleet(base.model)
    for seed, name in enumerate(ADAPTERS, start=1):
        add_visible_adapter(fleet, base, name, seed)
    return {name: save_adapter(fleet, name, root / name, tiny_lm_dir) for name in ADAPTERS}


def peft_greedy(tiny_lm_dir, adapter_dir, prompt: list[int], steps: int) -> list[int]:
    base = load_base(tiny_lm_dir)
    model = PeftModel.from_pretrained(copy.deepcopy(base.model), adapter_dir)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        output = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=base.tokenizer.pad_token_id,
        )
    return output[0, len(prompt) :].tolist()


def test_engine_greedy_tokens_equal_peft_for_a_batch_mixing_dora_rslora_and_plain(tiny_lm_dir, adapter_dirs):
    base = load_base(tiny_lm_dir)
    fleet = LoRAFleet(base.model)
    for name, directory in adapter_dirs.items():
        load_adapter(fleet, name, directory)
    requests = [GreedyRequest(example(prompt), name, f"{name} {i}") for i, prompt in enumerate(PROMPTS)
                for name in ADAPTERS]  # fmt: skip
    steps = 6
    decoded = decode_greedy(base, fleet, requests, max_tokens=steps)
    replies = {}
    for request, reply in zip(requests, decoded.replies, strict=True):
        replies.setdefault(request.adapter, []).append(reply)
    for name, directory in adapter_dirs.items():
        expected = [peft_greedy(tiny_lm_dir, directory, prompt, steps) for prompt in PROMPTS]
        texts = [base.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in expected]
        assert replies[name] == texts, name
    assert len({tuple(replies[name]) for name in ADAPTERS}) == len(ADAPTERS), "each adapter answers differently"


def test_dora_adapters_load_and_unload_while_the_decode_stacks_serve(tiny_lm_dir):
    """A slot that held a DoRA adapter serves a plain one unscaled, and a DoRA adapter loaded later
    into a running decoder gets its own scales."""
    base = load_base(tiny_lm_dir)
    fleet = LoRAFleet(base.model)
    add_visible_adapter(fleet, base, "plain", 1)
    cache = SlotKVCache.for_model(base.language_model, 4, 64, base.dtype, base.device)
    decoder = GraphDecoder(base, cache, graphs=False)
    prompt = PROMPTS[0]

    def served(name: str) -> list[int]:
        produced = decode_greedily(base, fleet, [prompt], [name], [1], 5, cache, decoder)
        cache.release(1)
        return [step[0] for step in produced]

    served("plain")
    add_visible_adapter(fleet, base, "dora", 2)  # loaded while serving
    assert served("dora") == reference_greedy(base, fleet, prompt, "dora", 5)
    fleet.remove_adapter("plain")
    fleet.remove_adapter("dora")
    add_visible_adapter(fleet, base, "rs", 3)  # takes the DoRA adapter's slot
    assert fleet.routing.slots["rs"] == 1
    assert served("rs") == reference_greedy(base, fleet, prompt, "rs", 5)
    add_visible_adapter(fleet, base, "rsdora", 4)
    assert served("rsdora") == reference_greedy(base, fleet, prompt, "rsdora", 5)


def test_the_vllm_backend_refuses_a_dora_adapter_and_says_where_it_serves(adapter_dirs, tmp_path):
    adapters = {"plain": adapter_dirs["plain"], "rs": adapter_dirs["rs"]}
    command, _ = vllm_command(["vllm"], tmp_path, adapters, 8000, None, [])
    assert "--lora-modules" in command, "plain LoRA and rsLoRA adapters go to vLLM"
    with pytest.raises(AdapterError, match="'dora'.*DoRA adapter, which vLLM cannot serve.*lorafleet's own engine"):
        vllm_command(["vllm"], tmp_path, {**adapters, "dora": adapter_dirs["dora"]}, 8000, None, [])


def test_a_running_vllm_backend_refuses_a_dora_adapter_loaded_at_runtime(
    fleet_dir, adapter_dirs, tmp_path, monkeypatch
):
    """Through the admin API of a gateway that launched (a stand-in for) vLLM: the DoRA adapter is
    refused before vLLM is asked, with the reason in OpenAI's error shape."""
    from tests.serve.conftest import free_port, running_server
    from tests.serve.test_vllm_launch import standin_vllm_executable

    vllm = standin_vllm_executable(tmp_path / "vllm-env" / "bin")
    monkeypatch.setenv("PATH", f"{vllm.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("VLLM_STANDIN_RECORD", str(tmp_path / "launch.json"))
    options = ServeOptions(fleet_dir=fleet_dir, engine="vllm", vllm_port=free_port())
    with running_server(options) as (url, server):
        refused = httpx.post(f"{url}/v1/adapters", json={"name": "dora", "path": str(adapter_dirs["dora"])}, timeout=60)
        assert "dora" not in server.adapters
    assert refused.status_code == 400
    assert "DoRA adapter, which vLLM cannot serve" in refused.json()["error"]["message"]
