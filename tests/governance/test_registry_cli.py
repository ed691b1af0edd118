"""`lorafleet registry list|show|diff` reads what training recorded, across fleet directories."""

from __future__ import annotations

import json

from lorafleet.cli import main
from lorafleet.governance.registry import Registry


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_prints_a_table_and_json(trained_fleet, capsys):
    fleet, _ = trained_fleet
    code, table, _ = run(capsys, "registry", "list", "--fleet", str(fleet))
    assert code == 0
    header, *rows = table.splitlines()
    assert header.split()[:3] == ["name", "kind", "id"]
    records = {lineage.name: lineage for lineage in Registry(fleet).all()}
    assert sorted(row.split()[0] for row in rows) == ["hr", "ops"]
    hr_row = next(row for row in rows if row.startswith("hr "))
    assert records["hr"].id[:12] in hr_row and f"{records['hr'].loss['final']:.4f}" in hr_row
    code, listed, _ = run(capsys, "registry", "list", "--fleet", str(fleet), "--json")
    assert code == 0
    assert {item["name"]: item["id"] for item in json.loads(listed)} == {n: r.id for n, r in records.items()}


def test_show_names_parents_and_children_across_fleets(trained_fleet, capsys):
    fleet, continued = trained_fleet
    code, shown, _ = run(capsys, "registry", "show", "hr", "--fleet", str(fleet), "--fleet", str(continued))
    assert code == 0
    hr = Registry(fleet).find("hr")
    hr2 = Registry(continued).find("hr2")
    assert shown.startswith(f"hr (adapter) id {hr.id}")
    assert f"sha256 {hr.data[0].sha256[:16]}" in shown and "8 records" in shown
    assert f"init_from -> hr2 ({hr2.id[:12]})" in shown
    code, shown, _ = run(capsys, "registry", "show", "hr2", "--fleet", str(fleet), "--fleet", str(continued))
    assert "init_from <- hr (" in shown
    code, as_json, _ = run(capsys, "registry", "show", "hr", "--json", "--fleet", str(fleet), "--fleet", str(continued))
    record = json.loads(as_json)
    assert record["id"] == hr.id and record["children"] == [{"relation": "init_from", "name": "hr2", "id": hr2.id}]
    # One registry alone does not know the child, which lives in the other fleet's registry.
    _, alone, _ = run(capsys, "registry", "show", "hr", "--fleet", str(fleet))
    assert "child:" not in alone


def test_diff_names_the_fields_that_differ(trained_fleet, capsys):
    fleet, _ = trained_fleet
    code, text, _ = run(capsys, "registry", "diff", "hr", "ops", "--fleet", str(fleet))
    assert code == 0
    assert "adapter_config.rank: 4 -> 2" in text and "adapter_config.learning_rate: 0.0001 -> 0.001" in text
    assert "base.path" not in text
    _, as_json, _ = run(capsys, "registry", "diff", "hr", "ops", "--fleet", str(fleet), "--json")
    fields = {item["field"]: (item["a"], item["b"]) for item in json.loads(as_json)}
    assert fields["adapter_config.rank"] == (4, 2) and fields["name"] == ("hr", "ops")


def test_an_unknown_name_exits_2_and_lists_what_is_registered(trained_fleet, capsys):
    fleet, continued = trained_fleet
    code, _, err = run(capsys, "registry", "show", "payroll", "--fleet", str(fleet), "--fleet", str(continued))
    assert code == 2
    assert "'payroll'" in err and "registered: hr, hr2, ops" in err
    code, _, err = run(capsys, "registry", "list", "--fleet", str(fleet / "nowhere"))
    assert code == 2 and "has no registry" in err
    assert not (fleet / "nowhere").exists()
