"""`lorafleet eval` on a real (tiny) fleet: every model answers every question through the engine,
and the report holds what the answers say."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.adapters.peft_io import save_adapter
from lorafleet.cli import main
from lorafleet.data.encode import encode_prompt
from lorafleet.errors import ConfigError
from lorafleet.eval.run import EvalOptions, evaluate, read_items
from lorafleet.models.loading import load_base
from tests.conftest import write_image_dataset
from tests.eval.test_mmmu import write_parquet


@pytest.fixture(scope="module")
def fleet_dir(tmp_path_factory, tiny_vlm_dir):
    """base/ and two adapters whose random weights change the answers."""
    root = tmp_path_factory.mktemp("fleet")
    shutil.copytree(tiny_vlm_dir, root / "base")
    base = load_base(root / "base")
    fleet = LoRAFleet(base.model, base.language_prefix)
    for seed, name in enumerate(["finance", "legal"]):
        modules = find_target_modules(base.model, base.language_prefix, ["q_proj", "v_proj", "down_proj"])
        fleet.add_adapter(name, LoRAShape(4, 8.0, 0.0, modules), seed=seed)
        generator = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for weight in fleet.parameters(name):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.3)
        save_adapter(fleet, name, root / "adapters" / name, root / "base")
    return root


def test_every_model_answers_every_mmmu_question_and_is_scored_by_its_answers(fleet_dir, tmp_path, capsys):
    data = write_parquet(tmp_path)
    out = tmp_path / "eval.json"
    argv = ["eval", "--fleet", str(fleet_dir), "--data", str(data), "--json", str(out), "--max-tokens", "6"]
    assert main([*argv, "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert table.split("\n")[0].split() == ["questions", "base", "finance", "legal"]
    assert [line.split()[0] for line in table.splitlines()[2:6]] == ["overall", "Colour", "Count", "Shape"]
    report = json.loads(out.read_text())
    assert report["format"] == "mmmu" and report["models"] == ["base", "finance", "legal"]
    assert len(report["answers"]) == 4 * 3
    assert len({a["reply"] for a in report["answers"]}) > 1, "the adapters change the answers"
    # The tallies are the verdicts on the answers, which are MMMU's verdicts on the replies.
    _, items = read_items(data)
    judges = {item.id: item.judge for item in items}
    for model in report["models"]:
        answers = [a for a in report["answers"] if a["model"] == model]
        for answer in answers:
            assert judges[answer["id"]](answer["reply"]).correct == answer["correct"]
        assert report["overall"][model]["correct"] == sum(a["correct"] for a in answers)
        assert report["overall"][model]["unparseable"] == sum(not a["parsed"] for a in answers)
    # Each prompt went in whole, its images tiled into it.
    base = load_base(fleet_dir / "base")
    assert report["prompt_tokens"] == 3 * sum(encode_prompt(item.prompt, base).num_tokens for item in items)
    assert 0 < report["completion_tokens"] <= 4 * 3 * 6 and report["tokens_per_s"] > 0


def test_chat_jsonl_is_scored_by_exact_match_and_token_f1_for_the_chosen_adapters(fleet_dir, tmp_path):
    data = write_image_dataset(tmp_path / "held-out.jsonl", 4, seed=1)
    report = evaluate(EvalOptions(fleet_dir, data, adapters=["legal"], max_tokens=4), progress=False)
    assert report.format == "chat" and report.models == ["base", "legal"]
    assert all(t.questions == 4 for t in report.overall.values())
    scores = report.to_json()["overall"]["legal"]
    assert 0 <= scores["token_f1"] <= 1 and scores["accuracy"] <= scores["token_f1"] + 1e-9


def test_an_unknown_adapter_names_the_ones_there_are(fleet_dir, tmp_path):
    data = write_image_dataset(tmp_path / "held-out.jsonl", 1, seed=1)
    with pytest.raises(ConfigError, match="marketing not in .* holds: finance, legal"):
        evaluate(EvalOptions(fleet_dir, data, adapters=["marketing"]), progress=False)
