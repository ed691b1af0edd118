"""Compression: prune → distil → quantize for the base model (and adapted variants)."""
