"""Per-token output of the running rows: the text each new token completes, stop strings, grammar
advance, log-probability entries, the reason a row ends — and the event its stream gets.

The engine loop calls `RowOutput.take_tokens` after every prefill and decode step with the tokens
chosen on the device. It never raises: a row whose output cannot be handled ends alone (see
`take_tokens`), so one request's bad stop string or closed stream never fails the batch.
"""

from __future__ import annotations

from lorafleet.serve.engine.device_sampling import LOGPROBS_TOP
from lorafleet.serve.engine.streams import Event, Row, send_quietly
from lorafleet.serve.engine.text import token_bytes


class RowOutput:
    """Turns chosen tokens into each row's events, for one model's tokenizer."""

    def __init__(self, tokenizer, eos_ids: set[int], max_positions: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_positions = max_positions  # a row ends when its next token would be fed here
        self._token_texts: dict[int, dict] = {}  # logprob entries' text of each token id seen

    def take_tokens(
        self, rows: list[Row], tokens: list[int], finite: list[bool], scores: list[list[float]] | None
    ) -> None:
        """Each row's next token: stream its text and decide whether the row is done.

        Never raises: a row whose output handling fails (accounting, detokenising, stop strings, its
        grammar, a stream that cannot take the event) ends with an error alone, and the engine frees
        its slot once when it retires the row. Raising here would fail rows that already started: at
        admission they would be prefilled again while still holding their slots, in a decode step
        every row would fail."""
        for index, (row, token, ok) in enumerate(zip(rows, tokens, finite, strict=True)):
            try:
                if not ok:
                    fail(row, "the model produced non-finite logits for this request")
                    continue
                row.next_token = token
                row.finish = self._account(row, scores[index] if scores is not None else None)
            except Exception as err:
                fail(row, f"{type(err).__name__}: {err}")

    def _account(self, row: Row, scores: list[float] | None) -> str | None:
        token, params = row.next_token, row.request.params
        finish = None
        if token in self.eos_ids and not params.ignore_eos:
            finish = "stop"
        else:
            row.generated.append(token)
            if params.logprobs is not None and scores is not None:
                row.logprobs.append(self._logprob_entry(token, scores, params.logprobs))
            if row.grammar is not None and not row.grammar.accept(token):
                # masked, so only one of llguidance's limits can have stopped it: the schema's fault
                fail(row, row.grammar.refusal, client_error=True)
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
            raw = token_bytes(self.tokenizer, token)
            self._token_texts[token] = {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}
        return self._token_texts[token]


def fail(row: Row, message: str, client_error: bool = False) -> None:
    """End `row` with an error event (its slot is freed when the engine retires it);
    `client_error`: the request's own fault, not the server's."""
    row.finish = "error"
    send_quietly(row.request.stream, Event("", "error", error=message, client_error=client_error))
