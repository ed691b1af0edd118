"""Preference pairs (DPO, MPO): a prompt, the answer preferred and the answer rejected.

Layouts, one JSON object per line:

  ours (OpenAI):   {"messages": [...prompt turns...], "chosen": "...", "rejected": "..."}
  ours (InternVL): {"image": "a.png", "conversations": [...prompt turns...], "chosen": "...", "rejected": "..."}
  TRL:             {"prompt": [...prompt turns...], "chosen": [{"role": "assistant", "content": "..."}],
                    "rejected": [{"role": "assistant", "content": "..."}]}

An answer is a string, a list of text content parts, or (TRL) a list holding one assistant message.
Each pair becomes two ordinary chat records, prompt + chosen and prompt + rejected, read by the
same parser as SFT data (so images, roles and errors behave the same), and two encoded examples
whose labels cover only the final answer and its end-of-turn token: the tokens whose
log-probabilities the preference losses sum.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorafleet.data.encode import IGNORE_INDEX, Example, encode_record
from lorafleet.data.records import ChatRecord, json_object, parse_record
from lorafleet.errors import DataError
from lorafleet.models.loading import FrozenBase


@dataclass
class PreferencePair:
    chosen: Example  # prompt + chosen answer; labels on the answer only
    rejected: Example
    source: str  # "file:line"

    @property
    def num_tokens(self) -> int:
        return self.chosen.num_tokens + self.rejected.num_tokens

    @property
    def longest(self) -> int:
        return max(self.chosen.num_tokens, self.rejected.num_tokens)


def parse_preference(line: str, root: Path, source: str) -> tuple[ChatRecord, ChatRecord]:
    """The pair on one line as two chat records: prompt + chosen, prompt + rejected."""
    raw = json_object(line, source)
    missing = [key for key in ("chosen", "rejected") if key not in raw]
    if missing:
        raise DataError(
            f"{source}: a preference pair needs 'chosen' and 'rejected' (missing: {', '.join(missing)}); "
            "an SFT record has no place in a dpo/mpo adapter's data"
        )
    chosen, rejected = (_answer(raw[key], f"{source}: {key}") for key in ("chosen", "rejected"))
    if chosen == rejected:
        raise DataError(f"{source}: 'chosen' and 'rejected' are the same answer; the pair teaches nothing")
    records = []
    for answer in (chosen, rejected):
        if "conversations" in raw:
            turns = _prompt(raw["conversations"], source, "conversations")
            record = {"conversations": [*turns, {"from": "gpt", "value": answer}]}
            if "image" in raw:
                record["image"] = raw["image"]
        else:
            key = "prompt" if "prompt" in raw else "messages"
            turns = _prompt(raw.get(key), source, key)
            record = {"messages": [*turns, {"role": "assistant", "content": answer}]}
        records.append(parse_record(json.dumps(record), root, source))
    return records[0], records[1]


def encode_pair(
    chosen: ChatRecord, rejected: ChatRecord, base: FrozenBase, max_tiles: int | None = None, max_seq_len: int = 4096
) -> PreferencePair:
    chosen_example, rejected_example = (
        _final_answer_only(encode_record(record, base, max_tiles, max_seq_len)) for record in (chosen, rejected)
    )
    return PreferencePair(chosen_example, rejected_example, chosen.source)


def load_preference_pairs(
    path: str | Path,
    base: FrozenBase,
    max_tiles: int | None = None,
    max_seq_len: int = 4096,
    skip_bad: bool = False,
) -> tuple[list[PreferencePair], list[str]]:
    """Encoded pairs of `path`, and the errors of skipped ones (only with `skip_bad`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    pairs, skipped = [], []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                chosen, rejected = parse_preference(line, path.parent, f"{path}:{number}")
                pairs.append(encode_pair(chosen, rejected, base, max_tiles, max_seq_len))
            except DataError as err:
                if not skip_bad:
                    raise
                skipped.append(str(err))
    if not pairs:
        first = f"; first problem: {skipped[0]}" if skipped else ""
        raise DataError(f"{path}: no usable preference pairs{first}")
    return pairs, skipped


def read_preference_records(path: str | Path) -> list[ChatRecord]:
    """The prompt + chosen record of every readable pair of `path` (its images, for lineage)."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    records.append(parse_preference(line, path.parent, f"{path}:{number}")[0])
                except DataError:
                    continue
    return records


def _prompt(turns: object, source: str, key: str) -> list:
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: '{key}' must be a non-empty list of the prompt's turns")
    last = turns[-1]
    role = last.get("role", last.get("from")) if isinstance(last, dict) else None
    if role in ("assistant", "gpt"):
        raise DataError(f"{source}: the prompt ends with an assistant turn; the answers go in 'chosen' and 'rejected'")
    return turns


def _answer(value: object, where: str) -> str:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict) and "role" in value[0]:
        if value[0]["role"] != "assistant":  # TRL's conversational layout: one assistant message
            raise DataError(f"{where}: the answer must be an assistant message, got role {value[0]['role']!r}")
        value = value[0].get("content")
    if isinstance(value, list):  # text content parts
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value):
            raise DataError(f"{where}: an answer's content parts must all be text")
        value = "".join(part["text"] for part in value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: the answer must be non-empty text")
    return value


def _final_answer_only(example: Example) -> Example:
    """Keep the labels of the last assistant turn (earlier ones belong to the prompt)."""
    labels = example.labels.clone()
    labelled = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    start, positions = labelled[-1], set(labelled)
    while start - 1 in positions:
        start -= 1
    labels[:start] = IGNORE_INDEX
    return Example(example.input_ids, labels, example.pixel_values, example.source)
