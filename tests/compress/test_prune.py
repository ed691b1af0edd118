"""Pruning: an identity at 0%, a loadable model otherwise, clear errors for impossible requests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lorafleet.compress.prune import PruneRequest
from lorafleet.compress.run import CompressOptions, compress
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.data.batch import collate
from lorafleet.data.dataset import load_examples
from lorafleet.errors import ConfigError
from lorafleet.models.loading import load_base
from lorafleet.serve.engine.speed import decode_speed
from lorafleet.train.trainer import train_fleet
from tests.conftest import write_image_dataset


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    return write_image_dataset(tmp_path_factory.mktemp("calib") / "calib.jsonl", n=12, seed=0)


def logits(model_dir, calib_file) -> torch.Tensor:
    base = load_base(model_dir)
    examples, _ = load_examples(calib_file, base)
    batch = collate(examples[:4], base.tokenizer.pad_token_id)
    with torch.no_grad():
        return base.model(**batch.model_inputs()).logits


def test_pruning_nothing_is_an_identity(tiny_vlm_dir, calib, tmp_path):
    compress(CompressOptions(tiny_vlm_dir, tmp_path / "same", calib=calib, prune=PruneRequest()), log=lambda _: None)
    assert torch.equal(logits(tmp_path / "same", calib), logits(tiny_vlm_dir, calib))


def test_pruned_model_reloads_with_a_config_that_matches_its_weights(tiny_vlm_dir, calib, tmp_path):
    request = PruneRequest(mlp=0.5, heads=0.5, layers=1)
    options = CompressOptions(tiny_vlm_dir, tmp_path / "small", calib=calib, prune=request)
    report = compress(options, decode_speed=decode_speed)
    config = json.loads((tmp_path / "small" / "config.json").read_text())["text_config"]
    assert (config["num_hidden_layers"], config["intermediate_size"]) == (1, 64)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 16)
    stages = report["stages"]
    assert stages["pruned"]["parameters"] < stages["original"]["parameters"]
    assert stages["pruned"]["bytes"] < stages["original"]["bytes"]
    assert all(stage["tokens_per_s"] > 0 for stage in stages.values())
    reloaded = load_base(tmp_path / "small")
    assert sum(p.numel() for p in reloaded.model.parameters()) == stages["pruned"]["parameters"]
    assert torch.isfinite(logits(tmp_path / "small", calib)).all()


def test_adapters_can_be_refit_on_the_pruned_base(tiny_vlm_dir, calib, tmp_path):
    compress(
        CompressOptions(tiny_vlm_dir, tmp_path / "small", calib=calib, prune=PruneRequest(mlp=0.25)), log=lambda _: None
    )
    adapter = AdapterSpec(name="refit", data=str(calib), rank=4, steps=6, learning_rate=5e-3, micro_batch_size=4)
    result = train_fleet(
        FleetSpec(base=str(tmp_path / "small"), output=str(tmp_path / "fleet"), adapters=[adapter]), progress=False
    )
    assert (result.adapters["refit"] / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (PruneRequest(mlp=1.0), r"--prune-mlp must be in \[0, 1\)"),
        (PruneRequest(heads=0.99), "would remove all 2 key/value groups"),
        (PruneRequest(layers=2), "--prune-layers must be between 0 and 1"),
    ],
)
def test_impossible_requests_are_clear_errors(tiny_vlm_dir, calib, tmp_path, request_, message):
    with pytest.raises(ConfigError, match=message):
        compress(CompressOptions(tiny_vlm_dir, tmp_path / "x", calib=calib, prune=request_), log=lambda _: None)


def test_calibration_data_is_required(tiny_vlm_dir, tmp_path):
    with pytest.raises(ConfigError, match="--calib"):
        compress(CompressOptions(tiny_vlm_dir, tmp_path / "x", prune=PruneRequest(mlp=0.5)), log=lambda _: None)


@pytest.mark.slow
def test_plan_shows_what_would_go_and_writes_nothing(tiny_vlm_dir, calib, tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorafleet.cli",
            "compress",
            "--base",
            str(tiny_vlm_dir),
            "--calib",
            str(calib),
            "--prune-mlp",
            "0.5",
            "--prune-layers",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--plan",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "MLP width: 128 -> 64" in run.stdout and "decoder layers: 2 -> 1" in run.stdout
    assert not (tmp_path / "out").exists()


def test_held_out_data_without_a_scorer_is_a_clear_error_before_any_work(tiny_vlm_dir, calib, tmp_path):
    """Compression cannot decode by itself (it imports neither serving nor evaluation): the caller
    passes the scorer, as the CLI passes lorafleet.eval.greedy.base_exact_match."""
    options = CompressOptions(tiny_vlm_dir, tmp_path / "x", calib=calib, eval_data=calib)
    with pytest.raises(ConfigError, match="eval_data needs exact_match to score it"):
        compress(options, log=lambda _: None)
    assert not (tmp_path / "x").exists()
