"""Training records what made each adapter: lineage.json, the fleet's registry and the audit log."""

from __future__ import annotations

import hashlib
import json

from lorafleet.governance.audit import verify_chain
from lorafleet.governance.lineage import read_lineage
from lorafleet.governance.registry import Registry, diff
from lorafleet.train.provenance import describe_training_data
from tests.conftest import write_image_dataset


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_registry_rows_match_the_files_real_hashes(trained_fleet, tiny_lm_dir):
    trained_fleet, _ = trained_fleet
    registry = Registry(trained_fleet)
    records = {lineage.name: lineage for lineage in registry.all()}
    assert sorted(records) == ["hr", "ops"]
    hr = records["hr"]
    adapter_dir = trained_fleet / "adapters" / "hr"
    assert hr.weights_sha256 == {"adapter_model.safetensors": sha256(adapter_dir / "adapter_model.safetensors")}
    assert hr.base["weights_sha256"] == {
        path.name: sha256(path) for path in tiny_lm_dir.iterdir() if path.suffix == ".safetensors"
    }
    (data,) = hr.data
    assert data.sha256 == sha256(trained_fleet.parent / "hr.jsonl")
    assert (data.records, data.images, data.skipped) == (8, 0, 0) and data.tokens > 0
    assert read_lineage(adapter_dir).to_dict() == hr.to_dict()  # lineage.json holds the same record
    assert hr.seeds == {"adapter": 3, "fleet": 0} and hr.adapter_config["rank"] == 4
    assert hr.fleet_config["checkpoint_every"] == 2 and hr.software["lorafleet"]
    assert hr.loss["optimizer_steps"] == 4 and len(hr.loss["per_epoch"]) == 1
    assert (
        hr.compute["tokens"] > 0
        and hr.compute["estimated_flops"] == 4 * hr.compute["base_parameters"] * hr.compute["tokens"]
    )
    assert hr.started <= hr.finished


def test_a_continued_adapter_links_to_its_parent(trained_fleet):
    fleet, continued = trained_fleet
    hr, hr2 = Registry(fleet).find("hr"), Registry(continued).find("hr2")
    (parent,) = hr2.parents
    assert (parent["relation"], parent["id"], parent["name"]) == ("init_from", hr.id, "hr")
    assert Registry(continued).children(hr) == [(hr2.id, "init_from")]
    assert Registry(fleet).find(hr.id[:12]).name == "hr"


def test_diff_names_what_differs_between_two_adapters(trained_fleet):
    registry = Registry(trained_fleet[0])
    changed = {key: (a, b) for key, a, b in diff(registry.find("hr"), registry.find("ops"))}
    assert changed["adapter_config.rank"] == (4, 2)
    assert changed["adapter_config.learning_rate"] == (1e-4, 1e-3)
    assert "base.path" not in changed


def test_the_audit_log_records_the_whole_run(trained_fleet):
    trained_fleet, _ = trained_fleet
    assert verify_chain(trained_fleet).entries > 0
    lines = sorted((trained_fleet / "audit").glob("*.jsonl"))[0].read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert events[0] == "train.start" and events.count("train.start") == 1
    assert events.count("train.checkpoint") == 1 and events.count("train.adapter_saved") == 2
    assert events.count("train.finish") == 1 and events[-1] == "train.finish"
    start = json.loads(lines[0])["data"]
    assert start["data"]["hr"]["sha256"] == sha256(trained_fleet.parent / "hr.jsonl")
    checkpoint = next(json.loads(line)["data"] for line in lines if '"train.checkpoint"' in line)
    assert checkpoint["fleet_step"] == 2 and len(checkpoint["sha256"]) == 64


def test_data_description_counts_and_hashes_images(tmp_path):
    data = write_image_dataset(tmp_path / "shapes.jsonl", n=3, seed=0)
    described = describe_training_data(data, [], skipped=0)
    images = [tmp_path / "shapes-images" / f"{index}.png" for index in range(3)]
    digests = "".join(sha256(image) + "\n" for image in images)
    assert described.images == 3
    assert described.images_sha256 == hashlib.sha256(digests.encode()).hexdigest()
