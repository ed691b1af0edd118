"""MMMU-format questions: reading them, prompting as MMMU's reference evaluation does, and its
answer parser.

A question has `id`, `question` (with `<image 1>`…`<image 7>` placeholders), `options` (a list,
or MMMU's string form of one: `"['3 m', '5 m']"`), `answer` (a letter; free text when
`question_type` is `open`), `image_1`…`image_7` (paths relative to the file, or `{"bytes": …}`
cells in MMMU's Parquet files) and optionally `subfield` and `topic_difficulty`.

The prompt and the parsers follow MMMU's `mmmu/utils/data_utils.py` (`construct_prompt`) and
`mmmu/utils/eval_utils.py` (`parse_multi_choice_response`, `parse_open_response`, `eval_open`),
with one deliberate change: where MMMU picks a random letter for an answer it cannot parse, we
return None, so that such answers are counted wrong and reported instead of scoring 1/n by chance.
We also read `B.`, `B)` and `B:` as the letter B (MMMU reads them only at the end of a reply).
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

from lorafleet.data.records import IMAGE_PLACEHOLDER, ChatRecord, Message
from lorafleet.errors import DataError

MAX_IMAGES = 7
DIFFICULTIES = ("Easy", "Medium", "Hard")  # MMMU's topic_difficulty values, easiest first
MULTI_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."
_IMAGE_REF = re.compile(r"<image (\d+)>")


@dataclass
class MMMUQuestion:
    id: str
    question: str
    options: list[str]  # empty for open questions
    answer: str | list[str]  # a letter (or letters); free text for open questions
    open: bool
    images: dict[int, Path | bytes]  # image_<k> by k
    subfield: str = ""
    difficulty: str = ""

    @property
    def letters(self) -> list[str]:
        return [chr(ord("A") + i) for i in range(len(self.options))]

    def prompt(self) -> ChatRecord:
        """One user turn, as MMMU's `construct_prompt` writes it; each `<image k>` becomes an image."""
        if self.open:
            text = f"{self.question}\n{OPEN_INSTRUCTION}"
        else:
            choices = "".join(
                f"({letter}) {option}\n" for letter, option in zip(self.letters, self.options, strict=True)
            )
            text = f"{self.question}\n{choices}\n{MULTI_CHOICE_INSTRUCTION}"
        text, images = self._place_images(text)
        return ChatRecord([Message("user", text)], images, self.id)

    def _place_images(self, text: str) -> tuple[str, list[Path | bytes]]:
        order: list[int] = []

        def replace(match: re.Match) -> str:
            k = int(match.group(1))
            if k not in self.images:
                raise DataError(f"question {self.id}: <image {k}> is referenced but image_{k} is empty")
            if k in order:  # a second mention of the same picture: named, not shown again
                return f"image {k}"
            order.append(k)
            return IMAGE_PLACEHOLDER

        text = _IMAGE_REF.sub(replace, text)
        unplaced = [k for k in sorted(self.images) if k not in order]  # as InternVL does: before the text
        text = IMAGE_PLACEHOLDER * len(unplaced) + ("\n" if unplaced else "") + text
        return text, [self.images[k] for k in unplaced + order]

    def score(self, reply: str) -> tuple[bool, bool]:
        """(correct, parsed): an answer that cannot be parsed is wrong and flagged."""
        if self.open:
            predictions = parse_open_response(reply)
            return bool(predictions) and eval_open(self.answer, predictions), bool(reply.strip())
        letter = parse_multi_choice_response(reply, self.letters, dict(zip(self.letters, self.options, strict=True)))
        golds = self.answer if isinstance(self.answer, list) else [self.answer]
        return letter is not None and letter in golds, letter is not None


def is_mmmu_file(path: Path) -> bool:
    if path.suffix == ".parquet":
        return True
    with path.open(encoding="utf-8") as lines:
        first = next((line for line in lines if line.strip()), "{}")
    try:
        raw = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(raw, dict) and "question" in raw and "answer" in raw


