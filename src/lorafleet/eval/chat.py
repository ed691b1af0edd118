"""Held-out chats in the trainer's JSONL layouts, scored on the last assistant answer: exact match
(case, surrounding space and a final full stop ignored, as the demo's table does) and token F1
(SQuAD's: the harmonic mean of token precision and recall, punctuation and articles dropped)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lorafleet.data.records import ChatRecord, read_records
from lorafleet.errors import DataError


@dataclass
class ChatQuestion:
    id: str
    record: ChatRecord  # the conversation without its last answer
    answer: str

    def score(self, reply: str) -> tuple[bool, float]:
        return normalise(reply) == normalise(self.answer), token_f1(reply, self.answer)


def read_chats(path: Path) -> list[ChatQuestion]:
    records, _ = read_records(path)
    questions = []
    for record in records:
        if record.messages[-1].role != "assistant":
            raise DataError(f"{record.source}: the last turn must be the assistant's answer to score")
        prompt = ChatRecord(record.messages[:-1], record.images, record.source)
        questions.append(ChatQuestion(record.source.rpartition(":")[2], prompt, record.messages[-1].text))
    return questions


def normalise(text: str) -> str:
    return text.strip().lower().rstrip(".")


def exact_match_accuracy(replies: Sequence[str], answers: Sequence[str]) -> float:
    matches = sum(normalise(reply) == normalise(answer) for reply, answer in zip(replies, answers, strict=True))
    return matches / len(answers)


def reference_answers(records: Sequence[ChatRecord]) -> list[str]:
    """Each record's last turn: the answer its reply is scored against."""
    return [record.messages[-1].text for record in records]


def token_f1(reply: str, answer: str) -> float:
    predicted, gold = _tokens(reply), _tokens(answer)
    if not predicted or not gold:
        return float(predicted == gold)
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()
