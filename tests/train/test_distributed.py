"""The fleet on several processes (gloo, CPU): adapter-parallel and data-parallel runs (the base whole
or sharded), SFT and preference adapters alike, end with the adapters the single-process fleet
trains, a run stopped on three processes resumes on two (or on one) with the same result, and a
process that fails stops the others with its message.

Each run spawns real processes that join a real process group on 127.0.0.1, as torchrun's workers do.
Runs compared with each other compute in float64 (tests/tolerances.py says why, and derives the bounds).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from lorafleet.config import AdapterSpec, FleetSpec, ParallelSpec
from lorafleet.train import distributed
from lorafleet.train.trainer import FleetTrainer, train_fleet
from tests import tolerances
from tests.conftest import write_image_dataset, write_text_dataset

TIMEOUT_S = 240  # a whole run, start-up included, on a busy 2-core machine
# fork: the processes start with torch and transformers already imported (spawn re-imports them,
# ~6 s of CPU each); the parent holds no CUDA context and no process group, so forking is safe.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized() else "spawn"


class Crash(Exception):
    pass


class CrashAt:
    """on_step: raise at fleet step `step` on the listed ranks."""

    def __init__(self, step: int, ranks: list[int], rank: int) -> None:
        self.step, self.crashes = step, rank in ranks

    def __call__(self, step: int) -> None:
        if self.crashes and step == self.step:
            raise Crash(f"stopped at fleet step {step}")


def _worker(rank: int, world: int, port: int, spec: FleetSpec, resume: bool, crash: tuple | None, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    on_step = CrashAt(crash[0], crash[1], rank) if crash else None
    try:
        with distributed.process_group(spec) as group:
            trainer = FleetTrainer(spec, progress=False, on_step=on_step, group=group)
            result = trainer.run(resume=resume)
        outcome = {"error": None, "adapters": sorted(result.adapters), "fleet_steps": result.fleet_steps}
        outcome["held"] = weights_held(trainer.base.model)
    except Exception as err:
        outcome = {"error": f"{type(err).__name__}: {err}"}
    Path(out, f"rank-{rank}.json").write_text(json.dumps(outcome))


def weights_held(model: torch.nn.Module) -> float:
    """The fraction of the model's weights this process holds (less than 1 when sharded)."""
    from torch.distributed.tensor import DTensor

    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return sum(t.numel() for t in local) / sum(p.numel() for p in model.parameters())


def run_processes(spec: FleetSpec, world: int, tmp_path: Path, resume=False, crash=None) -> list[dict]:
    """Every process's outcome (its error, or the adapters it knows finished)."""
    out = tmp_path / f"outcomes-{time.monotonic_ns()}"
    out.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.start_processes(
        _worker, (world, port, spec, resume, crash, str(out)), nprocs=world, join=False, start_method=START_METHOD
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        assert time.monotonic() < deadline, "the processes did not finish in time (a hang)"
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(world)]


def fleet(tmp_path: Path, base: Path, output: str, mode: str, **fleet_args) -> FleetSpec:
    """Two SFT adapters, an MPO and a DPO one, of different ranks, micro-batches and accumulation."""
    from tests.train.test_preference import write_pairs

    data = [write_text_dataset(tmp_path / f"d{i}.jsonl", n=10 + i, seed=i) for i in range(2)]
    pairs = [write_pairs(tmp_path / f"p{i}.jsonl", n=6 + i, seed=i) for i in range(2)]  # both over two epochs
    adapters = [
        AdapterSpec(name="a", data=str(data[0]), rank=4, micro_batch_size=2, grad_accum=3, steps=3, learning_rate=3e-3),
        AdapterSpec(name="b", data=str(data[1]), rank=2, micro_batch_size=3, steps=5, learning_rate=3e-3),
        AdapterSpec(
            name="c", data=str(pairs[0]), objective="mpo", rank=3, micro_batch_size=2, steps=7, learning_rate=3e-3
        ),
        AdapterSpec(
            name="d", data=str(pairs[1]), objective="dpo", rank=2, micro_batch_size=2, grad_accum=2, steps=4,
            learning_rate=3e-3,
        ),
    ]  # fmt: skip
    settings = dict(checkpoint_every=4, keep_checkpoints=1, length_multiple=8, dtype="float64") | fleet_args
    parallel = ParallelSpec(mode=mode, timeout_minutes=2)
    return FleetSpec(base=str(base), output=str(tmp_path / output), adapters=adapters, parallel=parallel, **settings)


def weights(output: str) -> dict[str, dict[str, torch.Tensor]]:
    adapters = Path(output) / "adapters"
    return {path.name: load_file(path / "adapter_model.safetensors") for path in sorted(adapters.iterdir())}


def assert_same_adapters(spec: FleetSpec, reference: FleetSpec) -> None:
    """The adapters `spec` trained equal `reference`'s, to what float64 rounding can move them."""
    ours, theirs = weights(spec.output), weights(reference.output)
    assert ours.keys() == {a.name for a in spec.adapters}
    tolerances.assert_same_weights(ours, theirs, tolerances.fleet_weights(spec.adapters))


def assert_same_metrics(spec: FleetSpec, reference: FleetSpec, keys=("loss", "grad_norm")) -> None:
    """The same records in the same order, each of `keys` within what the weights' rounding moves it."""
    ours, theirs = metric_records(spec.output), metric_records(reference.output)
    assert [(r["adapter"], r["step"], r["tokens"]) for r in ours] == [
        (r["adapter"], r["step"], r["tokens"]) for r in theirs
    ]
    parameters = max(sum(t.numel() for t in tensors.values()) for tensors in weights(reference.output).values())
    gradient_norm = max(record["grad_norm"] for record in theirs)
    tolerance = tolerances.metric(tolerances.fleet_weights(spec.adapters), parameters, gradient_norm)
    for mine, reference_record in zip(ours, theirs, strict=True):
        assert mine.keys() == reference_record.keys()
        for key in keys:
            if key in reference_record:
                difference = abs(mine[key] - reference_record[key])
                assert difference <= tolerance * max(1.0, abs(reference_record[key])), (
                    mine["adapter"],
                    key,
                    difference,
                )


PREFERENCE_METRICS = ("loss", "reward_margin", "reward_accuracy", "loss_sft", "grad_norm")


def metric_records(output: str) -> list[dict]:
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def metric_steps(output: str) -> list[tuple[str, int]]:
    lines = (Path(output) / "metrics.jsonl").read_text().splitlines()
    return sorted((record["adapter"], record["step"]) for record in map(json.loads, lines))


def test_adapter_parallel_run_stopped_on_three_processes_resumes_on_two_with_the_single_process_adapters(
    tiny_lm_dir, tmp_path
):
    single = fleet(tmp_path, tiny_lm_dir, "single", "adapter", max_concurrent=2)
    train_fleet(single, progress=False)

    spec = fleet(tmp_path, tiny_lm_dir, "parallel", "adapter", max_concurrent=2)
    stopped = run_processes(spec, 3, tmp_path, crash=(6, [0, 1, 2]))
    assert all(outcome["error"] for outcome in stopped)  # every process stopped (or saw the others stop)
    checkpoints = sorted((Path(spec.output) / "checkpoints").iterdir())
    assert [path.name for path in checkpoints] == ["step-00000004.pt"]

    resumed = run_processes(spec, 2, tmp_path, resume=True)
    assert [outcome["error"] for outcome in resumed] == [None, None]
    assert resumed[0]["adapters"] == ["a", "b", "c", "d"]  # process 0 knows the whole fleet
    assert_same_adapters(spec, single)
    # process 0 alone wrote the metrics: every optimizer step of every adapter once, as one process does
    assert metric_steps(spec.output) == metric_steps(single.output)
    assert all((Path(spec.output) / "adapters" / name / "lineage.json").exists() for name in "abcd")
    assert not (Path(spec.output) / distributed.ERRORS_DIR).exists()


def test_adapter_parallel_hands_queued_adapters_to_a_process_that_is_done(tiny_lm_dir, tmp_path):
    """One adapter of many tokens but two fleet steps on process 0; three light ones queued on
    process 1 (max_concurrent 1). When they meet at fleet step 2, process 0 is done and takes a
    queued adapter: 12 fleet steps instead of the 18 process 1 would need alone."""
    data = [write_text_dataset(tmp_path / f"d{i}.jsonl", n=16, seed=i) for i in range(4)]
    adapters = [AdapterSpec(name="heavy", data=str(data[0]), rank=2, micro_batch_size=8, steps=2)]
    adapters += [AdapterSpec(name=f"light{i}", data=str(data[i]), rank=2, steps=6) for i in (1, 2, 3)]
    settings = dict(max_concurrent=1, checkpoint_every=2, length_multiple=8, dtype="float64")
    single = FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "single"), adapters=adapters, **settings)
    train_fleet(single, progress=False)
    parallel = ParallelSpec(mode="adapter", timeout_minutes=2)
    spec = dataclasses.replace(single, output=str(tmp_path / "parallel"), parallel=parallel)

    outcomes = run_processes(spec, 2, tmp_path)

    assert [outcome["error"] for outcome in outcomes] == [None, None]
    assert outcomes[0]["fleet_steps"] == 12
    assert_same_adapters(spec, single)
    assert metric_steps(spec.output) == metric_steps(single.output)


