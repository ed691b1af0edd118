"""AdamW for the whole fleet: one set of foreach operations steps every adapter that is due.

Each adapter keeps its own hyperparameters (learning rate from its own schedule, weight decay,
gradient clipping) and its own state, and gets exactly the update `torch.optim.AdamW` would give
it alone — the same formulas in the same order (PyTorch's `_single_tensor_adam` /
`_multi_tensor_adam`), with the per-adapter numbers passed as per-tensor scalar lists. What
changes is the count: a separate AdamW per adapter issues ~10 operations per tensor on the CPU
path and a dozen kernels per adapter on CUDA; here the fleet's step is a dozen foreach operations
plus one multiply per clipped adapter, whatever the number of adapters
(tests/train/test_step_proxies.py counts them).

An adapter's parameters may step at different multiples of its learning rate (`lr_scales`): LoRA+
(peft's `create_loraplus_optimizer`) gives B matrices and 1-D parameters (DoRA's magnitude
vectors) the learning rate times `loraplus_lr_ratio` and A the rate itself; each tensor then steps
as `torch.optim.AdamW` steps its parameter group, weight decay included.

Clipping is `torch.nn.utils.clip_grad_norm_` per adapter, from one foreach norm over every
gradient: the per-adapter total norms are summed on the device, so nothing waits for the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class _AdapterState:
    params: list[torch.nn.Parameter]
    weight_decay: float
    max_grad_norm: float | None
    lr_scales: list[float]  # per parameter: its learning rate over the adapter's
    step: int = 0
    exp_avg: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sq: list[torch.Tensor] = field(default_factory=list)


class FleetAdamW:
    def __init__(self, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.betas, self.eps = betas, eps
        self.adapters: dict[str, _AdapterState] = {}
        self._clip_indices: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # per set of clipped adapters

    def add(
        self,
        name: str,
        params: list[torch.nn.Parameter],
        weight_decay: float,
        max_grad_norm: float | None,
        lr_scales: list[float] | None = None,
    ):
        """Step `params` as one adapter; `lr_scales` (default all 1) multiply its learning rate per parameter."""
        scales = list(lr_scales) if lr_scales is not None else [1.0] * len(params)
        if len(scales) != len(params):
            raise ValueError(f"adapter {name!r}: {len(scales)} learning-rate scales for {len(params)} parameters")
        self.adapters[name] = _AdapterState(list(params), weight_decay, max_grad_norm, scales)

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._clip_indices.clear()

    def zero_grad(self, names: list[str]) -> None:
        for name in names:
            for param in self.adapters[name].params:
                param.grad = None

    @torch.no_grad()
    def step(self, learning_rates: dict[str, float]) -> torch.Tensor:
        """One AdamW step for each adapter named in `learning_rates`, at that learning rate.
        Returns each adapter's gradient norm before clipping, (adapters,) on the device (read
        it with the step's other results: nothing here waits for the device)."""
        due = [self.adapters[name] for name in learning_rates]
        norms = self._clip(due)
        beta1, beta2 = self.betas
        params, grads, exp_avgs, exp_avg_sqs, decay, step_sizes, corrections = [], [], [], [], [], [], []
        for name, state in zip(learning_rates, due, strict=True):
            if not state.exp_avg:
                state.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in state.params]
                state.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in state.params]
            state.step += 1
            rates, count = [learning_rates[name] * scale for scale in state.lr_scales], len(state.params)
            params += state.params
            grads += [p.grad for p in state.params]
            exp_avgs += state.exp_avg
            exp_avg_sqs += state.exp_avg_sq
            decay += [1 - lr * state.weight_decay for lr in rates]
            step_sizes += [-(lr / (1 - beta1**state.step)) for lr in rates]
            corrections += [math.sqrt(1 - beta2**state.step)] * count
        if any(factor != 1 for factor in decay):
            torch._foreach_mul_(params, decay)
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, corrections)
        torch._foreach_add_(denominators, self.eps)
        torch._foreach_addcdiv_(params, exp_avgs, denominators, step_sizes)
        return norms

    def _clip(self, states: list[_AdapterState]) -> torch.Tensor:
        """Each state's total gradient norm (what `clip_grad_norm_` returns), and
        `clip_grad_norm_(state.params, state.max_grad_norm)` for each state that clips, in a few
        operations."""
        grads = [[p.grad for p in state.params] for state in states]
        norms = torch.stack(torch._foreach_norm([g for group in grads for g in group]))
        owner, limits = self._clip_tensors(states, norms)
        squares = torch.zeros(len(states), dtype=norms.dtype, device=norms.device)
        totals = squares.index_add_(0, owner, norms * norms).sqrt()
        coefficients = torch.clamp(limits / (totals + 1e-6), max=1.0)
        for state, group, coefficient in zip(states, grads, coefficients.unbind(), strict=True):
            if state.max_grad_norm:
                torch._foreach_mul_(group, coefficient)
        return totals

    def _clip_tensors(self, states: list[_AdapterState], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each gradient's adapter, each adapter's limit) on the device, made once per set of adapters."""
        key = tuple(id(state) for state in states)
        if key not in self._clip_indices:
            counts = torch.tensor([len(state.params) for state in states])
            owner = torch.repeat_interleave(torch.arange(len(states)), counts).to(like.device)
            limits = [state.max_grad_norm or math.inf for state in states]  # inf: measured, not clipped
            limits = torch.tensor(limits, dtype=like.dtype).to(like.device)
            self._clip_indices[key] = (owner, limits)
        return self._clip_indices[key]

    def state_dict(self, name: str) -> dict:
        state = self.adapters[name]
        cpu = lambda tensors: [t.detach().cpu().clone() for t in tensors]  # noqa: E731
        return {"step": state.step, "exp_avg": cpu(state.exp_avg), "exp_avg_sq": cpu(state.exp_avg_sq)}

    def load_state_dict(self, name: str, saved: dict) -> None:
        state = self.adapters[name]
        if "param_groups" in saved:  # a checkpoint written with one torch.optim.AdamW per adapter
            saved = _from_torch_adamw(saved, len(state.params))
        state.step = saved["step"]
        if not saved["exp_avg"]:  # saved before its first step: the moments are made at that step
            state.exp_avg, state.exp_avg_sq = [], []
            return
        state.exp_avg = [t.to(p.device) for t, p in zip(saved["exp_avg"], state.params, strict=True)]
        state.exp_avg_sq = [t.to(p.device) for t, p in zip(saved["exp_avg_sq"], state.params, strict=True)]


def loraplus_scales(names: list[str], shapes: list[torch.Size], ratio: float | None) -> list[float]:
    """Per parameter (named as `LoRAFleet.named_weights` names them), its learning rate over the
    adapter's under LoRA+ as peft groups them: `ratio` for B matrices and 1-D parameters (DoRA's
    magnitude vectors), 1 for A; all 1 without LoRA+."""
    if ratio is None:
        return [1.0] * len(names)
    return [
        ratio if name.endswith(".lora_B") or len(shape) == 1 else 1.0 for name, shape in zip(names, shapes, strict=True)
    ]


def _from_torch_adamw(saved: dict, count: int) -> dict:
    """`torch.optim.AdamW.state_dict()` of one adapter in this optimizer's form."""
    per_param = [saved["state"].get(index) for index in range(count)]
    if not all(per_param):
        return {"step": 0, "exp_avg": [], "exp_avg_sq": []}
    return {
        "step": int(per_param[0]["step"]),
        "exp_avg": [entry["exp_avg"] for entry in per_param],
        "exp_avg_sq": [entry["exp_avg_sq"] for entry in per_param],
    }
