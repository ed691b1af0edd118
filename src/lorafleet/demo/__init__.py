"""The built-in demo: synthetic departments, a fleet trained together, a before/after table."""