def test_data_parallel_run_equals_the_single_process_run_and_resumes_on_one_process(tiny_lm_dir, tmp_path):
    single = fleet(tmp_path, tiny_lm_dir, "single", "data")
    train_fleet(single, progress=False)

    spec = fleet(tmp_path, tiny_lm_dir, "parallel", "data")
    stopped = run_processes(spec, 2, tmp_path, crash=(6, [0, 1]))
    assert all("Crash" in outcome["error"] for outcome in stopped)
    # step 4's checkpoint falls inside "a"'s and "d"'s gradient accumulation: it holds both processes' sum
    FleetTrainer(spec, progress=False).run(resume=True)

    assert_same_adapters(spec, single)
    assert_same_metrics(spec, single)


def test_a_process_that_fails_stops_the_others_with_its_message(tiny_lm_dir, tmp_path):
    spec = fleet(tmp_path, tiny_lm_dir, "out", "data", checkpoint_every=0)
    started = time.monotonic()
    outcomes = run_processes(spec, 2, tmp_path, crash=(3, [1]))
    assert outcomes[1]["error"] == "Crash: stopped at fleet step 3"
    assert "rank-1 failed: Crash: stopped at fleet step 3" in outcomes[0]["error"]
    assert "--resume" in outcomes[0]["error"]
    assert time.monotonic() - started < 60  # well inside the two-minute collective timeout: no hang


def test_data_parallel_over_a_sharded_vlm_base_equals_the_single_process_run(tiny_vlm_dir, tmp_path):
    """FSDP2: the tiny InternVL-style base (vision tower, projector, language model) sharded over two
    processes, each decoder and vision layer gathered for its forward and backward."""
    data = [write_image_dataset(tmp_path / f"i{i}.jsonl", n=6, seed=i) for i in range(2)]
    adapters = [
        AdapterSpec(name="a", data=str(data[0]), rank=4, micro_batch_size=2, grad_accum=2, steps=2, learning_rate=3e-3),
        AdapterSpec(name="b", data=str(data[1]), rank=2, micro_batch_size=3, steps=3, learning_rate=3e-3),
    ]
    settings = dict(checkpoint_every=0, dtype="float64")
    single = FleetSpec(base=str(tiny_vlm_dir), output=str(tmp_path / "single"), adapters=adapters, **settings)
    train_fleet(single, progress=False)
    parallel = ParallelSpec(mode="data", timeout_minutes=2, shard_base=True)
    spec = dataclasses.replace(single, output=str(tmp_path / "sharded"), parallel=parallel)

    outcomes = run_processes(spec, 2, tmp_path)

    assert [outcome["error"] for outcome in outcomes] == [None, None]
    assert all(outcome["held"] < 0.7 for outcome in outcomes)  # only the head (tied to the embeddings) is whole
    assert_same_adapters(spec, single)


