"""Turning generated tokens into text that can be streamed safely.

Detokenisation is incremental and constant-time per token (the prefix/read offsets of TGI and
vLLM): each new token is decoded together with a few tokens before it, so byte-level pieces of a
multi-byte character come out right once complete, and a reply of n tokens costs O(n), not O(n²).
A stream never sends the last few characters that might still turn out to be the start of a stop
string.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer, stop: tuple[str, ...] = ()) -> None:
        # The Rust tokenizer itself when there is one: transformers' decode wrapper costs several
        # times the decoding, twice per token per stream.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self._prefix_offset = 0  # ids[prefix_offset:read_offset] is context already turned into text
        self._read_offset = 0
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False  # a stop string cut the text: nothing after it may be sent

    def add(self, token: int) -> bool:
        """Add a token; True when a stop string appeared (the text is cut before it)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix_offset : self._read_offset])
        after = self._decode(self.ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):  # a complete character arrived
            searched_from = max(0, len(self.text) - self._holdback)
            self.text += after[len(before) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                self.stopped = True
                return True
        return False

    def ready(self) -> str:
        """Text that can be sent now."""
        return self._take(len(self.text) - self._holdback)

    def flush(self) -> str:
        """All text not yet sent (the reply is finished), including an unfinished character at the
        end, which decodes as U+FFFD exactly as a one-shot decode shows it."""
        if not self.stopped and self._read_offset < len(self.ids):
            before = self._decode(self.ids[self._prefix_offset : self._read_offset])
            self.text += self._decode(self.ids[self._prefix_offset :])[len(before) :]
            self._read_offset = len(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta


def token_bytes(tokenizer, token: int) -> bytes:
    """The bytes one token stands for (a piece of a multi-byte character included, which a decode
    of the token alone shows as U+FFFD): byte-level BPE vocabularies (GPT-2, Qwen, Llama 3) spell
    each byte as one printable character; other tokens are their text."""
    piece = tokenizer.convert_ids_to_tokens(token)
    if piece is None:
        return b""
    table = _byte_level_alphabet()
    if token not in getattr(tokenizer, "added_tokens_decoder", {}) and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return tokenizer.decode([token]).encode("utf-8")


_ALPHABET: dict[str, int] = {}


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character table, reversed: printable bytes stand for themselves, the others
    for 256 + their rank."""
    if not _ALPHABET:
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        _ALPHABET.update({chr(b): b for b in printable})
        _ALPHABET.update({chr(256 + n): b for n, b in enumerate(others)})
    return _ALPHABET
