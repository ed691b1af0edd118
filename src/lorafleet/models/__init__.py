"""Base models: loading local checkpoints and the built-in tiny models."""
