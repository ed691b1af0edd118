"""One adapter's training job: its objective, data stream, optimizer, schedule and counters.

The fleet trainer owns the shared forward/backward and the fleet's optimizer; everything that is
an adapter's own (what it learns from, when it steps, its schedule, its optimizer state) lives
here, in its objective (train/objectives.py) or under its name in the optimizer, so adapters never
affect each other.
"""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from lorafleet.config import AdapterSpec
from lorafleet.data.stream import ExampleStream
from lorafleet.train.objectives import Objective
from lorafleet.train.optimizer import FleetAdamW

_SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def total_optimizer_steps(spec: AdapterSpec, num_examples: int) -> int:
    if spec.steps is not None:
        return spec.steps
    epochs = spec.epochs if spec.epochs is not None else 1.0
    return max(1, math.ceil(epochs * num_examples / (spec.micro_batch_size * spec.grad_accum)))


def build_schedule(spec: AdapterSpec, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The adapter's learning-rate schedule, transformers' own (as the peft reference run uses).
    The fleet's optimizer reads the rate from it; the optimizer the schedule drives is a stand-in
    that holds no weights."""
    stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(0))], lr=spec.learning_rate)
    schedule = get_scheduler(
        _SCHEDULER_NAMES[spec.schedule],
        stand_in,
        num_warmup_steps=spec.warmup_steps,
        num_training_steps=total_steps,
    )
    stand_in.step()  # a no-op (no gradient) that tells the schedule its optimizer is in use
    return schedule


class AdapterJob:
    def __init__(
        self,
        spec: AdapterSpec,
        objective: Objective,
        stream: ExampleStream,
        params: list[torch.nn.Parameter],
        optimizer: FleetAdamW,
        lr_scales: list[float] | None = None,  # per parameter, e.g. LoRA+'s (optimizer.loraplus_scales)
    ) -> None:
        self.spec = spec
        self.objective = objective
        self.stream = stream
        self.params = params
        self.total_steps = total_optimizer_steps(spec, len(stream.examples))
        self.optimizer = optimizer  # the fleet's, shared: this job's state is the entry under its name
        optimizer.add(spec.name, params, spec.weight_decay, spec.max_grad_norm, lr_scales)
        self.scheduler = build_schedule(spec, self.total_steps)
        self.micro_step = 0
        self.optimizer_step = 0
        self.tokens = 0  # label tokens trained on
        self.loss_sum = 0.0  # over the micro-batches of the current optimizer step
        self.last_learning_rate = spec.learning_rate  # of the last optimizer step taken
        self.last_grad_norm: float | None = None  # of the last optimizer step, before clipping
        self.statistic_sums: list[float] = []  # preference objectives: loss terms, reward margin and accuracy

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def done(self) -> bool:
        return self.optimizer_step >= self.total_steps

    def record_micro_batch(self, tokens: int) -> bool:
        """Count one micro-batch; True when it completes an optimizer step."""
        self.micro_step += 1
        self.tokens += tokens
        return self.micro_step % self.spec.grad_accum == 0

    def add_loss(self, loss: float) -> None:
        """The loss of the micro-batch just counted (read from the device after the step)."""
        self.loss_sum += loss

    def add_statistics(self, values: list[float]) -> None:
        """What else the micro-batch just counted reports (preference objectives)."""
        self.statistic_sums = [a + b for a, b in zip(self.statistic_sums or [0.0] * len(values), values, strict=True)]

    def take_statistics(self) -> list[float]:
        """The mean of each statistic over the optimizer step just taken."""
        means = [value / self.spec.grad_accum for value in self.statistic_sums]
        self.statistic_sums = []
        return means

    @property
    def learning_rate(self) -> float:
        """The rate of the coming optimizer step."""
        return self.scheduler.get_last_lr()[0]

    def optimizer_stepped(self) -> float:
        """Advance the schedule after the fleet optimizer stepped this adapter; returns the mean
        loss of the step."""
        self.last_learning_rate = self.learning_rate
        self.scheduler.step()
        self.optimizer_step += 1
        loss = self.loss_sum / self.spec.grad_accum
        self.loss_sum = 0.0
        return loss

    def state_dict(self) -> dict:
        return {
            "weights": [p.detach().cpu().clone() for p in self.params],
            "grads": [None if p.grad is None else p.grad.detach().cpu().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(self.name),
            "scheduler": self.scheduler.state_dict(),
            "position": self.stream.position,
            "micro_step": self.micro_step,
            "optimizer_step": self.optimizer_step,
            "tokens": self.tokens,
            "loss_sum": self.loss_sum,
            "statistic_sums": self.statistic_sums,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for param, weight, grad in zip(self.params, state["weights"], state["grads"], strict=True):
                param.copy_(weight)
                param.grad = None if grad is None else grad.to(param.device)
        self.optimizer.load_state_dict(self.name, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.position = state["position"]
        self.micro_step = state["micro_step"]
        self.optimizer_step = state["optimizer_step"]
        self.tokens = state["tokens"]
        self.loss_sum = state["loss_sum"]
        self.statistic_sums = state.get("statistic_sums", [])
