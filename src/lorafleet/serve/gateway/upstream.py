"""The upstream backend: generation on vLLM (or any OpenAI-compatible server) behind our gateway.

vLLM serves the fleet's PEFT adapters itself (`--enable-lora --lora-modules name=path`); what it
lacks is tenants, per-key limits and our request log, so the gateway stays in front and forwards
each authorised request with the adapter's name as the model, always streamed; the stream comes
back as the same events the local engine produces, which the gateway formats as JSON or SSE. Either lorafleet
starts vLLM (`start_vllm`) or attaches to one already running (`--upstream URL`). vLLM pins other
versions of transformers than lorafleet, so it is started as a command from an environment of its
own (`--vllm-python`, or `vllm` on PATH), never imported here. vLLM serves plain LoRA and rsLoRA
adapters but not DoRA (its DoRA support is unmerged), so a DoRA adapter is refused here, at launch
and at runtime loading, with a message that says where it can be served.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from lorafleet.errors import AdapterError, ConfigError, LorafleetError
from lorafleet.serve.engine.streams import Event
from lorafleet.serve.gateway.calls import PreparedRequest
from lorafleet.serve.gateway.errors import APIError
from lorafleet.serve.gateway.protocol import ChatCompletionRequest, CompletionParameters, TextCompletionRequest
from lorafleet.serve.gateway.tools import ToolUse

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
STARTUP_TIMEOUT_S = 900.0
DEFAULT_GPU_LORA_SLOTS = 8  # adapters vLLM keeps on the GPU at once (its --max-loras)
RUNTIME_LORA_HEADROOM = 8  # CPU-side room for adapters an admin loads at runtime
BASE_NAME = "base"
DEFAULT_REPLY_TOKENS = 256  # the reply cap assumed for a tenant's token budget when the client sets none


@dataclass(frozen=True)
class UpstreamRequest(PreparedRequest):
    """A request prepared for the upstream: the route and body of each choice's request."""

    route: str
    payload: dict  # one choice's body (n = 1), the adapter's name as the model
    seed: int | None  # the client's; choice i is sent with seed + i


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

    def waiting(self) -> int:
        return 0  # vLLM's queue is vLLM's own (its /metrics: vllm:num_requests_waiting)

    def start(self) -> None:
        pass

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)

    def alive(self) -> bool:
        """The vLLM this server started is still running (one attached to is taken as alive: a
        real check is `ready_problem`, for admins)."""
        return self.process is None or self.process.poll() is None

    async def ready_problem(self) -> str | None:
        try:
            response = await self._client.get("/health")
        except httpx.TransportError as err:
            return f"the upstream at {self.url} does not answer: {err}"
        return None if response.status_code == 200 else f"the upstream answered {response.status_code}"

    # vLLM's runtime LoRA API (needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True on the vLLM side).
    def load_adapter(self, name: str, path: str) -> None:
        refuse_what_vllm_cannot_serve(name, Path(path))
        _post_json(f"{self.url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        self._adapters.add(name)

    def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise KeyError(name)
        _post_json(f"{self.url}/v1/unload_lora_adapter", {"lora_name": name})
        self._adapters.discard(name)

    async def prepare_chat(
        self, body: ChatCompletionRequest, adapter: str | None, tools: ToolUse | None = None, tenant: str = ""
    ) -> UpstreamRequest:
        """Sent on with the adapter's name as the model, always as a stream with usage (what the
        gateway formats, counts and logs is the same for every backend); tools, response_format
        and logprobs go as they came, for the upstream to honour (and compile: `tenant` is unused)."""
        return self._prepare("/v1/chat/completions", body, adapter)

    async def prepare_completion(self, body: TextCompletionRequest, adapter: str | None) -> UpstreamRequest:
        if not isinstance(body.prompt, str):
            raise APIError(400, "this server relays one text prompt per completion request", "invalid_request",
                           "prompt")  # fmt: skip
        return self._prepare("/v1/completions", body, adapter)

    def _prepare(self, route: str, body: CompletionParameters, adapter: str | None) -> UpstreamRequest:
        """One prompt; its tokens are the upstream's to count, so only the replies' cap is known here."""
        payload = body.model_dump(exclude_none=True)
        payload |= {"model": adapter or self.base_model, "stream": True, "stream_options": {"include_usage": True}}
        payload["n"] = 1
        reply_tokens = body.reply_tokens or DEFAULT_REPLY_TOKENS
        return UpstreamRequest((0,), body.n, reply_tokens, route, payload, body.seed)

    async def submit(
        self, request: UpstreamRequest, tenant: str | None = None, max_rows: int | None = None
    ) -> list[UpstreamEvents]:
        """One upstream stream per choice (n = 1 each, seeds seed + i), so every backend's choices
        arrive the same way. vLLM schedules its own batch: the tenant is not passed on."""
        payload = dict(request.payload)
        streams: list[UpstreamEvents] = []
        try:
            for choice in range(request.choices):
                if request.seed is not None:
                    payload["seed"] = request.seed + choice
                streams.append(await self._open(request.route, payload))
        except APIError:
            for stream in streams:
                stream.cancel()
            raise
        return streams

    async def _open(self, route: str, payload: dict) -> UpstreamEvents:
        request = self._client.build_request("POST", route, json=payload)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as err:
            raise APIError(503, f"the generation backend is unreachable: {err}", "upstream_unavailable") from err
        if response.status_code >= 400:
            await response.aread()
            await response.aclose()
            raise APIError(response.status_code, _upstream_message(response), "upstream_error")
        return UpstreamEvents(response)


class UpstreamEvents:
    """An upstream's SSE stream as the engine's events: each piece of text (with its logprobs and
    any tool-call deltas the upstream parsed) as it comes, then one final event with the finish
    reason and the usage (which arrives after the finish reason)."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._lines = response.aiter_lines()
        self._finish: str | None = None
        self._usage: dict = {}

    async def next_event(self) -> Event:
        while True:
            try:
                line = await anext(self._lines)
            except StopAsyncIteration:
                await self._response.aclose()
                if self._finish is None:
                    return Event("", "error", error="the upstream ended the stream early")
                return self._final()
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                await self._response.aclose()
                return self._final()
            chunk = json.loads(data)
            if "error" in chunk:
                await self._response.aclose()
                return Event("", "error", error=str(chunk["error"].get("message")))
            self._usage = chunk.get("usage") or self._usage
            for choice in chunk.get("choices", []):
                self._finish = choice.get("finish_reason") or self._finish
                delta = choice.get("delta") or {}
                text = delta.get("content") or choice.get("text") or ""
                logprobs = _logprob_entries(choice.get("logprobs"))
                if text or logprobs or delta.get("tool_calls"):
                    return Event(text, None, *self._counts(), logprobs=logprobs, tool_calls=delta.get("tool_calls"))

    def cancel(self) -> None:
        asyncio.get_running_loop().create_task(self._response.aclose())  # the client went away

    def _final(self) -> Event:
        return Event("", self._finish or "stop", *self._counts())

    def _counts(self) -> tuple[int, int]:
        return self._usage.get("prompt_tokens", 0), self._usage.get("completion_tokens", 0)


def _logprob_entries(logprobs: dict | None) -> list[dict] | None:
    """An upstream chunk's logprobs as chat entries (text completions send the legacy layout)."""
    if not logprobs:
        return None
    if "content" in logprobs:
        return logprobs["content"] or None
    tokens, scores = logprobs.get("tokens", []), logprobs.get("token_logprobs", [])
    tops = logprobs.get("top_logprobs") or [{} for _ in tokens]
    entries = []
    for token, logprob, top in zip(tokens, scores, tops, strict=True):
        alternatives = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in (top or {}).items()]
        entry = {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": alternatives}
        entries.append(entry)
    return entries or None


VLLM_MODULE = "vllm.entrypoints.cli.main"  # what the `vllm` executable runs
VLLM_SETUP = (
    "vLLM pins other versions of transformers and llguidance than lorafleet, so it lives in an environment "
    "of its own: python3 -m venv ~/vllm-env && ~/vllm-env/bin/pip install vllm (Linux, a CUDA GPU), then "
    "--vllm-python ~/vllm-env/bin/python, or put ~/vllm-env/bin on PATH. Or start vLLM yourself and attach "
    "with --upstream http://HOST:PORT"
)


def vllm_launcher(python: Path | None = None) -> list[str]:
    """How to run vLLM's command line: the Python of vLLM's own environment (`--vllm-python`),
    else a `vllm` executable on PATH, else this interpreter when vLLM is importable here."""
    if python is not None:
        if not (python.is_file() and os.access(python, os.X_OK)):
            raise ConfigError(
                f"--vllm-python {python} is not an executable file; give the python of the environment "
                "vLLM is installed in, e.g. ~/vllm-env/bin/python"
            )
        return [str(python), "-m", VLLM_MODULE]  # not resolved: a venv's python is a link out of the venv
    executable = shutil.which("vllm")
    if executable:
        return [executable]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", VLLM_MODULE]
    raise LorafleetError(f"--engine vllm needs vLLM; none was found (no --vllm-python, no vllm on PATH). {VLLM_SETUP}")


def refuse_what_vllm_cannot_serve(name: str, path: Path) -> None:
    """A DoRA adapter (`use_dora` in its PEFT config) is an AdapterError: vLLM cannot apply its
    magnitude vectors, and a DoRA adapter without them is another model. A path this host cannot
    read is left to the upstream to judge."""
    config_file = path / "adapter_config.json"
    if config_file.is_file() and json.loads(config_file.read_text()).get("use_dora"):
        raise AdapterError(
            f"adapter {name!r} ({path}) is a DoRA adapter, which vLLM cannot serve; serve this fleet with "
            "lorafleet's own engine (leave out --engine vllm / --upstream), which serves DoRA beside LoRA, "
            "or train the adapter with variant: lora"
        )


def vllm_command(
    launcher: list[str],
    base_dir: Path,
    adapters: dict[str, Path],
    port: int,
    gpu_slots: int | None,
    extra_args: list[str],
) -> tuple[list[str], dict[str, str]]:
    """The `vllm serve` command line and environment for the fleet: every adapter registered, a
    few of them on the GPU at once (`--max-loras`, the GPU's LoRA slots; vLLM swaps the others in
    from CPU memory, `--max-cpu-loras`, which also leaves room for adapters loaded at runtime),
    runtime loading allowed, and the user's own arguments last (so they win)."""
    for name, path in adapters.items():
        refuse_what_vllm_cannot_serve(name, path)
    ranks = [json.loads((path / "adapter_config.json").read_text())["r"] for path in adapters.values()]
    max_rank = next((r for r in VLLM_LORA_RANKS if r >= max(ranks, default=8)), None)
    if max_rank is None:
        raise AdapterError(f"vLLM supports LoRA ranks up to {VLLM_LORA_RANKS[-1]}; the fleet has rank {max(ranks)}")
    gpu_slots = gpu_slots or max(1, min(len(adapters), DEFAULT_GPU_LORA_SLOTS))
    cpu_slots = max(gpu_slots, len(adapters) + RUNTIME_LORA_HEADROOM)
    command = [
        *launcher,
        "serve", str(base_dir),
        "--served-model-name", BASE_NAME,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--enable-lora",
        "--max-lora-rank", str(max_rank),
        "--max-loras", str(gpu_slots),
        "--max-cpu-loras", str(cpu_slots),
    ]  # fmt: skip
    if adapters:
        command += ["--lora-modules", *[f"{name}={path}" for name, path in adapters.items()]]
    environment = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")  # admin loads at runtime
    # Zero egress: vLLM reports usage statistics unless told not to, and the base is a local directory.
    environment |= {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    return [*command, *extra_args], environment


def start_vllm(
    base_dir: Path,
    adapters: dict[str, Path],
    port: int,
    extra_args: list[str],
    gpu_slots: int | None = None,
    python: Path | None = None,
) -> UpstreamBackend:
    """Start `vllm serve` on 127.0.0.1 with the fleet's adapters and wait until it answers. vLLM
    runs as a separate process, so it may come from another environment (`python`, or PATH)."""
    launcher = vllm_launcher(python)
    command, environment = vllm_command(launcher, base_dir, adapters, port, gpu_slots, extra_args)
    process = subprocess.Popen(command, env=environment)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise LorafleetError(
                f"vLLM ({' '.join(launcher)}) exited with status {process.returncode} while starting; "
                "see its output above"
            )
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
