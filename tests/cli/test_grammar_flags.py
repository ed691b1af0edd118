"""`lorafleet serve`'s structured-output limits: each flag reaches GrammarLimits in the unit it
names, the default its help states is GrammarLimits' own, and docs/security.md lists the flag."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

from lorafleet.cli.serve import GRAMMAR_FLAGS, _grammar_limits, add_serve_parser
from lorafleet.serve.engine.grammar import GrammarLimits

SECURITY_MD = Path(__file__).parents[2] / "docs" / "security.md"


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", "--fleet", "fleet", *argv])


def test_each_flag_sets_its_limit_in_its_unit_and_states_the_true_default():
    defaults = GrammarLimits()
    assert _grammar_limits(parse()) == defaults
    security = SECURITY_MD.read_text()
    for flag, (name, unit, help_text) in GRAMMAR_FLAGS.items():
        stated = float(re.search(r"\(default: ([\d.]+)\)", help_text)[1])
        assert stated * unit == getattr(defaults, name), f"{flag}'s help states another default"
        assert getattr(_grammar_limits(parse(flag, "3")), name) == 3 * unit
        assert f"`{flag}`" in security, f"docs/security.md does not list {flag}"
    assert {name for name, _, _ in GRAMMAR_FLAGS.values()} <= {field.name for field in fields(GrammarLimits)}
