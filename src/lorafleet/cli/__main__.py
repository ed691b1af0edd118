"""`python -m lorafleet.cli`: the same command as `lorafleet` and `python -m lorafleet`."""

from lorafleet.cli import main

raise SystemExit(main())
