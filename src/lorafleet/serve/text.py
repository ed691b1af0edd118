"""Turning generated tokens into text that can be streamed safely.

Text is re-decoded from all generated ids (so multi-byte characters split across tokens come out
right); a stream never sends a trailing replacement character (an unfinished character) nor the
last few characters that might still turn out to be the start of a stop string.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self._holdback = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token: int) -> bool:
        """Add a token; True when a stop string appeared (the text is cut before it)."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s, max(0, self.sent - self._holdback)) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def ready(self) -> str:
        """Text that can be sent now."""
        end = len(self.text) - self._holdback
        while end > self.sent and self.text[end - 1] == "\ufffd":
            end -= 1
        return self._take(end)

    def flush(self) -> str:
        """All text not yet sent (the reply is finished)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta
