"""Serving: the generation engine, the OpenAI-compatible gateway, tenants and limits."""
