"""`lorafleet docs` drafts a model card the Hub's library reads and an Annex IV with all nine points."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import yaml
from huggingface_hub import ModelCard

from lorafleet.cli import main
from lorafleet.governance.audit import list_segments
from lorafleet.governance.lineage import base_model_name
from lorafleet.governance.registry import Registry
from lorafleet.serve.gateway.server import FleetServer, ServeOptions
from lorafleet.serve.gateway.tenants import hash_key, load_tenants


def test_docs_write_a_model_card_with_the_real_hashes_and_an_annex_iv(trained_fleet, tiny_lm_dir, capsys):
    lineage = Registry(trained_fleet[0]).find("hr")
    lineage_dir = lineage.directory
    assert main(["docs", "hr", "--fleet", str(trained_fleet[0]), "--fleet", str(trained_fleet[1])]) == 0
    out = capsys.readouterr().out
    assert f"model card: {lineage_dir}/README.md" in out and "PROVIDER MUST COMPLETE" in out

    card = ModelCard.load(f"{lineage_dir}/README.md")
    data = hashlib.sha256((trained_fleet[0].parent / "hr.jsonl").read_bytes()).hexdigest()
    assert card.data.base_model == tiny_lm_dir.name and card.data.library_name == "peft"  # never a local path
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


def annex_section(fleet: Path, point: str, letter: str) -> str:
    text = (fleet / "adapters" / "hr" / "annex-iv.md").read_text()
    section = re.split(r"^## \d\. .*$", text, flags=re.MULTILINE)[int(point)]
    return section.split(f"({letter}) ", 1)[1].split("\n\n(", 1)[0]


def fresh_copy(trained_fleet, destination: Path) -> Path:
    """The shared fleet as trained (`cp -a`), without documents an earlier test drafted into it."""
    shutil.copytree(trained_fleet[0], destination, symlinks=True)
    for document in destination.glob("adapters/*/*.md"):
        document.unlink()
    return destination


def test_a_copied_fleet_documents_itself_and_leaves_the_original_alone(trained_fleet, tmp_path, capsys):
    original = fresh_copy(trained_fleet, tmp_path / "demo")
    copy = tmp_path / "fleet"
    shutil.copytree(original, copy, symlinks=True)
    assert main(["docs", "hr", "--fleet", str(copy)]) == 0
    assert f"model card: {copy.resolve()}/adapters/hr/README.md" in capsys.readouterr().out
    assert (copy / "adapters" / "hr" / "annex-iv.md").exists()
    assert not list(original.glob("adapters/*/*.md"))  # the old directory untouched
    shutil.rmtree(original)
    assert main(["docs", "hr", "--fleet", str(copy)]) == 0  # and no traceback once it is gone
    assert main(["registry", "show", "hr", "--fleet", str(copy)]) == 0
    assert f"directory: {copy.resolve()}/adapters/hr" in capsys.readouterr().out
    stored = json.loads((copy / "adapters" / "hr" / "lineage.json").read_text())
    assert stored["directory"] == "adapters/hr"  # relative to the fleet, in the file that travels with it


def test_the_annex_says_how_the_fleet_was_served_not_what_lorafleet_could_do(trained_fleet, tmp_path, capsys):
    fleet = fresh_copy(trained_fleet, tmp_path / "fleet")
    assert main(["docs", "hr", "--fleet", str(fleet)]) == 0
    never = annex_section(fleet, "2", "h")
    assert "records no serving of this adapter" in never and "per-tenant" not in never
    assert "no signed checkpoints" in never

    FleetServer(ServeOptions(fleet_dir=fleet)).start().close()
    assert main(["docs", "hr", "--fleet", str(fleet)]) == 0
    open_only = annex_section(fleet, "2", "h")
    assert "1 without API keys" in open_only and "per-tenant API keys" not in open_only

    keys = tmp_path / "keys.yaml"
    keys.write_text(
        yaml.safe_dump({"tenants": [{"name": "hr-team", "key_sha256": hash_key("sk-hr"), "adapters": "*"}]})
    )
    FleetServer(ServeOptions(fleet_dir=fleet, tenants=load_tenants(keys))).start().close()
    assert main(["docs", "hr", "--fleet", str(fleet)]) == 0
    both = annex_section(fleet, "2", "h")
    assert "1 with per-tenant API keys" in both and "hr-team" in both and "1 without API keys" in both
    capsys.readouterr()


def test_a_data_check_of_the_exact_training_file_is_cited_in_2d(trained_fleet, tmp_path, capsys):
    fleet = fresh_copy(trained_fleet, tmp_path / "fleet")
    renamed = tmp_path / "hr-final.jsonl"  # another name, the same bytes as the file hr trained on
    shutil.copy(trained_fleet[0].parent / "hr.jsonl", renamed)
    assert main(["data", "check", str(renamed), "--fleet", str(fleet)]) == 0
    assert main(["docs", "hr", "--fleet", str(fleet)]) == 0
    checks = annex_section(fleet, "2", "d")
    assert "checked by `lorafleet data check`" in checks and "8 records, 0 malformed" in checks
    assert main(["docs", "ops", "--fleet", str(fleet)]) == 0
    other = (fleet / "adapters" / "ops" / "annex-iv.md").read_text()
    assert "no `lorafleet data check` of this file" in other  # ops trained on another file
    capsys.readouterr()


def test_docs_exit_non_zero_and_say_so_when_the_audit_log_fails_verification(trained_fleet, tmp_path, capsys):
    fleet = fresh_copy(trained_fleet, tmp_path / "fleet")
    segment = list_segments(fleet / "audit")[0]
    lines = segment.read_text().splitlines(keepends=True)
    segment.write_text("".join(lines[:1] + lines[2:]))
    assert main(["docs", "hr", "--fleet", str(fleet)]) == 1
    assert "audit log does NOT verify" in capsys.readouterr().err
    annex = (fleet / "adapters" / "hr" / "annex-iv.md").read_text()
    assert "AUDIT LOG DOES NOT VERIFY" in annex and "DOES NOT VERIFY" in annex_section(fleet, "2", "h")


def test_the_base_is_named_by_its_hub_id_or_its_own_name_never_a_local_path(tmp_path):
    recorded = tmp_path / "checkpoints" / "internvl"
    recorded.mkdir(parents=True)
    (recorded / "config.json").write_text(json.dumps({"_name_or_path": "OpenGVLab/InternVL3-1B-hf"}))
    assert base_model_name(recorded) == "OpenGVLab/InternVL3-1B-hf"
    cached = tmp_path / "hub" / "models--OpenGVLab--InternVL3-2B-hf" / "snapshots" / "0123abc"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text(json.dumps({"_name_or_path": str(cached)}))
    assert base_model_name(cached) == "OpenGVLab/InternVL3-2B-hf"
    assert base_model_name(tmp_path / "my-base") == "my-base"
