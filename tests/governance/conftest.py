"""One governed fleet, trained once for every governance test (the tiny model trains in about a second)."""

from __future__ import annotations

import pytest

from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.train.trainer import train_fleet
from tests.conftest import write_text_dataset


@pytest.fixture(scope="session")
def trained_fleet(tiny_lm_dir, tmp_path_factory):
    """Two adapters trained together, then, in a second fleet, one continued from the first (init_from)."""
    root = tmp_path_factory.mktemp("governed")
    data = write_text_dataset(root / "hr.jsonl", n=8, seed=0)
    other = write_text_dataset(root / "ops.jsonl", n=6, seed=1)
    adapters = [
        AdapterSpec(name="hr", data=str(data), rank=4, target_modules=["q_proj"], steps=4, seed=3),
        AdapterSpec(name="ops", data=str(other), rank=2, target_modules=["v_proj"], steps=2, learning_rate=1e-3),
    ]
    fleet = root / "fleet"
    train_fleet(FleetSpec(base=str(tiny_lm_dir), output=str(fleet), adapters=adapters, checkpoint_every=2), False)
    more = AdapterSpec(name="hr2", data=str(data), steps=1, init_from=str(fleet / "adapters" / "hr"))
    continued = root / "continued"
    train_fleet(FleetSpec(base=str(tiny_lm_dir), output=str(continued), adapters=[more], checkpoint_every=0), False)
    return fleet, continued