def test_lorafleet_train_under_torchrun_trains_the_fleet_and_reports_once(tiny_lm_dir, tmp_path):
    """The real launch: `python -m torch.distributed.run --nproc-per-node 2 -m lorafleet train`."""
    data = write_text_dataset(tmp_path / "d.jsonl", n=8, seed=0)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(
        f"base: {tiny_lm_dir}\noutput: out\nlength_multiple: 8\nparallel: {{mode: data}}\nadapters:\n"
        + "".join(f"  - {{name: a{i}, data: {data}, rank: 2, micro_batch_size: 2, steps: 2}}\n" for i in range(2))
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [*command, "-m", "lorafleet", "train", str(fleet), "--no-progress"],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path, env=environment,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    reported = [line.split(":")[0] for line in run.stdout.splitlines() if line.startswith("a")]
    assert reported == ["a0", "a1"]  # process 0 alone prints
    assert (tmp_path / "out" / "report.html").exists()
    assert sorted(path.name for path in (tmp_path / "out" / "adapters").iterdir()) == ["a0", "a1"]


def test_data_parallel_preference_adapters_equal_the_single_process_run(tiny_lm_dir, tmp_path):
    """DPO and MPO split by pairs: each process scales the pair terms by its share of the pairs and
    MPO's SFT term by its share of the chosen answers' tokens; the checkpoint holds the reference
    log-probabilities every process computed."""
    from lorafleet.state import load_state
    from tests.train.test_preference import write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=10)
    text = write_text_dataset(tmp_path / "d.jsonl", n=10, seed=0)
    small = dict(rank=2, learning_rate=3e-3)
    adapters = [
        AdapterSpec(name="d", data=str(pairs), objective="dpo", steps=6, micro_batch_size=3, **small),
        AdapterSpec(name="m", data=str(pairs), objective="mpo", steps=3, micro_batch_size=2, grad_accum=2, **small),
        AdapterSpec(name="s", data=str(text), steps=6, micro_batch_size=2, **small),
    ]
    settings = dict(checkpoint_every=4, keep_checkpoints=1, length_multiple=8, dtype="float64")
    single = FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "single"), adapters=adapters, **settings)
    train_fleet(single, progress=False)
    parallel = ParallelSpec(mode="data", timeout_minutes=2)
    spec = dataclasses.replace(single, output=str(tmp_path / "parallel"), parallel=parallel)

    stopped = run_processes(spec, 2, tmp_path, crash=(5, [0, 1]))
    assert all("Crash" in outcome["error"] for outcome in stopped)
    saved = load_state(Path(spec.output) / "checkpoints" / "step-00000004.pt")
    assert len(saved["reference_logps"]["d"]) == 10  # 4 steps x 3 pairs: every pair, from both processes
    resumed = run_processes(spec, 2, tmp_path, resume=True)
    assert [outcome["error"] for outcome in resumed] == [None, None]

    assert_same_adapters(spec, single)
    assert_same_metrics(spec, single, PREFERENCE_METRICS)


def test_a_share_of_the_pairs_scales_preference_statistics_in_their_own_dtype():
    """A process's share (here 1/3) scales its preference statistics in their dtype: a float64 run
    logs float64 numbers (the share used to be rounded to float32 first: 3e-8 off)."""
    from lorafleet.train.objectives import AnswerLogProbs, objective_for, preference_loss

    values = lambda *numbers: torch.tensor(numbers, dtype=torch.float64)  # noqa: E731
    logps = AnswerLogProbs(values(-20.0, -21.0), values(-20.5, -20.5), values(1, 1), torch.float64)
    for objective in ("dpo", "mpo"):
        spec = AdapterSpec(name="x", data="x", objective=objective)
        _, whole = preference_loss(spec, logps)
        _, share = objective_for(spec).shared_loss(logps, 1 / 3, 1 / 3)
        assert torch.equal(share, whole * (1 / 3)), objective


def test_sharded_base_trains_shuffled_preference_pairs_over_epochs_like_one_process(tiny_lm_dir, tmp_path):
    """DPO and MPO over an FSDP2-sharded base, shuffled, two epochs: from the second epoch a process
    trains pairs whose references another process computed. Every process must still take part in
    every reference forward (each gathers the sharded layers from all), or one waits in an all-gather
    until the timeout, here 15 s instead of the default 30 minutes."""
    from tests.train.test_preference import write_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    # 4 steps an epoch; with seed 2 the second epoch's first micro-batch gives process 0 a pair new to
    # it and process 1 one it has seen (seed 0 happens to keep the two processes in step)
    small = dict(data=str(pairs), rank=2, micro_batch_size=2, steps=8, learning_rate=3e-3, seed=2)
    # held-out pairs in chunks of 2 and 1: every process evaluates them, over the sharded base
    held_out = dict(eval_data=str(write_pairs(tmp_path / "held-out.jsonl", n=3, seed=7)), eval_every=4)
    adapters = [
        AdapterSpec(name="d", objective="dpo", **small, **held_out),
        AdapterSpec(name="m", objective="mpo", **small),
    ]
    settings = dict(checkpoint_every=0, length_multiple=8, dtype="float64")
    single = FleetSpec(base=str(tiny_lm_dir), output=str(tmp_path / "single"), adapters=adapters, **settings)
    train_fleet(single, progress=False)
    parallel = ParallelSpec(mode="data", shard_base=True, timeout_minutes=0.25)
    spec = dataclasses.replace(single, output=str(tmp_path / "sharded"), parallel=parallel)

    outcomes = run_processes(spec, 2, tmp_path)

    assert [outcome["error"] for outcome in outcomes] == [None, None]
    assert all(outcome["held"] < 1 for outcome in outcomes)
    assert_same_adapters(spec, single)
    assert_same_metrics(spec, single, PREFERENCE_METRICS + ("eval_loss", "eval_reward_margin", "eval_reward_accuracy"))
    assert [r["step"] for r in metric_records(spec.output) if "eval_loss" in r] == [4, 8]
