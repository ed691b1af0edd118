"""One adapter's training job: its data stream, optimizer, schedule and counters.

The fleet trainer owns the shared forward/backward; everything that is an adapter's own (when it
steps, how it clips, its learning rate) lives here, so adapters never affect each other.
"""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from lorafleet.config import AdapterSpec
from lorafleet.data.stream import ExampleStream

_SCHEDULER_NAMES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


def total_optimizer_steps(spec: AdapterSpec, num_examples: int) -> int:
    if spec.steps is not None:
        return spec.steps
    epochs = spec.epochs if spec.epochs is not None else 1.0
    return max(1, math.ceil(epochs * num_examples / (spec.micro_batch_size * spec.grad_accum)))


def build_optimizer(spec: AdapterSpec, params: list[torch.nn.Parameter], total_steps: int):
    """AdamW and its learning-rate schedule, as the peft reference run builds them too."""
    optimizer = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
    scheduler = get_scheduler(
        _SCHEDULER_NAMES[spec.schedule],
        optimizer,
        num_warmup_steps=spec.warmup_steps,
        num_training_steps=total_steps,
    )
    return optimizer, scheduler


class AdapterJob:
    def __init__(self, spec: AdapterSpec, stream: ExampleStream, params: list[torch.nn.Parameter]) -> None:
        self.spec = spec
        self.stream = stream
        self.params = params
        self.total_steps = total_optimizer_steps(spec, len(stream.examples))
        self.optimizer, self.scheduler = build_optimizer(spec, params, self.total_steps)
        self.micro_step = 0
        self.optimizer_step = 0
        self.tokens = 0  # label tokens trained on
        self.loss_sum = 0.0  # over the micro-batches of the current optimizer step

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def done(self) -> bool:
        return self.optimizer_step >= self.total_steps

    def record_micro_batch(self, loss: float, tokens: int) -> bool:
        """Count one micro-batch; True when it completes an optimizer step."""
        self.micro_step += 1
        self.tokens += tokens
        self.loss_sum += loss
        return self.micro_step % self.spec.grad_accum == 0

    def optimizer_step_now(self) -> tuple[float, float]:
        """Clip, step, advance the schedule; returns (mean loss of the step, learning rate used)."""
        if self.spec.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step += 1
        loss = self.loss_sum / self.spec.grad_accum
        self.loss_sum = 0.0
        return loss, lr

    def state_dict(self) -> dict:
        return {
            "weights": [p.detach().cpu().clone() for p in self.params],
            "grads": [None if p.grad is None else p.grad.detach().cpu().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "position": self.stream.position,
            "micro_step": self.micro_step,
            "optimizer_step": self.optimizer_step,
            "tokens": self.tokens,
            "loss_sum": self.loss_sum,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for param, weight, grad in zip(self.params, state["weights"], state["grads"], strict=True):
                param.copy_(weight)
                param.grad = None if grad is None else grad.to(param.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.position = state["position"]
        self.micro_step = state["micro_step"]
        self.optimizer_step = state["optimizer_step"]
        self.tokens = state["tokens"]
        self.loss_sum = state["loss_sum"]
