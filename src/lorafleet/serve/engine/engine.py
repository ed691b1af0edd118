"""The in-process generation engine: continuous batching over one base and many adapters.

One background thread owns the model. Each iteration it (1) admits newly arrived requests: each
takes a slot of the static KV cache (`serve/kv_cache.py`), their prompts are prefilled as one
right-padded batch (a bounded number of prompt tokens per iteration, so that a burst of arrivals
never stalls the running streams for long) and their keys/values copied into their slots; then
(2) decodes one token for every running row in one step of `serve/decode.py` (a CUDA graph on a
GPU), each row with its own adapter and its own sampling, the next tokens chosen on the device
(under the row's grammar when it has one: `grammar.py`); and (3) retires finished rows, whose
slots are free at once. A request therefore joins the batch
at the next token, not when the current batch ends.

A row whose logits are not finite, whose prompt does not fit, or whose output cannot be handled
(its text, stop strings or grammar raise, or its reader's event loop has closed) ends with one
error alone, its slot freed once; the other rows go on, and a request that started is never
prefilled again.

Grammar support (llguidance) is imported when the first request with a grammar arrives: the engine
serves plain requests on an install without it (a GPU image that carries only torch and friends).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.data.encode import Example
from lorafleet.models.loading import FrozenBase
from lorafleet.segments import Segment
from lorafleet.serve.engine.decode import GraphDecoder, StepKind, choose_tokens, prefill
from lorafleet.serve.engine.device_sampling import LOGPROBS_TOP, sampling_mode
from lorafleet.serve.engine.kv_cache import SlotKVCache
from lorafleet.serve.engine.sampling import SamplingParams
from lorafleet.serve.engine.text import IncrementalText, token_bytes

if TYPE_CHECKING:
    from lorafleet.serve.engine.grammar import Grammars, RowGrammar


@dataclass
class Event:
    """A piece of a reply: new text, and on the last event the reason it ended and the usage."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # OpenAI's per-token entries ({"token", "logprob", "bytes", "top_logprobs"}) of the tokens
    # this event completes, when the request asked for logprobs
    logprobs: list[dict] | None = None
    tool_calls: list[dict] | None = None  # tool-call deltas an upstream server parsed itself (relayed)


class EventSource(Protocol):
    """A reply as it is generated: `ReplyStream` here, or a relay of another server's stream."""

    async def next_event(self) -> Event: ...

    def cancel(self) -> None: ...