def read_mmmu(path: Path) -> list[MMMUQuestion]:
    """MMMU questions from JSONL or Parquet; every problem names the file and the row."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        where = [f"{path} row {index}" for index in range(len(rows))]
    else:
        rows, where = [], []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
                where.append(f"{path}:{number}")
    if not rows:
        raise DataError(f"{path}: no questions")
    return [_question(row, path.parent, source) for row, source in zip(rows, where, strict=True)]


def _question(row: dict, root: Path, source: str) -> MMMUQuestion:
    missing = [name for name in ("id", "question", "answer") if row.get(name) is None]
    if missing:
        raise DataError(f"{source}: missing {', '.join(missing)}; an MMMU question needs id, question and answer")
    is_open = row.get("question_type", "multiple-choice") == "open"
    options = [] if is_open else _options(row.get("options"), source)
    answer = _answer(row["answer"], is_open)
    if not is_open:
        letters = [chr(ord("A") + i) for i in range(len(options))]
        wrong = [a for a in (answer if isinstance(answer, list) else [answer]) if a not in letters]
        if wrong:
            raise DataError(f"{source}: answer {wrong[0]!r} is not one of the option letters {letters}")
    images = {k: _image(row[f"image_{k}"], root, source) for k in range(1, MAX_IMAGES + 1) if row.get(f"image_{k}")}
    return MMMUQuestion(
        str(row["id"]),
        row["question"],
        options,
        answer,
        is_open,
        images,
        str(row.get("subfield") or ""),
        str(row.get("topic_difficulty") or ""),
    )


def _options(value: object, source: str) -> list[str]:
    if isinstance(value, str):  # MMMU stores the list as its Python repr
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as err:
            raise DataError(f"{source}: options {value[:60]!r} is not a list, nor the string form of one") from err
    if not isinstance(value, list) or not value or not all(isinstance(option, str) for option in value):
        raise DataError(f"{source}: a multiple-choice question needs options, a non-empty list of strings")
    return value


def _answer(value: object, is_open: bool) -> str | list[str]:
    if isinstance(value, str) and value.startswith("[") and not is_open:
        value = ast.literal_eval(value)  # a few MMMU questions accept several letters
    return [str(v) for v in value] if isinstance(value, list) else str(value)


def _image(value: object, root: Path, source: str) -> Path | bytes:
    if isinstance(value, str):
        path = root / value
        if not path.exists():
            raise DataError(f"{source}: image {path} does not exist")
        return path
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
        return value["bytes"]
    raise DataError(f"{source}: an image must be a path relative to the file or a {{'bytes': ...}} cell")


def parse_multi_choice_response(response: str, letters: list[str], options: dict[str, str]) -> str | None:
    """The letter a reply chooses, by MMMU's rules: `(B)`; else a bare `B`; else, in a reply of
    more than five words, an option's text; the last one mentioned wins. None when nothing matches."""
    for char in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(char)
    response = " " + response + " "  # so that a letter matches only as a word
    response = re.sub(r"(?<= )([A-Z])[.):](?= )", r"\1", response)  # "B. Paris", "B) Paris"
    candidates = [letter for letter in letters if f"({letter})" in response]
    marker = "({})"
    if not candidates:
        candidates, marker = [letter for letter in letters if f" {letter} " in response], " {} "
    if not candidates and len(response.split()) > 5:
        lower = response.lower()
        candidates = [letter for letter in letters if options[letter].lower() in lower]
        if len(candidates) > 1:
            return max(candidates, key=lambda letter: lower.rfind(options[letter].lower()))
        return candidates[0] if candidates else None
    if not candidates:
        return None
    return max(candidates, key=lambda letter: response.rfind(marker.format(letter)))


def parse_open_response(response: str) -> list[str | float]:
    """MMMU's candidates for an open answer: the tail after 'is', 'so', 'therefore', … (or '=' in
    the last sentence), every number in them, normalised."""
    response = response.strip().strip(".").lower()
    if not response:
        return []
    keys = []
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    for index, sentence in enumerate(sentences):
        indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
        if index == len(sentences) - 1:
            indicators.append("=")
        tails = [sentence.split(indicator)[-1].strip() for indicator in indicators if indicator in sentence]
        shortest = min(tails, key=len) if tails else ""
        if shortest and shortest not in [":", ",", ".", "!", "?", ";", "'"]:
            keys.append(shortest)
    keys = keys or [response]
    predictions: list[str | float] = []
    numbers = [number for key in keys for number in extract_numbers(key)]
    for candidate in keys + numbers:
        predictions.extend(normalize_str(candidate))
    return list(dict.fromkeys(predictions))


def eval_open(gold: str | list[str], predictions: list[str | float]) -> bool:
    """MMMU's rule: a number must equal a gold number (to 2 decimals); text must contain the gold text."""
    norm_answers = [n for answer in (gold if isinstance(gold, list) else [gold]) for n in normalize_str(answer)]
    for prediction in predictions:
        if isinstance(prediction, str):
            if any(isinstance(answer, str) and answer in prediction for answer in norm_answers):
                return True
        elif prediction in norm_answers:
            return True
    return False


def normalize_str(string: str) -> list[str | float]:
    string = string.strip()
    try:
        return [round(float(string.replace(",", "")), 2)]
    except ValueError:
        string = string.lower()
        return [" " + string, string + " "] if len(string) == 1 else [string]


def extract_numbers(string: str) -> list[str]:
    with_commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", string)
    scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", string)
    simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", string)
    return with_commas + scientific + simple
