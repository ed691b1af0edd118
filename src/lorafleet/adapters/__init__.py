"""Multi-adapter LoRA: the layer, model surgery, and PEFT adapter files."""