class ReplyStream:
    """The caller's handle on a submitted request: iterate (or `await next_event()`) for its events.

    Given an event loop, events are handed to it thread-safely, so async handlers never block a
    thread waiting for the engine.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._events: queue.Queue[Event] | asyncio.Queue[Event] = asyncio.Queue() if loop else queue.Queue()
        self.cancelled = False
        # time.perf_counter() when the engine chose the first token (its text may be held back
        # until it is whole UTF-8): time to first token, for benchmarks and metrics
        self.first_token_at: float | None = None

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
    seed: int  # of its sampling (32 bits)
    slot: int  # its KV-cache slot
    position: int  # position id of the next token
    generated: list[int] = field(default_factory=list)
    next_token: int = -1  # sampled, accounted, not yet fed to the model
    finish: str | None = None
    grammar: RowGrammar | None = None
    logprobs: list[dict] = field(default_factory=list)  # entries not yet sent


# Prompt tokens prefilled per iteration (at least one request's): between two prefill batches the
# running streams decode a token, so arrivals delay them by one bounded prefill at a time.
PREFILL_TOKENS = 8192


class Engine:
    def __init__(
        self,
        base: FrozenBase,
        fleet: LoRAFleet,
        max_batch: int = 32,
        max_seq_len: int = 4096,
        graphs: bool | None = None,
        fuse_weights: bool = True,
    ) -> None:
        """`max_seq_len`: tokens per request (prompt and reply) the KV cache holds, for every one of
        `max_batch` slots. `graphs`: capture the decode step as CUDA graphs (default: on CUDA).
        `fuse_weights`: let the decode step move each projection group's base weights into one
        buffer with the adapters (the model keeps working, on views of it); turn off when the
        model is used for anything that needs its own parameter storage afterwards (saving)."""
        self.base = base
        self.fleet = fleet
        self.max_batch = max_batch
        self.model_lock = threading.Lock()  # held for every forward and for adapter loads/unloads
        self._waiting: list[_Request] = []
        self._waiting_lock = threading.Lock()
        self._wake = threading.Event()
        self._rows: list[_Row] = []
        text_config = base.model.config.get_text_config()
        # A row ends at the model's context or the cache's capacity, whichever comes first.
        self.max_positions = min(text_config.max_position_embeddings, max_seq_len)
        self.cache = SlotKVCache.for_model(base.language_model, max_batch, self.max_positions, base.dtype, base.device)
        self.decoder = GraphDecoder(base, self.cache, graphs, fuse_weights)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lorafleet-engine", daemon=True)
        generation_config = base.model.generation_config
        eos = generation_config.eos_token_id
        self.eos_ids = {base.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        self.vocab_size = base.model.get_output_embeddings().weight.shape[0]
        self._grammars: Grammars | None = None
        self._token_texts: dict[int, dict] = {}  # logprob entries' text of each token id seen

    @property
    def grammars(self) -> Grammars:
        """The compiler of this model's constraints (built on first use: about a second for a
        150k-token vocabulary)."""
        if self._grammars is None:
            from lorafleet.serve.engine.grammar import Grammars  # llguidance: only once a grammar is asked for

            self._grammars = Grammars(self.base.tokenizer, self.vocab_size)
        return self._grammars

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
            arriving, budget = [], PREFILL_TOKENS
            while self._waiting and len(arriving) < self.cache.free_slots:
                cost = self._waiting[0].prompt.num_tokens
                if arriving and cost > budget:
                    break
                arriving.append(self._waiting.pop(0))
                budget -= cost
        arriving = [r for r in arriving if not r.stream.cancelled]
        refused = {}
        for request in arriving:
            if request.adapter is not None and request.adapter not in self.fleet.shapes:
                refused[id(request)] = f"adapter {request.adapter!r} is no longer loaded"  # unloaded meanwhile
            elif request.prompt.num_tokens >= self.max_positions:
                refused[id(request)] = (
                    f"the prompt has {request.prompt.num_tokens} tokens; this server holds at most "
                    f"{self.max_positions} per request (prompt and reply)"
                )
        for request in arriving:
            if id(request) in refused:
                _send(request.stream, Event("", "error", error=refused[id(request)]))
        arriving = [r for r in arriving if id(r) not in refused]
        if not arriving:
            return
        arriving.sort(key=lambda r: r.adapter or "")  # one routing segment per adapter for prefill
        try:
            self._start(arriving)
        except Exception:  # one of them breaks prefill: find it, never fail the others with it
            # `_start` raises only before any of its rows started (a row whose output handling fails
            # ends alone in `_take_tokens`), so no request is prefilled twice.
            for request in arriving:
                try:
                    self._start([request])
                except Exception as err:
                    _send(request.stream, Event("", "error", error=f"{type(err).__name__}: {err}"))
        self._retire()

    def _start(self, requests: list[_Request]) -> None:
        """Prefill `requests` into free slots and choose their first tokens (all start, or none: it
        raises only before any row joins the batch)."""
        slots = [self.cache.take() for _ in requests]
        try:
            rows, logits = self._prefill(requests, slots)
            host = self._sampling_inputs(rows)
            bitmask = self._bitmask(rows)
            kind = StepKind(sampling_mode(host["temperature"], host["top_p"]), bitmask is not None, host["logprobs"])
            device = logits.device
            inputs = {name: torch.tensor(host[name], device=device) for name in ("temperature", "top_p", "seeds")}
            if bitmask is not None:
                inputs["bitmask"] = bitmask.to(device)
            positions = torch.tensor([row.position - 1 for row in rows], device=device)  # the last prompt token
            chosen, scores = choose_tokens(logits, inputs, positions, kind)
            tokens, finite = chosen.tolist()
            scores = scores.tolist() if scores is not None else None
            _stamp_first_token(requests)
        except Exception:
            for slot in slots:
                self.cache.release(slot)
            raise
        self._rows += rows
        self._take_tokens(rows, tokens, finite, scores)

    def _prefill(self, requests: list[_Request], slots: list[int]) -> tuple[list[_Row], torch.Tensor]:
        prompts = [r.prompt for r in requests]
        with self.fleet.route(_segments([r.adapter for r in requests])):
            logits, keys, values = prefill(self.base, prompts, self.base.device)
        lengths = [p.num_tokens for p in prompts]
        self.cache.write_prompts(slots, keys, values, lengths)
        rows = [
            _Row(r, IncrementalText(self.base.tokenizer, r.params.stop), _seed(r.params), slot, length)
            for r, slot, length in zip(requests, slots, lengths, strict=True)
        ]
        for row in rows:
            if row.request.params.grammar is not None:
                row.grammar = self.grammars.matcher(row.request.params.grammar)
        return rows, logits

    def _decode_step(self) -> None:
        slots = self.fleet.routing.slots
        host = self._sampling_inputs(self._rows)
        host |= {
            "tokens": [row.next_token for row in self._rows],
            "slots": [row.slot for row in self._rows],
            "positions": [row.position for row in self._rows],
            "adapters": [slots.get(row.request.adapter, 0) for row in self._rows],
        }
        bitmask = self._bitmask(self._rows)
        tokens, finite, scores = self.decoder.step(
            host, slots, self.fleet.routing.slots_version, bitmask, host["logprobs"]
        )
        self.cache.advance(host["slots"])
        for row in self._rows:
            row.position += 1
        self._take_tokens(self._rows, tokens, finite, scores)
        self._retire()

    @staticmethod
    def _sampling_inputs(rows: list[_Row]) -> dict:
        return {
            "temperature": [float(row.request.params.temperature) for row in rows],
            "top_p": [float(row.request.params.top_p) for row in rows],
            "seeds": [row.seed for row in rows],
            "logprobs": any(row.request.params.logprobs is not None for row in rows),
        }

    def _bitmask(self, rows: list[_Row]) -> torch.Tensor | None:
        """The tokens each row may take next, when any row is under a grammar (else None)."""
        if all(row.grammar is None for row in rows):
            return None
        from lorafleet.serve.engine.grammar import bitmask_for  # loaded by the row's grammar already

        bitmask = bitmask_for(len(rows), self.vocab_size)
        for index, row in enumerate(rows):
            if row.grammar is not None:
                row.grammar.fill(bitmask, index)
        return bitmask

    def _take_tokens(
        self, rows: list[_Row], tokens: list[int], finite: list[bool], scores: list[list[float]] | None
    ) -> None:
        """Each row's next token: stream its text and decide whether the row is done.

        Never raises: a row whose output handling fails (accounting, detokenising, stop strings, its
        grammar, a stream that cannot take the event) ends with an error alone, and `_retire` frees
        its slot once. Raising here would fail rows that already started: at admission they would be
        prefilled again while still holding their slots, in a decode step every row would fail."""
        for index, (row, token, ok) in enumerate(zip(rows, tokens, finite, strict=True)):
            try:
                if not ok:
                    _fail(row, "the model produced non-finite logits for this request")
                    continue
                row.next_token = token
                row.finish = self._account(row, scores[index] if scores is not None else None)
            except Exception as err:
                _fail(row, f"{type(err).__name__}: {err}")

    def _account(self, row: _Row, scores: list[float] | None) -> str | None:
        token, params = row.next_token, row.request.params
        finish = None
        if token in self.eos_ids and not params.ignore_eos:
            finish = "stop"
        else:
            row.generated.append(token)
            if params.logprobs is not None and scores is not None:
                row.logprobs.append(self._logprob_entry(token, scores, params.logprobs))
            if row.grammar is not None and not row.grammar.accept(token):
                row.finish = "error"
                row.request.stream.put(Event("", "error", error=f"the grammar refused a token: {row.grammar.error}"))
                return "error"
            if row.text.add(token):
                finish = "stop"  # a stop string appeared
            elif row.grammar is not None and row.grammar.finished:
                finish = "stop"  # the structured reply is complete
            elif len(row.generated) >= params.max_tokens or row.position >= self.max_positions:
                finish = "length"  # row.position is where this token would be fed
        delta = row.text.flush() if finish else row.text.ready()
        if delta or finish:
            logprobs, row.logprobs = (row.logprobs, []) if params.logprobs is not None else (None, row.logprobs)
            prompt_tokens = row.request.prompt.num_tokens
            row.request.stream.put(Event(delta, finish, prompt_tokens, len(row.generated), logprobs=logprobs))
        return finish

    def _logprob_entry(self, token: int, scores: list[float], top: int) -> dict:
        """OpenAI's entry for one token from `device_sampling.token_logprobs`' row."""
        best = [(int(i), lp) for lp, i in zip(scores[1 : 1 + LOGPROBS_TOP], scores[1 + LOGPROBS_TOP :], strict=True)]
        return {
            **self._token_text(token),
            "logprob": scores[0],
            "top_logprobs": [{**self._token_text(i), "logprob": lp} for i, lp in best[:top]],
        }

    def _token_text(self, token: int) -> dict:
        if token not in self._token_texts:
            raw = token_bytes(self.base.tokenizer, token)
            self._token_texts[token] = {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}
        return self._token_texts[token]

    def _retire(self) -> None:
        kept = []
        for row in self._rows:
            if row.finish is None and not row.request.stream.cancelled:
                kept.append(row)
            else:
                self.cache.release(row.slot)
        self._rows = kept

    def _fail_all(self, message: str) -> None:
        failed = [row.request for row in self._rows]
        for row in self._rows:
            self.cache.release(row.slot)
        with self._waiting_lock:
            failed += self._waiting
            self._waiting = []
        self._rows = []
        for request in failed:
            _send(request.stream, Event("", "error", error=message))


def _fail(row: _Row, message: str) -> None:
    """End `row` with an error event (its slot is freed when `_retire` drops it)."""
    row.finish = "error"
    _send(row.request.stream, Event("", "error", error=message))


def _send(stream: ReplyStream, event: Event) -> None:
    """Hand an error event to its stream. A stream that cannot take it (its reader's event loop has
    closed) has nobody left to tell: the failure stops here instead of failing other requests or
    the engine thread."""
    with contextlib.suppress(Exception):
        stream.put(event)


def _segments(adapters: list[str | None]) -> list[Segment]:
    """Contiguous runs of the same adapter as routing segments (rows are sorted by adapter)."""
    segments: list[Segment] = []
    for row, adapter in enumerate(adapters):
        if segments and segments[-1].adapter == adapter:
            segments[-1] = Segment(adapter, segments[-1].start, row + 1)
        else:
            segments.append(Segment(adapter, row, row + 1))
    return segments


def _stamp_first_token(requests: list[_Request]) -> None:
    """Their first tokens are on the host now (`tolist` waited for the device)."""
    now = time.perf_counter()
    for request in requests:
        if request.stream.first_token_at is None:
            request.stream.first_token_at = now


def _seed(params: SamplingParams) -> int:
    """The row's sampling seed, 32 bits (a request without one gets a fresh one)."""
    seed = params.seed if params.seed is not None else time.time_ns()
    return seed % 2**32


def decode_speed(base: FrozenBase, prompts: list[Example], streams: int = 16, tokens: int = 16) -> float:
    """Greedy decode tokens/s of this engine on `base` (no adapters): `streams` of the prompts at
    once, `tokens` each, after a warm-up. The model is left as it was (no weight fusion)."""
    engine = Engine(base, LoRAFleet(base.model), max_batch=streams, fuse_weights=False)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    batch = [prompts[i % len(prompts)] for i in range(streams)]
    engine.submit(batch[0], None, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    engine.run_until_idle()
    started = time.perf_counter()
    replies = [engine.submit(prompt, None, params) for prompt in batch]
    engine.run_until_idle()
    seconds = time.perf_counter() - started
    return sum(list(reply)[-1].completion_tokens for reply in replies) / seconds
