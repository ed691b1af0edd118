"""The upstream backend: generation on vLLM (or any OpenAI-compatible server) behind our gateway.

vLLM serves the fleet's PEFT adapters itself (`--enable-lora --lora-modules name=path`); what it
lacks is tenants, per-key limits and our request log, so the gateway stays in front and forwards
each authorised request, JSON or stream, with the adapter's name as the model. Either lorafleet
starts vLLM (`start_vllm`) or attaches to one already running (`--upstream URL`).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lorafleet.errors import AdapterError, LorafleetError
from lorafleet.serve.gateway.calls import Call
from lorafleet.serve.gateway.errors import APIError

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
STARTUP_TIMEOUT_S = 900.0
BASE_NAME = "base"


class UpstreamBackend:
    def __init__(self, url: str, process: subprocess.Popen | None = None, timeout_s: float = 600.0) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        self.process = process
        self._client = httpx.AsyncClient(base_url=self.url, timeout=timeout_s)
        models = _get_json(f"{self.url}/v1/models")["data"]
        # The base is the model without a parent; every other one is a LoRA adapter on it.
        self.base_model = next((m["id"] for m in models if not m.get("parent")), models[0]["id"])
        self._adapters = {m["id"] for m in models if m.get("parent")}

    @property
    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def running(self) -> int:
        return 0  # not observable from here; the upstream exports its own metrics

    def start(self) -> None:
        pass

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)

    async def ready_problem(self) -> str | None:
        try:
            response = await self._client.get("/health")
        except httpx.TransportError as err:
            return f"the upstream at {self.url} does not answer: {err}"
        return None if response.status_code == 200 else f"the upstream answered {response.status_code}"

    # vLLM's runtime LoRA API (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on the vLLM side).
    def load_adapter(self, name: str, path: str) -> None:
        _post_json(f"{self.url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        self._adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise KeyError(name)
        _post_json(f"{self.url}/v1/unload_lora_adapter", {"lora_name": name})
        self._adapters.discard(name)

    async def chat(self, body, adapter: str | None, call: Call) -> Response:
        payload = body.model_dump(exclude_none=True)
        payload["model"] = adapter or self.base_model
        if body.stream:
            payload["stream_options"] = {**(body.stream_options or {}), "include_usage": True}  # for accounting
        request = self._client.build_request("POST", "/v1/chat/completions", json=payload)
        try:
            response = await self._client.send(request, stream=body.stream)
        except httpx.TransportError as err:
            raise APIError(503, f"the generation backend is unreachable: {err}", "upstream_unavailable") from err
        if response.status_code >= 400:
            await response.aread()
            raise APIError(response.status_code, _upstream_message(response), "upstream_error")
        if not body.stream:
            reply = response.json()
            reply["model"] = call.model
            usage = reply.get("usage") or {}
            call.prompt_tokens, call.completion_tokens = (
                usage.get("prompt_tokens", 0),
                usage.get("completion_tokens", 0),
            )
            call.finish(200)
            return JSONResponse(reply)
        wants_usage = bool((body.stream_options or {}).get("include_usage"))
        return StreamingResponse(_relay(response, call, wants_usage), media_type="text/event-stream")


async def _relay(response: httpx.Response, call: Call, wants_usage: bool) -> AsyncIterator[str]:
    """Forward the upstream's events, renaming the model and taking the usage for accounting."""
    status, error = 200, None
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                call.finish(status, error)  # before [DONE]: a client that hangs up on it must not beat the log
                yield "data: [DONE]\n\n"
                break
            chunk = json.loads(data)
            if "error" in chunk:
                status, error = 500, str(chunk["error"].get("message"))
            if chunk.get("usage"):
                call.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                call.completion_tokens = chunk["usage"].get("completion_tokens", 0)
                if not chunk.get("choices") and not wants_usage:
                    continue  # we asked for usage on our own account; the client did not
            if call.first_token_seconds is None and any(
                c.get("delta", {}).get("content") for c in chunk.get("choices", [])
            ):
                call.first_token_seconds = call.seconds
            chunk["model"] = call.model
            yield f"data: {json.dumps(chunk)}\n\n"
    finally:
        await response.aclose()
        call.finish(status, error)


def start_vllm(base_dir: Path, adapters: dict[str, Path], port: int, extra_args: list[str]) -> UpstreamBackend:
    """Start `vllm serve` on 127.0.0.1 with the fleet's adapters and wait until it answers."""
    if importlib.util.find_spec("vllm") is None:
        raise LorafleetError(
            "--engine vllm needs vLLM, which is not installed here. On a Linux machine with a CUDA GPU: "
            "pip install vllm. Or start vLLM yourself and attach with --upstream http://HOST:PORT"
        )
    ranks = [json.loads((path / "adapter_config.json").read_text())["r"] for path in adapters.values()]
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= max(ranks, default=8)), None)
    if max_rank is None:
        raise AdapterError(f"vLLM supports LoRA ranks up to {VLLM_LORA_RANKS[-1]}; the fleet has rank {max(ranks)}")
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(base_dir),
        "--served-model-name",
        BASE_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-lora",
        "--max-lora-rank",
        str(max_rank),
        "--max-loras",
        str(max(1, len(adapters))),
    ]
    if adapters:
        command += ["--lora-modules", *[f"{name}={path}" for name, path in adapters.items()]]
    process = subprocess.Popen([*command, *extra_args])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LorafleetError(f"vLLM exited with status {process.returncode} while starting; see its output above")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return UpstreamBackend(url, process)
        except httpx.TransportError:
            pass
        time.sleep(2)
    process.terminate()
    raise LorafleetError(f"vLLM did not become healthy within {STARTUP_TIMEOUT_S:.0f} s")


def _get_json(url: str) -> dict:
    try:
        response = httpx.get(url, timeout=30)
    except httpx.TransportError as err:
        raise LorafleetError(f"cannot reach the upstream at {url}: {err}") from err
    if response.status_code != 200:
        raise LorafleetError(f"the upstream answered {response.status_code} for {url}")
    return response.json()


def _post_json(url: str, payload: dict) -> None:
    response = httpx.post(url, json=payload, timeout=600)
    if response.status_code >= 400:
        raise AdapterError(f"the upstream refused: {_upstream_message(response)}")


def _upstream_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or f"status {response.status_code}"
