"""Shared fixtures: the tiny models are built once per session from their configs, never downloaded."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels are checked in Triton's interpreter; the switch only takes
    # effect if set before Triton is first imported (peft imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lorafleet.models.tiny import build_tiny_internvl, build_tiny_qwen2
from tests.services import postgres_server, postgres_url, redis_server, redis_url  # noqa: F401  (fixtures)

if os.environ.get("LORAFLEET_TEST_DETERMINISTIC") == "1":
    # The suite must pass with deterministic kernels as well as with the defaults (and with any
    # number of threads): no test may depend on one machine's summation order.
    torch.use_deterministic_algorithms(True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item (item.report_setup, report_call, report_teardown), for
    fixtures that keep evidence of a failure (the console's browser tests keep a screenshot)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    return build_tiny_internvl(tmp_path_factory.mktemp("tiny-internvl"), seed=0)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"), seed=0)


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
    """The demo fleet trained once per session (300 steps, 256 pictures per department), and the
    demo's own table of it: for the slow tests that compress or evaluate a trained fleet."""
    from lorafleet.demo.run import run_demo

    out = tmp_path_factory.mktemp("demo")
    rows = run_demo(out, train_size=256, steps=300, progress=False, log=lambda *_: None)
    return out, rows


WORDS = "red green blue circle square triangle invoice contract policy total one two three".split()


def write_text_dataset(path: Path, n: int, seed: int) -> Path:
    """OpenAI-layout chats of varied lengths, some with a system turn and two exchanges."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(n):
            question = " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
            messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": "Answer briefly."})
            if rng.random() < 0.3:
                messages += [{"role": "user", "content": "again"}, {"role": "assistant", "content": answer}]
            out.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_image_dataset(path: Path, n: int, seed: int) -> Path:
    """InternVL-layout records with images of several aspect ratios (so tile counts differ)."""
    rng = random.Random(seed)
    images = path.parent / f"{path.stem}-images"
    images.mkdir(exist_ok=True)
    with path.open("w") as out:
        for i in range(n):
            size = rng.choice([(64, 64), (128, 64), (64, 160), (96, 96)])
            colour = rng.choice(["red", "green", "blue"])
            image = Image.new("RGB", size, "white")
            ImageDraw.Draw(image).ellipse([8, 8, size[0] - 8, size[1] - 8], fill=colour)
            image.save(images / f"{i}.png")
            record = {
                "image": f"{images.name}/{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the shape?" + " please" * rng.randint(0, 4)},
                    {"from": "gpt", "value": colour},
                ],
            }
            out.write(json.dumps(record) + "\n")
    return path
