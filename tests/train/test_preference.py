"""DPO and MPO adapters in the fleet: TRL's losses and gradients, trained beside SFT adapters,
resumed exactly, and learning a preference that holds on held-out pairs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.adapters.fleet import LoRAFleet, LoRAShape, find_target_modules
from lorafleet.adapters.peft_io import save_adapter
from lorafleet.config import AdapterSpec, FleetSpec, fleet_spec_from_dict
from lorafleet.data.preference import load_preference_pairs
from lorafleet.errors import ConfigError, DataError
from lorafleet.eval.preference import tally
from lorafleet.models.loading import load_base
from lorafleet.train.objectives import AnswerLogProbs, preference_loss, rounding_noise, wins
from lorafleet.train.trainer import FleetTrainer, train_fleet
from tests import tolerances
from tests.conftest import write_text_dataset

COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple"]
# Qwen2.5-Instruct's own chat template (InternVL3's is the same ChatML): every turn ends
# "<|im_end|>\n". TRL takes everything after the prompt as the answer, "...<|im_end|>\n"; lorafleet
# scores the answer up to its end-of-turn token, "...<|im_end|>" (data/encode.py says why), so the
# comparisons with TRL leave that one newline out of TRL's answers, and nothing else.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501


def write_pairs(path, n: int, seed: int = 0, layout: str = "ours"):
    """A toy preference, as a department might correct its adapter: never call anything purple."""
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for index in range(n):
        colour = COLOURS[int(torch.randint(len(COLOURS) - 1, (1,), generator=generator))]  # any but purple
        prompt = [{"role": "user", "content": f"Which colour is item {index + 100 * seed}?"}]
        chosen, rejected = f"It is {colour}.", "It is purple."
        if layout == "trl":
            answer = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
            lines.append({"prompt": prompt, "chosen": answer(chosen), "rejected": answer(rejected)})
        else:
            lines.append({"messages": prompt, "chosen": chosen, "rejected": rejected})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def model_dir(tiny_lm_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2.5-template") / "model"
    shutil.copytree(tiny_lm_dir, directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(QWEN25_CHAT_TEMPLATE)
    return directory


def perturbed_adapter(model_dir, directory, seed: int = 1):
    """A rank-4 adapter whose B is not zero: the policy differs from the base from the first step,
    so the comparison covers both factors and every loss term."""
    base = load_base(model_dir)
    fleet = LoRAFleet(base.model, base.language_prefix)
    targets = find_target_modules(base.model, base.language_prefix, ["q_proj", "v_proj", "down_proj"])
    fleet.add_adapter("p", LoRAShape(4, 8.0, 0.0, targets), seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, weight in fleet.named_weights("p"):
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    return save_adapter(fleet, "p", directory, model_dir)


def fleet_loss_and_gradients(model_dir, data, init_dir, spec_changes: dict, pairs: int, dtype: str | None = None):
    """The fleet's loss and LoRA gradients for its first micro-batch (all pairs, in file order)."""
    adapter = AdapterSpec(
        name="p", data=str(data), init_from=str(init_dir), micro_batch_size=pairs, shuffle=False, steps=1,
        **spec_changes,
    )  # fmt: skip
    spec = FleetSpec(base=str(model_dir), output=str(init_dir.parent / "fleet"), adapters=[adapter], dtype=dtype)
    trainer = FleetTrainer(spec, progress=False)
    trainer._prepare_output(resume=False)
    trainer._admit()
    step = trainer._prepare_step()
    trainer.references.look_up(trainer.active, step.parts)
    losses, _ = trainer._forward_backward(step)
    gradients = {name: weight.grad.clone() for name, weight in trainer.fleet.named_weights("p")}
    return losses[0].item(), gradients


