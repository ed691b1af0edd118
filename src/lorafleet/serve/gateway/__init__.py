"""The gateway: the OpenAI-compatible API, tenants with keys and limits, backends (the local
engine, or a vLLM upstream), the request log and metrics."""
