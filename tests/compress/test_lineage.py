"""A compressed model records what it was made from, and its fleet's registry links it both ways."""

from __future__ import annotations

import hashlib
import json

from huggingface_hub import ModelCard

from lorafleet.cli import main
from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.governance.audit import list_segments, verify_chain
from lorafleet.governance.lineage import read_lineage, weight_hashes
from lorafleet.governance.registry import Registry
from lorafleet.train.trainer import train_fleet
from tests.conftest import write_text_dataset


def test_compress_writes_lineage_and_registers_in_the_fleet_it_lies_in(tiny_lm_dir, tmp_path, capsys):
    data = write_text_dataset(tmp_path / "hr.jsonl", n=6, seed=0)
    fleet = tmp_path / "fleet"
    spec = FleetSpec(
        base=str(tiny_lm_dir), output=str(fleet), adapters=[AdapterSpec(name="hr", data=str(data), steps=2)]
    )
    train_fleet(spec, False)
    argv = ["compress", "--base", str(tiny_lm_dir), "--adapter", str(fleet / "adapters" / "hr")]
    assert main([*argv, "--calib", str(data), "--prune-mlp", "0.25", "--out", str(fleet / "small")]) == 0
    assert "registered in" in capsys.readouterr().out

    small = read_lineage(fleet / "small")
    hr = Registry(fleet).find("hr")
    assert small.kind == "model" and small.weights_sha256 == weight_hashes(fleet / "small")
    assert [(p["relation"], p.get("id")) for p in small.parents] == [("compressed_from", None), ("merged", hr.id)]
    assert small.parents[0]["weights_sha256"] == weight_hashes(tiny_lm_dir)
    (calibration,) = small.data
    assert calibration.sha256 == hashlib.sha256(data.read_bytes()).hexdigest() and calibration.records == 6
    assert small.compression["plan"] and small.compression["stages"]["pruned"]["parameters"] > 0
    assert Registry(fleet).find("small").to_dict() == small.to_dict()
    assert Registry(fleet).children(hr) == [(small.id, "merged")]

    assert main(["registry", "show", "hr", "--fleet", str(fleet)]) == 0
    assert f"merged -> small ({small.id[:12]})" in capsys.readouterr().out
    assert verify_chain(fleet).entries > 0
    events = [json.loads(line)["event"] for line in list_segments(fleet / "audit")[-1].read_text().splitlines()]
    assert events[-1] == "compress.finish"

    assert main(["docs", "small", "--fleet", str(fleet)]) == 0
    card = ModelCard.load(fleet / "small" / "README.md")
    assert card.data.library_name == "transformers" and "A model compressed by lorafleet" in card.text
    annex = (fleet / "small" / "annex-iv.md").read_text()
    assert f"made from compressed_from `{tiny_lm_dir}`" in annex and f"merged `hr` ({hr.id})" in annex


def test_compress_outside_a_fleet_writes_lineage_only(tiny_lm_dir, tmp_path, capsys):
    data = write_text_dataset(tmp_path / "calib.jsonl", n=4, seed=1)
    argv = ["compress", "--base", str(tiny_lm_dir), "--calib", str(data), "--prune-mlp", "0.25"]
    assert main([*argv, "--out", str(tmp_path / "small")]) == 0
    assert "registered in" not in capsys.readouterr().out
    lineage = read_lineage(tmp_path / "small")
    assert [p["relation"] for p in lineage.parents] == ["compressed_from"]
    assert not (tmp_path / "lorafleet.sqlite").exists() and not (tmp_path / "audit").exists()
