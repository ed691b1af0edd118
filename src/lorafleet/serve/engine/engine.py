"""The in-process generation engine: continuous batching over one base and many adapters.

One background thread owns the model. Each iteration, as vLLM's engine core does (schedule,
execute, update), it (1) admits newly arrived requests, tenants in turn (`waiting.py`): each takes
a slot of the static KV cache (`kv_cache.py`), their prompts are prefilled as one right-padded
batch (a bounded number of prompt tokens per iteration, so that a burst of arrivals never stalls
the running streams for long) and their keys/values copied into their slots; then (2) decodes one
token for every running row in one step of `decode.py` (a CUDA graph on a GPU), each row with its
own adapter and its own sampling, the next tokens chosen on the device (under the row's grammar
when it has one: `grammar.py`, its masks computed beside this thread within a budget: `masks.py`);
and (3) hands each row's token to `output.py` (text, stop strings, events) and retires finished
rows, whose slots are free at once. A request therefore joins the batch at the next token, not
when the current batch ends. Requests, rows and the streams callers read are in `streams.py`.

A row whose logits are not finite, whose prompt does not fit, or whose output cannot be handled
(its text, stop strings or grammar raise, or its reader's event loop has closed), or whose grammar
cannot give its next mask within the budget, ends with one error alone, its slot freed once; the
other rows go on, and a request that started is never prefilled again.

Grammar support (llguidance) is imported when the first request with a grammar arrives: the engine
serves plain requests on an install without it (a GPU image that carries only torch and friends).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING

import torch

from lorafleet.adapters.fleet import LoRAFleet
from lorafleet.data.encode import Example
from lorafleet.models.loading import FrozenBase
from lorafleet.segments import Segment
from lorafleet.serve.engine.decode import GraphDecoder, StepKind, choose_tokens, prefill
from lorafleet.serve.engine.device_sampling import sampling_mode
from lorafleet.serve.engine.kv_cache import SlotKVCache
from lorafleet.serve.engine.masks import MaskWorkers
from lorafleet.serve.engine.output import RowOutput, fail
from lorafleet.serve.engine.sampling import SamplingParams
from lorafleet.serve.engine.streams import Event, ReplyStream, Request, Row, send_quietly
from lorafleet.serve.engine.text import IncrementalText
from lorafleet.serve.engine.waiting import WaitingRequests

if TYPE_CHECKING:
    from lorafleet.serve.engine.grammar import GrammarLimits, Grammars, RowGrammar


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
        grammar_limits: GrammarLimits | None = None,
        max_rows_per_tenant: int | None = None,
    ) -> None:
        """`max_seq_len`: tokens per request (prompt and reply) the KV cache holds, for every one of
        `max_batch` slots. `graphs`: capture the decode step as CUDA graphs (default: on CUDA).
        `fuse_weights`: let the decode step move each projection group's base weights into one
        buffer with the adapters (the model keeps working, on views of it); turn off when the
        model is used for anything that needs its own parameter storage afterwards (saving).
        `grammar_limits`: what a grammar may cost (default: `grammar.GrammarLimits()`).
        `max_rows_per_tenant`: the most rows of the batch the requests of one tenant (the tag
        given to `submit`) hold at once (default: no cap)."""
        self.base = base
        self.fleet = fleet
        self.max_batch = max_batch
        self.model_lock = threading.Lock()  # held for every forward and for adapter loads/unloads
        self.max_rows_per_tenant = max_rows_per_tenant
        self._waiting = WaitingRequests()
        self._waiting_lock = threading.Lock()
        self._wake = threading.Event()
        self._rows: list[Row] = []
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
        self.grammar_limits = grammar_limits
        self._grammars: Grammars | None = None
        self._masks: MaskWorkers | None = None
        self.output = RowOutput(base.tokenizer, self.eos_ids, self.max_positions)

    @property
    def grammars(self) -> Grammars:
        """The compiler of this model's constraints (built on first use: about a second for a
        150k-token vocabulary)."""
        if self._grammars is None:
            from lorafleet.serve.engine.grammar import Grammars  # llguidance: only once a grammar is asked for

            self._grammars = Grammars.for_tokenizer(self.base.tokenizer, self.vocab_size, self.grammar_limits)
        return self._grammars

    @property
    def masks(self) -> MaskWorkers:
        """The threads computing grammar rows' masks (started with the first grammar row)."""
        if self._masks is None:
            limits = self.grammars.limits
            self._masks = MaskWorkers(self.vocab_size, limits.mask_threads, limits.mask_budget_ms / 1000)
        return self._masks

    # --- public interface (any thread) ----------------------------------------------------

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        if self._masks is not None:
            self._masks.close()

    def submit(
        self,
        prompt: Example,
        adapter: str | None,
        params: SamplingParams,
        loop: asyncio.AbstractEventLoop | None = None,
        tenant: str | None = None,
        max_rows: int | None = None,
    ) -> ReplyStream:
        """Queue a request; `tenant` tags whose it is, for fair admission between tenants, and
        `max_rows` caps that tenant's rows (default: `max_rows_per_tenant`)."""
        stream = ReplyStream(loop)
        with self._waiting_lock:
            self._waiting.add(Request(prompt, adapter, params, stream, tenant, max_rows))
        self._wake.set()
        return stream

    def adapters_in_use(self) -> set[str]:
        with self._waiting_lock:
            waiting = {r.adapter for r in self._waiting}
        return {row.request.adapter for row in list(self._rows)} | waiting

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted to the running batch."""
        with self._waiting_lock:
            return len(self._waiting)

    @property
    def alive(self) -> bool:
        """Its thread is serving (started and not stopped)."""
        return self._thread.is_alive() and not self._stop.is_set()

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
        running = Counter(row.request.tenant for row in self._rows)
        with self._waiting_lock:
            arriving = self._waiting.take(self.cache.free_slots, PREFILL_TOKENS, running, self.max_rows_per_tenant)
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
                send_quietly(request.stream, Event("", "error", error=refused[id(request)]))
        arriving = [r for r in arriving if id(r) not in refused]
        if not arriving:
            return
        arriving.sort(key=lambda r: r.adapter or "")  # one routing segment per adapter for prefill
        try:
            self._start(arriving)
        except Exception:  # one of them breaks prefill: find it, never fail the others with it
            # `_start` raises only before any of its rows started (a row whose output handling fails
            # ends alone in `RowOutput.take_tokens`), so no request is prefilled twice.
            for request in arriving:
                try:
                    self._start([request])
                except Exception as err:
                    send_quietly(request.stream, Event("", "error", error=f"{type(err).__name__}: {err}"))
        self._retire()

    def _start(self, requests: list[Request]) -> None:
        """Prefill `requests` into free slots and choose their first tokens (all start, or none: it
        raises only before any row joins the batch). A row whose grammar cannot give its first mask
        joins only to fail alone."""
        slots = [self.cache.take() for _ in requests]
        try:
            rows = self._new_rows(requests, slots)
            grammar_rows = any(row.grammar is not None for row in rows)
            if grammar_rows:
                self.masks.start(rows)  # the first masks compute during the prefill
            logits = self._prefill(rows)
            bitmask, failed = self.masks.gather(rows) if grammar_rows else (None, {})
            host = self._sampling_inputs(rows)
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
        self._take_tokens(rows, tokens, finite, scores, failed)

    def _new_rows(self, requests: list[Request], slots: list[int]) -> list[Row]:
        rows = [
            Row(r, IncrementalText(self.base.tokenizer, r.params.stop), _seed(r.params), slot, r.prompt.num_tokens)
            for r, slot in zip(requests, slots, strict=True)
        ]
        for row in rows:
            if row.request.params.grammar is not None:
                row.grammar = self._row_grammar(row.request.params.grammar)
        return rows

    def _row_grammar(self, grammar) -> RowGrammar:
        """A row's matcher: a copy of a grammar the gateway compiled (`grammar.CompiledGrammar`), or
        one built here from a grammar's text (trusted callers: evaluation, tests)."""
        return self.grammars.matcher(grammar) if isinstance(grammar, str) else grammar.row()

    def _prefill(self, rows: list[Row]) -> torch.Tensor:
        """The rows' prompts through the model, their keys and values into their slots; the last
        prompt token's logits of each."""
        prompts = [row.request.prompt for row in rows]
        with self.fleet.route(_segments([row.request.adapter for row in rows])):
            logits, keys, values = prefill(self.base, prompts, self.base.device)
        self.cache.write_prompts([row.slot for row in rows], keys, values, [p.num_tokens for p in prompts])
        return logits

    def _decode_step(self) -> None:
        rows = self._rows
        slots = self.fleet.routing.slots
        host = self._sampling_inputs(rows)
        host |= {
            "tokens": [row.next_token for row in rows],
            "slots": [row.slot for row in rows],
            "positions": [row.position for row in rows],
            "adapters": [slots.get(row.request.adapter, 0) for row in rows],
        }
        failed: dict[Row, tuple[str, bool]] = {}

        def masks() -> torch.Tensor | None:  # called by the step once its forward is under way
            bitmask, late = self.masks.gather(rows)
            failed.update(late)
            return bitmask

        grammar_rows = any(row.grammar is not None for row in rows)
        tokens, finite, scores = self.decoder.step(
            host, slots, self.fleet.routing.slots_version, masks if grammar_rows else None, host["logprobs"]
        )
        self.cache.advance(host["slots"])
        for row in rows:
            row.position += 1
        self._take_tokens(rows, tokens, finite, scores, failed)
        self._retire()

    def _take_tokens(
        self,
        rows: list[Row],
        tokens: list[int],
        finite: list[bool],
        scores: list[list[float]] | None,
        failed: dict[Row, tuple[str, bool]],
    ) -> None:
        """Hand the chosen tokens to their rows, except those of rows that could not get a mask
        (they end alone, their tokens unused); then start the next masks of the rows going on."""
        for row, (message, client_error) in failed.items():
            fail(row, message, client_error)
        kept = [i for i, row in enumerate(rows) if row not in failed]
        self.output.take_tokens(
            [rows[i] for i in kept],
            [tokens[i] for i in kept],
            [finite[i] for i in kept],
            [scores[i] for i in kept] if scores is not None else None,
        )
        if any(row.grammar is not None for row in rows):
            self.masks.start(rows)

    @staticmethod
    def _sampling_inputs(rows: list[Row]) -> dict:
        return {
            "temperature": [float(row.request.params.temperature) for row in rows],
            "top_p": [float(row.request.params.top_p) for row in rows],
            "seeds": [row.seed for row in rows],
            "logprobs": any(row.request.params.logprobs is not None for row in rows),
        }

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
            failed += self._waiting.drain()
        self._rows = []
        for request in failed:
            send_quietly(request.stream, Event("", "error", error=message))


def _segments(adapters: list[str | None]) -> list[Segment]:
    """Contiguous runs of the same adapter as routing segments (rows are sorted by adapter)."""
    segments: list[Segment] = []
    for row, adapter in enumerate(adapters):
        if segments and segments[-1].adapter == adapter:
            segments[-1] = Segment(adapter, segments[-1].start, row + 1)
        else:
            segments.append(Segment(adapter, row, row + 1))
    return segments


def _stamp_first_token(requests: list[Request]) -> None:
    """Their first tokens are on the host now (`tolist` waited for the device)."""
    now = time.perf_counter()
    for request in requests:
        if request.stream.first_token_at is None:
            request.stream.first_token_at = now


def _seed(params: SamplingParams) -> int:
    """The row's sampling seed, 32 bits (a request without one gets a fresh one)."""
    seed = params.seed if params.seed is not None else time.time_ns()
    return seed % 2**32
