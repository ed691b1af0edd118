"""Training data: chat records, tokenisation with label masks, image tiling, batches."""
