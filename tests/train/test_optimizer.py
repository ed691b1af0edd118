"""The fleet optimizer gives every adapter exactly what torch.optim.AdamW gives it alone."""

from __future__ import annotations

import torch

from lorafleet.train.optimizer import FleetAdamW, loraplus_scales
from tests import tolerances


def adapters(seed: int) -> dict[str, list[torch.nn.Parameter]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"a": [(4, 6), (6, 4)], "b": [(8, 6), (6, 8), (3,)], "c": [(2, 2)]}
    return {
        name: [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in group]
        for name, group in shapes.items()
    }


SETTINGS = {"a": (1e-2, 0.0, 1.0), "b": (3e-3, 0.1, None), "c": (5e-2, 0.01, 0.05)}  # lr, decay, clip


def test_each_adapter_steps_as_torch_adamw_alone_even_when_others_skip_steps():
    ours, reference = adapters(0), adapters(0)
    fleet = FleetAdamW()
    alone = {}
    for name, (lr, decay, clip) in SETTINGS.items():
        fleet.add(name, ours[name], decay, clip)
        alone[name] = torch.optim.AdamW(reference[name], lr=lr, weight_decay=decay)
    generator = torch.Generator().manual_seed(1)
    for step in range(6):
        norms = {}
        due = [name for name in SETTINGS if name != "b" or step % 2 == 0]  # b accumulates over 2 steps
        for name in due:
            for mine, theirs in zip(ours[name], reference[name], strict=True):
                grad = torch.randn(mine.shape, generator=generator) * 3
                mine.grad, theirs.grad = grad.clone(), grad.clone()
            _, _, clip = SETTINGS[name]
            if clip:
                norms[name] = torch.nn.utils.clip_grad_norm_(reference[name], clip)
            else:
                norms[name] = torch.nn.utils.get_total_norm([p.grad for p in reference[name]])
            alone[name].step()
        reported = fleet.step({name: SETTINGS[name][0] for name in due})
        # the gradient norm each adapter logs: clip_grad_norm_'s, before clipping, clipped or not
        torch.testing.assert_close(reported, torch.stack([norms[name] for name in due]))
        fleet.zero_grad(due)
    for name in SETTINGS:
        for mine, theirs in zip(ours[name], reference[name], strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)


def test_state_round_trips_and_reads_a_torch_adamw_checkpoint():
    params = adapters(0)["b"]
    torch_adamw = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    torch_adamw.step()
    fleet = FleetAdamW()
    fleet.add("b", params, 0.0, None)
    fleet.load_state_dict("b", torch_adamw.state_dict())
    saved = fleet.state_dict("b")
    assert saved["step"] == 1
    torch.testing.assert_close(saved["exp_avg"][0], torch_adamw.state[params[0]]["exp_avg"])
    other = FleetAdamW()
    other.add("b", params, 0.0, None)
    other.load_state_dict("b", saved)
    assert other.state_dict("b")["step"] == 1


def test_the_state_of_an_adapter_that_has_not_stepped_yet_round_trips():
    """A checkpoint may fall in the fleet step a queued adapter joined in, before its first step:
    its moments do not exist yet, and a resumed run makes them at that first step as an unbroken one does."""
    straight, resumed = adapters(0)["a"], adapters(0)["a"]
    fleet, other = FleetAdamW(), FleetAdamW()
    fleet.add("a", straight, 0.0, 1.0)
    other.add("a", resumed, 0.0, 1.0)
    other.load_state_dict("a", fleet.state_dict("a"))
    for params, optimizer in ((straight, fleet), (resumed, other)):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step({"a": 1e-2})
    for mine, theirs in zip(resumed, straight, strict=True):
        assert mine.equal(theirs)


def test_loraplus_steps_b_and_dora_magnitudes_as_peft_loraplus_optimizer_groups_them():
    """peft's create_loraplus_optimizer on a DoRA adapter: B and the 1-D magnitude vector at
    lr × ratio, A at lr, weight decay on all; the fleet optimizer with `loraplus_scales` steps
    every tensor the same (float64; tests/tolerances.py bounds what rounding can move)."""
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    class OneProjection(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = torch.nn.Linear(6, 5)

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj"])
    model = get_peft_model(OneProjection().double(), config)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n.removeprefix("base_model.model.").replace(".default.weight", "") for n, _ in named]
    assert sorted(names) == ["q_proj.lora_A", "q_proj.lora_B", "q_proj.lora_magnitude_vector"]
    ours = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    reference = create_loraplus_optimizer(
        model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=16, loraplus_weight_decay=0.1
    )
    fleet = FleetAdamW()
    fleet.add("dora", ours, 0.1, None, loraplus_scales(names, [p.shape for p in ours], 16))
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        for mine, (_, theirs) in zip(ours, named, strict=True):
            grad = torch.randn(mine.shape, generator=generator, dtype=torch.float64)
            mine.grad, theirs.grad = grad.clone(), grad.clone()
        reference.step()
        fleet.step({"dora": 1e-2})
    for mine, (name, theirs) in zip(ours, named, strict=True):
        bound = tolerances.trained_weights(16 * 1e-2, steps=5)  # a wrong group moves a weight by ~lr x 15 a step
        torch.testing.assert_close(mine, theirs.detach(), rtol=0, atol=bound, msg=name)
    plain = loraplus_scales(names, [p.shape for p in ours], None)
    assert plain == [1.0, 1.0, 1.0]
