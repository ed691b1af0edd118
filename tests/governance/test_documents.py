"""`lorafleet docs` drafts a model card the Hub's library reads and an Annex IV with all nine points."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from huggingface_hub import ModelCard

from lorafleet.cli import main
from lorafleet.governance.registry import Registry


def test_docs_write_a_model_card_with_the_real_hashes_and_an_annex_iv(trained_fleet, tiny_lm_dir, capsys):
    lineage = Registry(trained_fleet[0]).find("hr")
    lineage_dir = lineage.directory
    assert main(["docs", "hr", "--fleet", str(trained_fleet[0]), "--fleet", str(trained_fleet[1])]) == 0
    out = capsys.readouterr().out
    assert f"model card: {lineage_dir}/README.md" in out and "PROVIDER MUST COMPLETE" in out

    card = ModelCard.load(f"{lineage_dir}/README.md")
    data = hashlib.sha256((trained_fleet[0].parent / "hr.jsonl").read_bytes()).hexdigest()
    assert card.data.base_model == str(tiny_lm_dir) and card.data.library_name == "peft"
    assert card.data.datasets == [f"sha256:{data}"]
    base_weights = hashlib.sha256((tiny_lm_dir / "model.safetensors").read_bytes()).hexdigest()
    assert base_weights in card.text and lineage.id in card.text

    text = Path(lineage_dir, "annex-iv.md").read_text()
    headings = re.findall(r"^## (\d)\. ", text, flags=re.MULTILINE)
    assert headings == [str(point) for point in range(1, 10)]
    section = dict(zip(headings, re.split(r"^## \d\. .*$", text, flags=re.MULTILINE)[1:], strict=True))
    # Filled from the registry where it knows the answer ...
    assert lineage.software["torch"] in section["1"] and str(lineage.hardware["cpus"]) in section["1"]
    assert f"estimated_flops {lineage.compute['estimated_flops']}" in section["2"] and data in section["2"]
    assert "`train.adapter_saved`" in section["6"] and "init_from: `hr2`" in section["6"]
    assert "audit log verified" in section["6"]
    # ... and visibly left to the provider where only the provider can answer.
    for point in ("5", "7", "8"):
        assert "PROVIDER MUST COMPLETE" in section[point]
    assert "intended purpose" in section["1"].split("PROVIDER MUST COMPLETE", 2)[1]
    assert "2 December 2027" in text
