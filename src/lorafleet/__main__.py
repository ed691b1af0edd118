"""`python -m lorafleet`: the CLI, for launchers that run modules (torchrun -m lorafleet train FLEET.yaml)."""

from lorafleet.cli import main

raise SystemExit(main())
