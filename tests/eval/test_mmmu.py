"""MMMU-format questions: read from JSONL and Parquet, prompted as MMMU's reference evaluation does,
answers parsed by its rules (never guessed), and tallied exactly as a hand count says."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lorafleet.errors import DataError
from lorafleet.eval.mmmu import parse_multi_choice_response, parse_open_response, read_mmmu
from lorafleet.eval.run import EvalReport, format_report, read_items, score

LETTERS = ["A", "B", "C", "D"]
OPTIONS = {"A": "red", "B": "green", "C": "blue", "D": "a yellow star"}

# Replies models really give, and the letter MMMU's rules read from them (None: unparseable). Checked
# against MMMU's own parse_multi_choice_response: it agrees on every row, except that it picks a random
# letter where we say None, and reads "C. blue" / "C) blue" only by that chance.
REPLIES = [
    ("B", "B"),
    ("B.", "B"),
    ("(B)", "B"),
    ("(b)", None),  # MMMU's letters are capitals
    ("The answer is (C).", "C"),
    ("Answer: C", "C"),
    ("C. blue", "C"),
    ("C) blue", "C"),
    ("The correct option is D", "D"),
    ("Between (A) and (C), the answer is (C)", "C"),  # the last one mentioned wins
    ("A or B? I would say B", "B"),
    ("I think the shape in the picture is green.", "B"),  # more than five words: an option's text
    ("It looks green to me, not red at all really", "A"),  # both named: the last one wins
    ("green", None),  # five words or fewer name no option by text
    ("I cannot tell.", None),
    ("", None),
    ("E", None),  # not one of the choices
    ("The answer is E, none of these.", None),
]


@pytest.mark.parametrize(("reply", "letter"), REPLIES)
def test_the_parser_reads_real_answers_as_mmmu_does_and_never_guesses(reply, letter):
    assert parse_multi_choice_response(reply, LETTERS, OPTIONS) == letter


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("42", [42.0]),
        ("So the total is 42.", {42.0}),  # numbers are compared as numbers, to 2 decimals
        ("The capital is Paris", {"paris"}),
        ("x = 3.14159", {3.14}),
        ("There are 41 dots.", {"there are 41 dots", 41.0}),
        ("1,200 m", {"1,200 m", 1200.0, 200.0}),  # MMMU's number patterns also find the 200: kept as it is
    ],
)
def test_open_answers_are_parsed_into_mmmu_candidates(reply, expected):
    assert set(parse_open_response(reply)) == set(expected)


def png(colour: str, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


QUESTIONS = [
    {
        "id": "q1",
        "question": "Compare <image 1> and <image 2>. Which one is green?",
        "options": "['red', 'green', 'blue']",  # MMMU's string form
        "answer": "B",
        "images": {1: "red", 2: "green"},
        "subfield": "Colour",
        "topic_difficulty": "Hard",
    },
    {
        "id": "q2",
        "question": "Which shape is drawn in <image 2>?",
        "options": ["circle", "square", "triangle", "a yellow star"],
        "answer": "D",
        "images": {1: "blue", 2: "yellow"},  # image 1 is not mentioned: it goes before the text
        "subfield": "Shape",
        "topic_difficulty": "Easy",
    },
    {
        "id": "q3",
        "question": "How many dots are in <image 1>, <image 2> and <image 3> together? See <image 1> again.",
        "question_type": "open",
        "answer": "42",
        "images": {1: "black", 2: "white", 3: "gray"},
        "subfield": "Count",
        "topic_difficulty": "Hard",
    },
    {
        "id": "q4",
        "question": "Which city is shown in <image 1>?",
        "question_type": "open",
        "answer": "Paris",
        "images": {1: "purple"},
        "subfield": "Count",  # and no topic_difficulty
    },
]

# What two models replied, and the hand count below.
HAND_REPLIES = {
    "base": ["The answer is (C).", "I cannot tell.", "There are 41 dots.", ""],
    "tuned": ["(A) red", "D. a yellow star", "So the total is 42.", "The city is paris"],
}
# base: q1 C (wrong); q2 unparseable; q3 41 (wrong); q4 empty (unparseable)  -> 0 of 4, 2 unparseable
# tuned: q1 A (wrong); q2 D (right); q3 42 (right); q4 paris (right)         -> 3 of 4, 0 unparseable
# per subfield: Colour base 0/1 tuned 0/1; Shape 0/1, 1/1; Count (q3, q4) 0/2, 2/2
# per difficulty: Easy (q2) base 0/1 tuned 1/1; Hard (q1, q3) 0/2, 1/2; q4 has none


def write_jsonl(directory) -> object:
    rows = []
    for question in QUESTIONS:
        row = {k: v for k, v in question.items() if k != "images"}
        for k, colour in question["images"].items():
            (directory / f"{question['id']}-{k}.png").write_bytes(png(colour))
            row[f"image_{k}"] = f"{question['id']}-{k}.png"
        rows.append(row)
    path = directory / "mmmu.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(directory) -> object:
    """MMMU's own layout: options as strings, images as {"bytes", "path"} cells, absent ones null."""
    columns = {name: [] for name in ["id", "question", "options", "answer", "question_type", "subfield"]}
    columns["topic_difficulty"] = []
    columns |= {f"image_{k}": [] for k in range(1, 8)}
    for question in QUESTIONS:
        options = question.get("options", [])
        columns["id"].append(question["id"])
        columns["question"].append(question["question"])
        columns["options"].append(options if isinstance(options, str) else repr(options))
        columns["answer"].append(question["answer"])
        columns["question_type"].append(question.get("question_type", "multiple-choice"))
        columns["subfield"].append(question["subfield"])
        columns["topic_difficulty"].append(question.get("topic_difficulty"))
        for k in range(1, 8):
            colour = question["images"].get(k)
            columns[f"image_{k}"].append({"bytes": png(colour), "path": f"{k}.png"} if colour else None)
    path = directory / "mmmu.parquet"
    pq.write_table(pa.table(columns), path)
    return path