def trl_loss_and_gradients(
    model_dir,
    data,
    init_dir,
    loss_type: list[str],
    loss_weights,
    beta: float,
    pairs: int,
    reference: str,
    dtype: torch.dtype | None = None,
    score_newline_after_end_of_turn: bool = False,
):
    """TRL's DPOTrainer on the same adapter and pairs: its loss and gradients for one batch. TRL
    holds a frozen copy of an adapter it is given as the reference ("ref"); without that copy it
    disables the adapter, which makes the base the reference. Its answers are everything the
    template renders after the prompt; unless `score_newline_after_end_of_turn`, the newline after
    each answer's end-of-turn token is taken out of them, which leaves lorafleet's answers."""
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from peft import PeftModel
    from transformers import AutoTokenizer

    base = load_base(model_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base.model, init_dir, is_trainable=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = datasets.Dataset.from_list(
        [{"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
          "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]
    )  # fmt: skip
    config = trl.DPOConfig(
        output_dir=str(init_dir.parent / "trl"),
        beta=beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        per_device_train_batch_size=pairs,
        report_to="none",
        use_cpu=True,
        max_length=None,
    )
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    assert "ref" in model.peft_config
    if reference == "base":
        model.delete_adapter("ref")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(pairs)])
    if not score_newline_after_end_of_turn:
        batch["completion_mask"] = without_newline_after_end_of_turn(batch, tokenizer)
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    gradients = {}
    for name, weight in model.named_parameters():
        if ".default." in name:  # base_model.model.<module>.lora_A.default.weight -> <module>.lora_A
            key = name.removeprefix("base_model.model.").replace(".default.weight", "")
            gradients[key] = weight.grad.clone()
    return loss.item(), gradients


def without_newline_after_end_of_turn(batch: dict, tokenizer) -> torch.Tensor:
    """TRL's completion mask less the last token of each answer, after checking that this token is
    the template's newline and the one before it the end-of-turn token: exactly one token apart."""
    mask = batch["completion_mask"].clone()
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    for row in range(mask.shape[0]):
        last = int(mask[row].nonzero().max())
        ids = batch["input_ids"][row]
        assert [int(ids[last - 1]), int(ids[last])] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), newline[0]]
        mask[row, last] = 0
    return mask


@pytest.mark.parametrize("reference", ["base", "init"])
@pytest.mark.parametrize(
    ("objective", "loss_type", "loss_weights"),
    [("dpo", ["sigmoid"], None), ("mpo", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0])],
)
def test_loss_and_gradients_equal_trls_less_the_newline_after_the_end_of_turn(
    model_dir, tmp_path, objective, loss_type, loss_weights, reference
):
    """Qwen2.5's own template: TRL's answers end "<|im_end|>\n", lorafleet's "<|im_end|>". TRL's with
    that one token taken out, and nothing else changed, give lorafleet's loss and gradients to
    float32 rounding; with it, TRL's are far off."""
    data = write_pairs(tmp_path / "pairs.jsonl", n=4, seed=0)
    init_dir = perturbed_adapter(model_dir, tmp_path / "init")
    changes = {"objective": objective, "beta": 0.5, "reference": reference}
    ours, our_gradients = fleet_loss_and_gradients(model_dir, data, init_dir, changes, 4)
    trl_args = (model_dir, data, init_dir, loss_type, loss_weights, 0.5, 4, reference)
    theirs, their_gradients = trl_loss_and_gradients(*trl_args)
    # one forward and backward, no optimizer step: nothing amplifies the rounding (tests/tolerances.py)
    layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    tolerance = tolerances.float32_gradients(layers)
    assert abs(ours - theirs) <= tolerance * abs(theirs)
    assert our_gradients.keys() == their_gradients.keys()
    for key, gradient in their_gradients.items():
        assert (our_gradients[key] - gradient).abs().max() <= tolerance * gradient.abs().max(), key
    if reference == "base":  # policy != reference: the comparison covers every term's gradient
        assert ours != pytest.approx(math.log(2) if objective == "dpo" else theirs * 2)
        with_newline, gradients = trl_loss_and_gradients(*trl_args, score_newline_after_end_of_turn=True)
        assert abs(ours - with_newline) > 100 * tolerance * abs(with_newline)  # measured: 1% of the loss
        worst = max(((our_gradients[k] - g).abs().max() / g.abs().max()).item() for k, g in gradients.items())
        assert worst > 0.1  # measured: 23% (DPO) and 53% (MPO) of the largest element


