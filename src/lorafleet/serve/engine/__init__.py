"""The engine: continuous batching of mixed-adapter requests over a slot KV cache, a static
decode step (CUDA graphs on a GPU), sampling on the device, incremental text. Knows nothing of
HTTP; never imports the gateway."""
