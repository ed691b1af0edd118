"""Tolerances of the equivalence tests, derived from the arithmetic instead of tuned on one machine.

Two trainings that are mathematically the same (a fleet and peft alone, one process and two, one
batch layout and another) still round differently: another summation order, another padded shape.
AdamW then turns a last-bit difference of a gradient element near zero into a step of up to
2 x lr: its update lr * m / (sqrt(v) + eps) has slope lr / eps in the gradient there, and float32's
rounding noise (2^-24 relative) is not small against eps = 1e-8. So a float32 comparison of trained
weights can only be held to the useless bound of 2 x lr per step. In float64 the noise is 2^29
times smaller and the slope has nothing to amplify; the comparisons run there, and the bound below
follows from it.
"""

from __future__ import annotations

import math

UNIT_ROUNDOFF = 2.0**-53  # float64
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
ADAMW_EPS = 1e-8  # FleetAdamW's and torch.optim.AdamW's
# A gradient element of these tiny models sums n <= 1e4 products (tokens x features) of size <= 1
# (probabilities and activations); rounding errors of a sum add up like a random walk: sqrt(n) * u.
GRADIENT_ROUNDING = math.sqrt(1e4) * UNIT_ROUNDOFF  # ~1.1e-14


def trained_weights(learning_rate: float, steps: int) -> float:
    """How far float64 rounding alone can move a weight trained `steps` AdamW steps at a learning
    rate of at most `learning_rate`: each step at most lr / eps times the gradient's rounding. A real
    difference (a wrong gradient, a sample seen twice, a step missed) moves a weight by ~lr per step,
    some 1e6 times more."""
    return steps * learning_rate * GRADIENT_ROUNDING / ADAMW_EPS


def metric(weight_tolerance: float, parameters: int, gradient_norm: float) -> float:
    """How far a logged loss or gradient norm can move (relative to max(1, |value|)) when each of
    `parameters` weights moved by at most `weight_tolerance`: to first order a loss moves by its
    gradient times the weights' move, at most gradient_norm * sqrt(parameters) * weight_tolerance;
    the gradient norm moves with the loss's curvature, taken to be of the same order (plus each
    value's own float64 rounding, far below)."""
    return max(1.0, gradient_norm) * math.sqrt(parameters) * weight_tolerance


def fleet_weights(adapters) -> float:
    """`trained_weights` for the largest learning rate (LoRA+'s B rate included) and the most steps
    among `adapters` (AdapterSpecs)."""
    rates = [a.learning_rate * (getattr(a, "loraplus_lr_ratio", None) or 1) for a in adapters]
    return trained_weights(max(rates), max(a.steps for a in adapters))


def assert_same_weights(ours: dict, reference: dict, tolerance: float) -> float:
    """Adapter name -> tensor name -> tensor, the same names on both sides and every element within
    `tolerance`; returns the largest difference (for reports)."""
    assert ours.keys() == reference.keys()
    worst = 0.0
    for name, tensors in reference.items():
        assert tensors.keys() == ours[name].keys(), name
        for key, tensor in tensors.items():
            difference = (ours[name][key].double() - tensor.double()).abs().max().item()
            assert difference <= tolerance, f"{name} {key}: {difference:.2e} > {tolerance:.2e}"
            worst = max(worst, difference)
    return worst


def float32_gradients(layers: int) -> float:
    """How far float32 rounding moves a gradient computed with other shapes or in another order (one
    step: nothing amplified yet), relative to the gradient tensor's largest element. Each matmul on
    its way rounds its result to ~2^-24 of the result's scale (the products' rounding errors are
    independent and grow like sqrt(n), as the sum itself does); a decoder layer has 9 matmuls
    forward and 18 backward, and their errors add; the largest of ~1e4 elements sits ~4 sigma out."""
    return 4 * 27 * layers * FLOAT32_UNIT_ROUNDOFF