def test_an_sft_and_a_dpo_adapter_trained_together_equal_each_trained_alone(model_dir, tmp_path):
    sft = AdapterSpec(
        name="sft", data=str(write_text_dataset(tmp_path / "sft.jsonl", n=9, seed=1)), rank=4, steps=5,
        micro_batch_size=2, learning_rate=3e-3,
    )  # fmt: skip
    dpo = AdapterSpec(
        name="dpo", data=str(write_pairs(tmp_path / "pairs.jsonl", n=7)), objective="dpo", rank=2, steps=6,
        micro_batch_size=2, grad_accum=2, learning_rate=3e-3,
    )  # fmt: skip
    mpo = dataclasses.replace(dpo, name="mpo", objective="mpo", steps=4, beta=0.3)

    def train(adapters, output):
        spec = FleetSpec(
            base=str(model_dir), output=str(tmp_path / output), adapters=adapters, checkpoint_every=0, dtype="float64"
        )
        result = train_fleet(spec, progress=False)
        return {name: load_file(path / "adapter_model.safetensors") for name, path in result.adapters.items()}

    together = train([sft, dpo, mpo], "together")
    for adapter in (sft, dpo, mpo):
        alone = train([adapter], f"alone-{adapter.name}")
        tolerances.assert_same_weights(
            {adapter.name: together[adapter.name]}, alone, tolerances.fleet_weights([adapter])
        )


def test_the_preference_holds_on_held_out_pairs(model_dir, tmp_path):
    adapter = AdapterSpec(
        name="colours", data=str(write_pairs(tmp_path / "train.jsonl", n=24, seed=0)), objective="dpo", rank=8,
        steps=12, micro_batch_size=4, learning_rate=3e-4, beta=0.5,
        eval_data=str(write_pairs(tmp_path / "held-out.jsonl", n=12, seed=7)), eval_every=1,
    )  # fmt: skip
    train_fleet(FleetSpec(base=str(model_dir), output=str(tmp_path / "out"), adapters=[adapter]), progress=False)
    steps = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    # Before the first update the policy is the reference: no reward, no preference, loss log 2.
    assert steps[0]["reward_accuracy"] == 0.0 and steps[0]["loss"] == pytest.approx(math.log(2))
    margins = [step["eval_reward_margin"] for step in steps]
    assert all(b > a for a, b in zip(margins, margins[1:], strict=False))  # the held-out margin grows
    assert steps[-1]["eval_reward_accuracy"] >= 0.9 and steps[-1]["eval_loss"] < 0.5 * math.log(2)


def test_a_killed_preference_run_resumes_exactly(model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=10)
    adapters = [
        AdapterSpec(name="d", data=str(data), objective="dpo", rank=2, steps=6, micro_batch_size=3, learning_rate=3e-3),
        AdapterSpec(name="m", data=str(data), objective="mpo", rank=2, steps=5, micro_batch_size=2, dropout=0.1),
    ]
    spec = FleetSpec(base=str(model_dir), output=str(tmp_path / "straight"), adapters=adapters, checkpoint_every=3)
    straight = train_fleet(spec, progress=False)
    spec.output = str(tmp_path / "killed")

    class Crash(Exception):
        pass

    def crash(step):
        if step == 5:
            raise Crash

    with pytest.raises(Crash):
        FleetTrainer(spec, progress=False, on_step=crash).run()
    resumed = FleetTrainer(spec, progress=False).run(resume=True)
    for name, directory in straight.adapters.items():
        ours, theirs = (load_file(d / "adapter_model.safetensors") for d in (directory, resumed.adapters[name]))
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
    lines = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("straight", "killed")]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "elapsed_s"}  # noqa: E731
    assert [strip(line) for line in lines[0]] == [strip(line) for line in lines[1]]


