"""`lorafleet eval` stores its scores in the fleet's registry, beside what trained the adapter."""

from __future__ import annotations

import hashlib
import json
import shutil

from lorafleet.cli import main
from lorafleet.governance.audit import verify_chain
from lorafleet.governance.lineage import read_lineage
from lorafleet.governance.registry import Registry
from tests.conftest import write_text_dataset


def test_eval_results_land_in_the_registry_and_lineage_json(trained_fleet, tmp_path, capsys):
    fleet = tmp_path / "fleet"
    shutil.copytree(trained_fleet[0], fleet)  # evaluation adds to the records: keep the shared fleet as trained
    data = write_text_dataset(tmp_path / "held-out.jsonl", n=3, seed=5)
    result = tmp_path / "scores.json"
    argv = ["eval", "--fleet", str(fleet), "--data", str(data), "--max-tokens", "3", "--no-progress"]
    assert main([*argv, "--json", str(result)]) == 0
    capsys.readouterr()
    overall = json.loads(result.read_text())["overall"]
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    for name in ("hr", "ops"):
        scores = Registry(fleet).find(name).evaluation[digest]
        assert scores["data"] == str(data.resolve()) and scores["questions"] == 3 and scores["format"] == "chat"
        assert (scores["accuracy"], scores["token_f1"]) == (overall[name]["accuracy"], overall[name]["token_f1"])
        assert scores["base_accuracy"] == overall["base"]["accuracy"]  # what the adapter adds, in its record
        assert read_lineage(fleet / "adapters" / name).evaluation == {digest: scores}
    assert verify_chain(fleet).entries == verify_chain(trained_fleet[0]).entries + 1
    assert main(["registry", "show", "hr", "--fleet", str(fleet)]) == 0
    assert f"eval:      {data} sha256 {digest[:16]}" in capsys.readouterr().out


def test_two_held_out_files_of_the_same_name_keep_their_own_scores(trained_fleet, tmp_path, capsys):
    fleet = tmp_path / "fleet"
    shutil.copytree(trained_fleet[0], fleet)
    for name in ("eval", "eval2"):
        (tmp_path / name).mkdir()
    first = write_text_dataset(tmp_path / "eval" / "held-out.jsonl", n=2, seed=5)
    second = write_text_dataset(tmp_path / "eval2" / "held-out.jsonl", n=3, seed=6)
    for data in (first, second):
        assert main(["eval", "--fleet", str(fleet), "--data", str(data), "--max-tokens", "2", "--no-progress"]) == 0
    capsys.readouterr()
    evaluation = Registry(fleet).find("hr").evaluation
    by_path = {scores["data"]: scores["questions"] for scores in evaluation.values()}
    assert by_path == {str(first.resolve()): 2, str(second.resolve()): 3}
    assert main(["docs", "hr", "--fleet", str(fleet)]) == 0
    card = (fleet / "adapters" / "hr" / "README.md").read_text()
    assert str(first) in card and str(second) in card
