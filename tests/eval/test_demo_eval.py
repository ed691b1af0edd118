"""`lorafleet eval` on the trained demo fleet tells the demo's story: the base answers none of a
department's held-out questions, its adapter answers as the demo's own table says."""

from __future__ import annotations

import json

import pytest

from lorafleet.cli import main


@pytest.mark.slow  # trains the demo fleet (shared with the compression tests)
def test_the_demo_departments_evaluated_show_base_zero_and_adapters_as_in_the_demo_table(trained_demo, tmp_path):
    out, rows = trained_demo
    for row in rows:
        result = tmp_path / f"{row.adapter}.json"
        data = out / "data" / f"{row.adapter}-test.jsonl"
        argv = ["eval", "--fleet", str(out), "--data", str(data), "--adapters", row.adapter]
        assert main([*argv, "--max-tokens", "8", "--json", str(result), "--no-progress"]) == 0
        overall = json.loads(result.read_text())["overall"]
        assert overall["base"]["accuracy"] == row.base_accuracy == 0
        assert overall[row.adapter]["accuracy"] == pytest.approx(row.adapter_accuracy), row
        assert overall[row.adapter]["accuracy"] > 0.5