def test_reference_init_holds_the_starting_adapter(model_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=4)
    init_dir = perturbed_adapter(model_dir, tmp_path / "init")
    on_init, _ = fleet_loss_and_gradients(model_dir, data, init_dir, {"objective": "dpo", "reference": "init"}, 4)
    on_base, _ = fleet_loss_and_gradients(model_dir, data, init_dir, {"objective": "dpo"}, 4)
    assert on_init == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: no preference yet
    assert on_base != pytest.approx(math.log(2), abs=1e-4)


def test_margins_within_rounding_noise_are_not_wins():
    """A pair is won only when its margin exceeds what rounding can make of a tie: the policy's and
    the reference's log-probabilities come from batches of other shapes, a few ulps apart."""
    sizes = torch.tensor([-20.0, -21.0, -20.0, -21.0])  # chosen, rejected under policy and reference
    noise = rounding_noise(torch.float32, *sizes[:, None])  # 2 * 2^-24 * 82 nats = 9.8e-6
    assert wins(torch.tensor([0.0, 4e-6, -4e-6, 2e-5, 1.0]), noise).tolist() == [0, 0, 0, 1, 1]
    # the policy is its reference, one ulp (1.9e-6 at 20 nats) off on a chosen answer: no win
    ulp = torch.finfo(torch.float32).eps * 16
    policy = torch.tensor([-20.0 + ulp, -20.0, -21.0, -21.0 - ulp])  # [chosen_1, chosen_2, rejected_1, rejected_2]
    reference = torch.tensor([-20.0, -20.0, -21.0, -21.0])
    spec = AdapterSpec(name="d", data="d", objective="dpo", beta=0.5)
    _, statistics = preference_loss(spec, AnswerLogProbs(policy, reference, torch.ones(4)))
    assert statistics[-2] > 0 and statistics[-1] == 0.0  # a positive margin, no win
    # lorafleet eval tallies the same way
    scores = tally({"base": reference.view(2, 2).T, "a": policy.view(2, 2).T}, torch.float32)
    assert scores.reward_accuracy == {"a": 0.0} and scores.prefers_chosen == {"base": 1.0, "a": 1.0}


def test_the_first_step_of_reference_init_wins_no_pair(tiny_lm_dir, tmp_path):
    """reference: init beside an SFT adapter: the first step's policy is its reference, computed in a
    batch of other shapes (here its margins come out ~4e-6 either side of zero): reward accuracy 0,
    not the share of pairs whose noise came out positive (0.25 before)."""
    init_dir = perturbed_adapter(tiny_lm_dir, tmp_path / "init")
    dpo = AdapterSpec(
        name="d", data=str(write_pairs(tmp_path / "pairs.jsonl", n=12)), objective="dpo", init_from=str(init_dir),
        reference="init", micro_batch_size=4, steps=3, learning_rate=1e-2, beta=0.5,
    )  # fmt: skip
    sft = AdapterSpec(name="s", data=str(write_text_dataset(tmp_path / "sft.jsonl", n=8, seed=0)), micro_batch_size=3)
    spec = FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "out"), adapters=[dpo, sft], length_multiple=1)
    train_fleet(spec, progress=False)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    steps = [record for record in map(json.loads, lines) if record["adapter"] == "d"]
    assert abs(steps[0]["reward_margin"]) < 1e-4 and steps[0]["reward_accuracy"] == 0.0
    assert steps[-1]["reward_accuracy"] > 0  # real margins still count


