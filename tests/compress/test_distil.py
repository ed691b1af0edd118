"""Distillation moves the pruned student toward the teacher, and resumes exactly after a crash."""

from __future__ import annotations

import pytest
import torch

from lorafleet.compress.distil import DistilOptions, distil, held_out_kl
from lorafleet.compress.prune import PruneRequest, apply_plan, measure_importance, plan_pruning
from lorafleet.data.dataset import load_examples
from lorafleet.models.loading import load_base
from tests.conftest import write_image_dataset


class Crash(Exception):
    pass


def pruned_student(model_dir, examples):
    student = load_base(model_dir)
    plan = plan_pruning(
        student.language_model.config, measure_importance(student, examples), PruneRequest(mlp=0.5, layers=1)
    )
    apply_plan(student, plan)
    return student


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_vlm_dir):
    root = tmp_path_factory.mktemp("distil")
    teacher = load_base(tiny_vlm_dir)
    train, _ = load_examples(write_image_dataset(root / "train.jsonl", n=24, seed=1), teacher)
    held_out, _ = load_examples(write_image_dataset(root / "held.jsonl", n=8, seed=2), teacher)
    return teacher, train, held_out


def test_distillation_lowers_kl_to_the_teacher_on_held_out_data(tiny_vlm_dir, data):
    teacher, train, held_out = data
    student = pruned_student(tiny_vlm_dir, train)
    before = held_out_kl(student, teacher, held_out)
    losses = distil(student, teacher, train, DistilOptions(steps=30, learning_rate=3e-3, progress=False))
    after = held_out_kl(student, teacher, held_out)
    assert after < 0.7 * before, (before, after)
    assert losses[-1] < losses[0]


def test_distillation_resumes_after_a_crash_exactly(tiny_vlm_dir, data, tmp_path):
    teacher, train, _ = data
    straight = pruned_student(tiny_vlm_dir, train)
    distil(straight, teacher, train, DistilOptions(steps=6, learning_rate=3e-3, progress=False))

    options = DistilOptions(
        steps=6, learning_rate=3e-3, progress=False, checkpoint=tmp_path / "state.pt", checkpoint_every=3
    )
    interrupted = pruned_student(tiny_vlm_dir, train)

    def crash_at_5(step: int) -> None:
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        distil(interrupted, teacher, train, options, on_step=crash_at_5)
    resumed = pruned_student(tiny_vlm_dir, train)
    distil(resumed, teacher, train, options)
    for (name, a), (_, b) in zip(
        straight.language_model.state_dict().items(), resumed.language_model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
