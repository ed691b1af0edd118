"""Fleet specs: unknown keys and bad values are errors naming the field; README's example parses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lorafleet.config import fleet_spec_from_dict, load_fleet_spec
from lorafleet.errors import ConfigError

README = Path(__file__).resolve().parents[1] / "README.md"
MINIMAL = {"base": "m", "output": "o", "adapters": [{"name": "finance", "data": "f.jsonl"}]}


def test_defaults_fill_in_a_minimal_spec():
    spec = fleet_spec_from_dict(MINIMAL)
    assert spec.adapters[0].rank == 16 and spec.adapters[0].shuffle is True and spec.max_concurrent == 8


def test_variant_fields_parse_from_yaml():
    raw = {**MINIMAL, "adapters": [{"name": "f", "data": "d", "variant": "dora", "use_rslora": True}]}
    adapter = fleet_spec_from_dict(raw).adapters[0]
    assert adapter.variant == "dora" and adapter.use_rslora is True
    assert fleet_spec_from_dict(MINIMAL).adapters[0].variant == "lora"


def test_unknown_key_is_an_error_with_a_suggestion():
    raw = {**MINIMAL, "adapters": [{"name": "finance", "data": "f.jsonl", "rnak": 8}]}
    with pytest.raises(ConfigError, match=r"adapters\[0\] \(finance\): unknown field 'rnak'; did you mean 'rank'\?"):
        fleet_spec_from_dict(raw)


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ({"name": "x"}, "missing required field 'data'"),
        ({"name": "x", "data": "d", "rank": "big"}, "rank must be int"),
        ({"name": "x", "data": "d", "rank": 0}, "rank must be at least 1"),
        ({"name": "x", "data": "d", "steps": 3, "epochs": 1}, "steps or epochs, not both"),
        ({"name": "x", "data": "d", "schedule": "exp"}, "schedule 'exp' is not one of"),
        ({"name": "x", "data": "d", "dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"name": "x", "data": "d", "learning_rate": float("inf")}, "learning_rate must be a finite number"),
        ({"name": "x", "data": "d", "learning_rate": float("nan")}, "learning_rate must be a finite number"),
        ({"name": "x", "data": "d", "weight_decay": -0.1}, "weight_decay must be a finite number, at least 0"),
        ({"name": "x", "data": "d", "max_grad_norm": -1.0}, "max_grad_norm must be a finite number, positive"),
        ({"name": "x", "data": "d", "alpha": -2.0}, "alpha must be a finite number, positive"),
        ({"name": "x", "data": "d", "warmup_steps": -3}, "warmup_steps must be at least 0"),
        ({"name": "v1.2", "data": "d"}, r"adapter name 'v1.2' must be 1-64 letters"),
        ({"name": "base", "data": "d"}, "reserved for the base model"),
        ({"name": "../x", "data": "d"}, "must be 1-64 letters"),
        ({"name": "x", "data": "d", "variant": "vera"}, "variant 'vera' is not one of lora, dora"),
        ({"name": "x", "data": "d", "variant": "dora", "dropout": 0.05}, "variant: dora trains without dropout.*0.05"),
        ({"name": "x", "data": "d", "use_rslora": "yes"}, "use_rslora must be bool"),
        ({"name": "x", "data": "d", "loraplus_lr_ratio": 0}, "loraplus_lr_ratio must be a finite number, positive"),
        ({"name": "x", "data": "d", "init": "svd"}, "init 'svd' is not one of kaiming, gaussian, pissa, olora"),
        ({"name": "x", "data": "d", "init": "pissa", "variant": "dora"}, "init: pissa with variant: dora is not"),
        ({"name": "x", "data": "d", "init": "olora", "init_from": "a"}, "init sets how a new adapter starts"),
    ],
)
def test_bad_adapter_fields_are_named(adapter, message):
    with pytest.raises(ConfigError, match=message):
        fleet_spec_from_dict({**MINIMAL, "adapters": [adapter]})


def test_yaml_infinities_are_refused_too(tmp_path):
    (tmp_path / "fleet.yaml").write_text("base: m\noutput: o\nadapters:\n  - {name: a, data: d, learning_rate: .inf}\n")
    with pytest.raises(ConfigError, match="learning_rate must be a finite number"):
        load_fleet_spec(tmp_path / "fleet.yaml")


def test_numbers_in_exponent_notation_are_numbers(tmp_path):
    """PyYAML reads YAML 1.1, where `1e-3` (no dot, no exponent sign) is a string; people write it
    and mean the number, as YAML 1.2 does. Every numeric field takes it, ints when the value is whole."""
    (tmp_path / "fleet.yaml").write_text(
        "base: m\noutput: o\nmemory_budget_gb: 8e1\nadapters:\n"
        "  - {name: a, data: d, learning_rate: 1e-3, weight_decay: 1E-2, alpha: 3.2e1, beta: 5e-2, steps: 1e3}\n"
    )
    spec = load_fleet_spec(tmp_path / "fleet.yaml")
    adapter = spec.adapters[0]
    assert (adapter.learning_rate, adapter.weight_decay, adapter.alpha, adapter.beta) == (1e-3, 1e-2, 32.0, 5e-2)
    assert adapter.steps == 1000 and isinstance(adapter.steps, int) and spec.memory_budget_gb == 80.0
    (tmp_path / "fleet.yaml").write_text("base: m\noutput: o\nadapters:\n  - {name: a, data: d, steps: 2.5e0}\n")
    with pytest.raises(ConfigError, match="steps must be int"):
        load_fleet_spec(tmp_path / "fleet.yaml")


def test_duplicate_adapter_names_are_an_error():
    with pytest.raises(ConfigError, match="repeated: a"):
        fleet_spec_from_dict({**MINIMAL, "adapters": [{"name": "a", "data": "x"}, {"name": "a", "data": "y"}]})


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        ("data", r"parallel must be a mapping, e\.g\. parallel: \{mode: data\}"),
        ({"mode": "pipeline"}, r"parallel: mode 'pipeline' is not one of adapter, data"),
        ({"mode": "data", "timeout": 5}, r"parallel: unknown field 'timeout'; did you mean 'timeout_minutes'\?"),
        ({"timeout_minutes": 0}, r"timeout_minutes must be a positive number"),
        ({"shard_base": True}, r"shard_base needs mode: data"),
    ],
)
def test_bad_parallel_sections_are_named(parallel, message):
    with pytest.raises(ConfigError, match=message):
        fleet_spec_from_dict({**MINIMAL, "parallel": parallel})


def test_parallel_defaults_to_adapter_mode():
    assert fleet_spec_from_dict(MINIMAL).parallel.mode == "adapter"
    assert fleet_spec_from_dict({**MINIMAL, "parallel": {"mode": "data"}}).parallel.mode == "data"


def test_readme_fleet_example_is_a_valid_spec(tmp_path):
    example = re.search(r"```yaml\n(# fleet\.yaml.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "fleet.yaml").write_text(example)
    spec = load_fleet_spec(tmp_path / "fleet.yaml")
    assert [a.name for a in spec.adapters] == ["finance", "legal"]
    assert spec.adapters[0].data == str(tmp_path / "data/finance.jsonl")
    assert yaml.safe_load(example)["adapters"][1]["steps"] == spec.adapters[1].steps


def test_readme_keys_example_is_a_valid_keys_file(tmp_path):
    from lorafleet.serve.gateway.tenants import load_tenants

    example = re.search(r"```yaml\n(# keys\.yaml.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "keys.yaml").write_text(example)
    tenants = load_tenants(tmp_path / "keys.yaml").tenants
    assert [t.name for t in tenants] == ["finance-team", "ops"] and tenants[1].admin
