"""Training a fleet of adapters together over one frozen base."""