@pytest.fixture(params=["jsonl", "parquet"])
def mmmu_file(request, tmp_path):
    return write_jsonl(tmp_path) if request.param == "jsonl" else write_parquet(tmp_path)


def hand_counted(mmmu_file) -> EvalReport:
    kind, items = read_items(mmmu_file)
    assert kind == "mmmu"
    replies = [reply for index in range(4) for reply in (HAND_REPLIES["base"][index], HAND_REPLIES["tuned"][index])]
    return score(str(mmmu_file), kind, items, ["base", "tuned"], replies)


def test_an_mmmu_file_is_scored_exactly_as_the_hand_count_says(mmmu_file):
    report = hand_counted(mmmu_file)
    base, tuned = report.overall["base"], report.overall["tuned"]
    assert (base.questions, base.correct, base.unparseable) == (4, 0, 2)
    assert (tuned.questions, tuned.correct, tuned.unparseable) == (4, 3, 0)
    by_subfield = {
        name: {model: (t.correct, t.questions) for model, t in tallies.items()}
        for name, tallies in report.by_subfield.items()
    }
    assert by_subfield == {
        "Colour": {"base": (0, 1), "tuned": (0, 1)},
        "Shape": {"base": (0, 1), "tuned": (1, 1)},
        "Count": {"base": (0, 2), "tuned": (2, 2)},
    }
    assert json.loads(json.dumps(report.to_json()))["overall"]["tuned"]["accuracy"] == 0.75


def test_mmmu_accuracy_is_tallied_per_topic_difficulty_in_mmmus_order(mmmu_file):
    report = hand_counted(mmmu_file)
    by_difficulty = json.loads(json.dumps(report.to_json()))["by_difficulty"]
    assert list(by_difficulty) == ["Easy", "Hard"], "easiest first; q4 has no difficulty and is in neither"
    assert {
        name: {model: (t["correct"], t["questions"]) for model, t in tallies.items()}
        for name, tallies in by_difficulty.items()
    } == {"Easy": {"base": (0, 1), "tuned": (1, 1)}, "Hard": {"base": (0, 2), "tuned": (1, 2)}}
    table = {line[:24].strip(): line[24:].split() for line in format_report(report).splitlines()[2:-1]}
    assert list(table) == ["overall", "Colour", "Count", "Shape", "difficulty: Easy", "difficulty: Hard", "unparseable"]
    assert table["difficulty: Easy"] == ["1", "0.0%", "(0)", "100.0%", "(1)"]
    assert table["difficulty: Hard"] == ["2", "0.0%", "(0)", "50.0%", "(1)"]


def test_every_answer_in_the_json_carries_the_gold_answer_beside_the_reply(mmmu_file):
    answers = json.loads(json.dumps(hand_counted(mmmu_file).to_json()))["answers"]
    expected = [
        (question["id"], model, HAND_REPLIES[model][index], question["answer"])
        for index, question in enumerate(QUESTIONS)
        for model in ("base", "tuned")
    ]
    assert [(a["id"], a["model"], a["reply"], a["gold"]) for a in answers] == expected


def test_prompts_follow_mmmu_and_carry_every_image_in_order(mmmu_file):
    questions = {q.id: q for q in read_mmmu(mmmu_file)}
    q1 = questions["q1"].prompt()
    assert q1.messages[0].text == (
        "Compare <image> and <image>. Which one is green?\n(A) red\n(B) green\n(C) blue\n\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert [img.getpixel((0, 0)) for img in q1.load_images()] == [(255, 0, 0), (0, 128, 0)]
    q2 = questions["q2"].prompt()
    assert q2.messages[0].text.startswith("<image>\nWhich shape is drawn in <image>?\n(A) circle")
    assert [img.getpixel((0, 0)) for img in q2.load_images()] == [(0, 0, 255), (255, 255, 0)]
    q3 = questions["q3"].prompt()
    assert q3.messages[0].text == (
        "How many dots are in <image>, <image> and <image> together? See image 1 again.\n"
        "Answer the question using a single word or phrase."
    )
    assert len(q3.images) == 3


def test_a_wrong_answer_letter_names_the_file_and_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"id": "x", "question": "?", "options": "['a', 'b']", "answer": "C"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: answer 'C' is not one of the option letters"):
        read_mmmu(path)


def test_a_missing_image_is_an_error_not_a_silent_blank(tmp_path):
    path = tmp_path / "bad.jsonl"
    row = {"id": "x", "question": "<image 2>?", "options": ["a", "b"], "answer": "A", "image_1": None}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="image_2 is empty"):
        read_mmmu(path)[0].prompt()
