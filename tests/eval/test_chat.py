"""Held-out chats: each reply is scored by exact match and token F1 against the last assistant
turn, and the answers JSON keeps that gold answer beside the reply."""

from __future__ import annotations

import json

import pytest

from lorafleet.eval.run import read_items, score

CHATS = [
    [{"role": "user", "content": "What colour is the invoice stamp?"}, {"role": "assistant", "content": "Red."}],
    [{"role": "user", "content": "Who signs the contract?"}, {"role": "assistant", "content": "The head of legal"}],
]
REPLIES = ["red", "Head of finance"]  # one model's, in file order


def test_each_chat_reply_is_kept_beside_its_gold_answer_with_its_scores(tmp_path):
    path = tmp_path / "held-out.jsonl"
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    kind, items = read_items(path)
    report = json.loads(json.dumps(score(str(path), kind, items, ["tuned"], REPLIES).to_json()))
    answers = [(a["id"], a["reply"], a["gold"], a["correct"]) for a in report["answers"]]
    assert answers == [("1", "red", "Red.", True), ("2", "Head of finance", "The head of legal", False)]
    # Token F1 by hand: "head of finance" against "head of legal" (the article dropped) shares 2 of 3
    # tokens each way: 2/3; "red" against "Red." is 1.
    assert [a["token_f1"] for a in report["answers"]] == pytest.approx([1.0, 2 / 3])
    assert report["overall"]["tuned"]["token_f1"] == pytest.approx((1 + 2 / 3) / 2)
