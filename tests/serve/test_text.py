"""Incremental detokenisation equals decoding everything at once, and cuts at stop strings."""

from __future__ import annotations

from lorafleet.models.tiny import build_tokenizer
from lorafleet.serve.engine.text import IncrementalText

TEXT = "Grüße aus Köln — 東京 🚀 total: 42 EUR. The contract was signed."


def stream(tokenizer, text: str, stop=()) -> tuple[str, bool]:
    incremental = IncrementalText(tokenizer, stop)
    pieces, stopped = [], False
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        stopped = incremental.add(token)
        pieces.append(incremental.flush() if stopped else incremental.ready())
        if stopped:
            break
    if not stopped:
        pieces.append(incremental.flush())
    return "".join(pieces), stopped


def test_streamed_text_equals_the_whole_decode_with_multibyte_characters():
    tokenizer = build_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT.split())  # byte-level pieces: characters span several tokens
    assert stream(tokenizer, TEXT) == (tokenizer.decode(ids), False)


def test_stop_string_cuts_the_reply_and_is_never_streamed():
    tokenizer = build_tokenizer()
    text, stopped = stream(tokenizer, TEXT, stop=("EUR", "zzz"))
    assert stopped and text == "Grüße aus Köln — 東京 🚀 total: 42 "


def test_an_unfinished_character_at_the_end_shows_as_one_shot_decode_does():
    tokenizer = build_tokenizer()
    ids = tokenizer("ok 東", add_special_tokens=False)["input_ids"][:-1]  # cut inside the last character
    incremental = IncrementalText(tokenizer)
    streamed = "".join(incremental.ready() for token in ids if not incremental.add(token))
    assert streamed + incremental.flush() == tokenizer.decode(ids)
