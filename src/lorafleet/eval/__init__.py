"""`lorafleet eval`: the base and every adapter on the same held-out questions."""