def test_pair_layouts_and_bad_pairs(model_dir, tmp_path):
    base = load_base(model_dir)
    ours = write_pairs(tmp_path / "ours.jsonl", n=3)
    trl = write_pairs(tmp_path / "trl.jsonl", n=3, layout="trl")
    pairs, _ = load_preference_pairs(ours, base)
    same, _ = load_preference_pairs(trl, base)
    assert [torch.equal(a.chosen.labels, b.chosen.labels) for a, b in zip(pairs, same, strict=True)] == [True] * 3
    answer = base.tokenizer.decode(pairs[0].chosen.input_ids[pairs[0].chosen.labels != -100])
    assert answer.startswith("It is ") and answer.endswith("<|im_end|>")

    bad = tmp_path / "bad.jsonl"
    good = json.loads(ours.read_text().splitlines()[0])
    bad.write_text(
        json.dumps(good) + "\n"
        + json.dumps({"messages": good["messages"], "chosen": "yes"}) + "\n"
        + json.dumps({**good, "rejected": good["chosen"]}) + "\n"
        + json.dumps({**good, "messages": [*good["messages"], {"role": "assistant", "content": "x"}]}) + "\n"
    )  # fmt: skip
    with pytest.raises(DataError, match=r"bad.jsonl:2: a preference pair needs 'chosen' and 'rejected'"):
        load_preference_pairs(bad, base)
    kept, skipped = load_preference_pairs(bad, base, skip_bad=True)
    assert len(kept) == 1 and [s.split(": ", 1)[0].rsplit(":", 1)[1] for s in skipped] == ["2", "3", "4"]
    assert "the same answer" in skipped[1] and "ends with an assistant turn" in skipped[2]

    def spec(**adapter):
        return fleet_spec_from_dict({"base": "b", "output": "o", "adapters": [{"name": "x", "data": "d", **adapter}]})

    with pytest.raises(ConfigError, match="reference: init needs init_from"):
        spec(objective="dpo", reference="init")
    with pytest.raises(ConfigError, match="loss_weights belong to objective: mpo"):
        spec(loss_weights=[1, 1, 1])
    with pytest.raises(ConfigError, match="loss_weights must be three non-negative numbers"):
        spec(objective="mpo", loss_weights=[1, 1])
    with pytest.raises(ConfigError, match="objective 'ppo' is not one of sft, dpo, mpo"):
        spec(objective="ppo")
    assert spec(objective="mpo", loss_weights=[1, 0, 1]).adapters[0].loss_weights == [1, 0, 1]


@pytest.mark.slow
def test_the_demos_preference_stage_corrects_marketing_against_its_own_weights(trained_demo):
    from lorafleet.demo.preference import ADAPTER, run_preference_stage

    out, rows = trained_demo
    result = run_preference_stage(out, progress=False)  # the default 30 steps, as `demo --preference`
    assert (out / "preference" / "adapters" / ADAPTER / "adapter_model.safetensors").exists()
    assert result.reward_accuracy_last >= result.reward_accuracy_first and result.reward_accuracy_last >= 0.9
    marketing = next(row for row in rows if row.adapter == "marketing")
    assert result.accuracy_before == marketing.adapter_accuracy and result.accuracy_after >= 0.9


def test_lorafleet_eval_on_held_out_pairs_agrees_with_training(model_dir, tmp_path, capsys):
    from lorafleet.cli import main
    from lorafleet.governance.registry import Registry

    held_out = write_pairs(tmp_path / "held-out.jsonl", n=10, seed=5)
    adapter = AdapterSpec(
        name="colours", data=str(write_pairs(tmp_path / "train.jsonl", n=16)), objective="dpo", rank=4, steps=3,
        micro_batch_size=4, learning_rate=1e-3, eval_data=str(held_out),
    )  # fmt: skip
    fleet = tmp_path / "fleet"
    train_fleet(FleetSpec(base=str(model_dir), output=str(fleet), adapters=[adapter]), progress=False)
    trained = json.loads((fleet / "metrics.jsonl").read_text().splitlines()[-1])

    assert main(["eval", "--fleet", str(fleet), "--data", str(held_out), "--json", str(tmp_path / "e.json")]) == 0
    printed = capsys.readouterr().out
    assert "prefers chosen" in printed and "10 held-out pairs" in printed
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["pairs"] == 10 and set(scores["prefers_chosen"]) == {"base", "colours"}
    assert scores["reward_accuracy"]["colours"] == pytest.approx(trained["eval_reward_accuracy"])
    assert scores["reward_margin"]["colours"] * adapter.beta == pytest.approx(trained["eval_reward_margin"], rel=1e-4)
    recorded = Registry(fleet).find("colours").evaluation[hashlib.sha256(held_out.read_bytes()).hexdigest()]
    assert recorded["format"] == "preference" and recorded["reward_accuracy"] == scores["reward_accuracy"]["colours"]
