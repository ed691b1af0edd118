"""The in-process generation engine: continuous batching over one base and many adapters.

One background thread owns the model. Each iteration it (1) prefills newly arrived requests as one
left-padded batch and merges their KV cache into the running batch, then (2) decodes one token for
every running sequence in a single forward pass, each row with its own adapter (rows are kept
sorted by adapter so that every adapter is one contiguous segment), and (3) retires finished rows.
A request therefore joins the batch at the next token, not when the current batch ends.

Prefill runs through transformers (images included); decode steps run the lean forward of
`serve/decode.py` over a KV cache without padding. Merging and retiring rows are row selections
of that cache.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.data.encode import Example
from lorafleet.models.loading import BaseModel
from lorafleet.segments import Segment
from lorafleet.serve.decode import Decoder, KVCache, prefill
from lorafleet.serve.sampling import SamplingParams, sample_next_token
from lorafleet.serve.text import IncrementalText


@dataclass
class Event:
    """A piece of a reply: new text, and on the last event the reason it ended and the usage."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class ReplyStream:
    """The caller's handle on a submitted request: iterate (or `await next_event()`) for its events.

    Given an event loop, events are handed to it thread-safely, so async handlers never block a
    thread waiting for the engine.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._events: queue.Queue[Event] | asyncio.Queue[Event] = asyncio.Queue() if loop else queue.Queue()
        self.cancelled = False

    def put(self, event: Event) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        else:
            self._events.put(event)

    def get(self, timeout: float | None = None) -> Event:
        return self._events.get(timeout=timeout)

    async def next_event(self) -> Event:
        return await self._events.get()

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._events.get()
            yield event
            if event.finish_reason is not None:
                return

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)  # identity: requests are compared as handles, never by content
class _Request:
    prompt: Example
    adapter: str | None
    params: SamplingParams
    stream: ReplyStream


@dataclass(eq=False)
class _Row:
    """One running sequence of the batch."""

    request: _Request
    text: IncrementalText
    generator: torch.Generator | None
    position: int  # position id of the next token
    generated: list[int] = field(default_factory=list)
    next_token: int = -1  # sampled, accounted, not yet fed to the model
    finish: str | None = None


class Engine:
    def __init__(self, base: BaseModel, fleet: LoRAFleet, max_batch: int = 32) -> None:
        self.base = base
        self.fleet = fleet
        self.max_batch = max_batch
        self.model_lock = threading.Lock()  # held for every forward and for adapter loads/unloads
        self._waiting: list[_Request] = []
        self._waiting_lock = threading.Lock()
        self._wake = threading.Event()
        self._rows: list[_Row] = []
        self._segments_for: tuple[tuple, list[Segment]] = ((), [])
        self._cache: KVCache | None = None
        self.decoder = Decoder(base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lorafleet-engine", daemon=True)
        generation_config = base.model.generation_config
        eos = generation_config.eos_token_id
        self.eos_ids = {base.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.max_positions = base.model.config.get_text_config().max_position_embeddings

    # --- public interface (any thread) ----------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def submit(
        self,
        prompt: Example,
        adapter: str | None,
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> ReplyStream:
        stream = ReplyStream(loop)
        with self._waiting_lock:
            self._waiting.append(_Request(prompt, adapter, params, stream))
        self._wake.set()
        return stream

    def adapters_in_use(self) -> set[str]:
        with self._waiting_lock:
            waiting = {r.adapter for r in self._waiting}
        return {row.request.adapter for row in list(self._rows)} | waiting

    @property
    def running(self) -> int:
        return len(self._rows)

    # --- the engine thread ----------------------------------------------------------------

    def run_until_idle(self) -> None:
        """Serve everything submitted so far in the calling thread (offline batch generation).

        Use either this or `start()`, not both: one thread drives the model.
        """
        while self._rows or self._waiting:
            self._iteration()

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._rows and not self._waiting:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            self._iteration()

    def _iteration(self) -> None:
        try:
            with self.model_lock, torch.no_grad():
                self._admit()
                if self._rows:
                    self._decode_step()
        except Exception as err:  # a failed step fails its requests, never the server
            self._fail_all(f"{type(err).__name__}: {err}")

    def _admit(self) -> None:
        with self._waiting_lock:
            room = self.max_batch - len(self._rows)
            arriving, self._waiting = self._waiting[:room], self._waiting[room:]
        arriving = [r for r in arriving if not r.stream.cancelled]
        unloaded = [r for r in arriving if r.adapter is not None and r.adapter not in self.fleet.shapes]
        for request in unloaded:  # unloaded between the gateway's check and now
            request.stream.put(Event("", "error", error=f"adapter {request.adapter!r} is no longer loaded"))
        arriving = [r for r in arriving if r not in unloaded]
        if not arriving:
            return
        arriving.sort(key=lambda r: r.adapter or "")
        try:
            rows, cache, logits = self._prefill(arriving)
            self._sample(rows, logits)
        except Exception as err:  # a prompt that breaks prefill fails its own batch, not the running rows
            for request in arriving:
                request.stream.put(Event("", "error", error=f"{type(err).__name__}: {err}"))
            return
        self._merge(rows, cache)
        self._retire()

    def _prefill(self, requests: list[_Request]) -> tuple[list[_Row], KVCache, torch.Tensor]:
        prompts = [r.prompt for r in requests]
        with self.fleet.route(_segments([r.adapter for r in requests])):
            logits, cache = prefill(self.base, prompts, self.base.device)
        rows = [
            _Row(r, IncrementalText(self.base.tokenizer, r.params.stop), _generator(r.params), p.num_tokens)
            for r, p in zip(requests, prompts, strict=True)
        ]
        return rows, cache, logits

    def _decode_step(self) -> None:
        tokens = torch.tensor([row.next_token for row in self._rows], device=self.base.device)
        key = tuple(row.request.adapter for row in self._rows)
        if self._segments_for[0] != key:  # the batch's composition changed: rows joined or left
            self._segments_for = (key, _segments(list(key)))
        with self.fleet.route(self._segments_for[1]):
            logits = self.decoder.step(tokens, self._cache)
        for row in self._rows:
            row.position += 1
        self._sample(self._rows, logits)
        self._retire()

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token, stream its text, and decide whether the row is done."""
        greedy = logits.argmax(dim=-1).tolist()  # one call for the whole batch; most rows decode greedily
        for index, (row, best) in enumerate(zip(rows, greedy, strict=True)):
            if row.generator is None:
                row.next_token = best
            else:
                row.next_token = sample_next_token(logits[index], row.request.params, row.generator)
            row.finish = self._account(row)

    def _account(self, row: _Row) -> str | None:
        token, params = row.next_token, row.request.params
        finish = None
        if token in self.eos_ids and not params.ignore_eos:
            finish = "stop"
        else:
            row.generated.append(token)
            if row.text.add(token):
                finish = "stop"  # a stop string appeared
            elif len(row.generated) >= params.max_tokens or row.position >= self.max_positions:
                finish = "length"  # row.position is where this token would be fed
        delta = row.text.flush() if finish else row.text.ready()
        if delta or finish:
            row.request.stream.put(Event(delta, finish, row.request.prompt.num_tokens, len(row.generated)))
        return finish

    def _retire(self) -> None:
        keep = [i for i, row in enumerate(self._rows) if row.finish is None and not row.request.stream.cancelled]
        if len(keep) < len(self._rows):
            self._select(keep)

    # --- batch bookkeeping ----------------------------------------------------------------

    def _merge(self, rows: list[_Row], cache: KVCache) -> None:
        if not self._rows:
            self._rows, self._cache = rows, cache
        else:
            self._rows = self._rows + rows
            self._cache.extend(cache)
        order = sorted(range(len(self._rows)), key=lambda i: self._rows[i].request.adapter or "")
        if order != list(range(len(self._rows))):
            self._select(order)

    def _select(self, indices: list[int]) -> None:
        self._rows = [self._rows[i] for i in indices]
        if not self._rows:
            self._cache = None
            return
        self._cache.select(indices)

    def _fail_all(self, message: str) -> None:
        failed = [row.request for row in self._rows]
        with self._waiting_lock:
            failed += self._waiting
            self._waiting = []
        self._rows, self._cache = [], None
        for request in failed:
            request.stream.put(Event("", "error", error=message))


def _segments(adapters: list[str | None]) -> list[Segment]:
    """Contiguous runs of the same adapter as routing segments (rows are sorted by adapter)."""
    segments: list[Segment] = []
    for row, adapter in enumerate(adapters):
        if segments and segments[-1].adapter == adapter:
            segments[-1] = Segment(adapter, segments[-1].start, row + 1)
        else:
            segments.append(Segment(adapter, row, row + 1))
    return segments


def _generator(params: SamplingParams) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    seed = params.seed if params.seed is not None else time.time_ns() % 2**63
    return torch.Generator().manual_seed(seed)
