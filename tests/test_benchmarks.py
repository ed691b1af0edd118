"""The benchmarks keep running: every script in benchmarks/ at its smallest size, and
benchmarks/gpu_suite.sh end to end on the CPU with tiny models and without the packages the GPU
machine's image lacks (tests/device_image), as it must run before any GPU run.

Speed is measured by the benchmarks, never asserted here: these check that each run ends well and
writes what its readers expect (positive numbers under the keys docs/benchmarks.md quotes).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
GPU_SUITE = BENCHMARKS / "gpu_suite.sh"
DEVICE_IMAGE = REPO / "tests" / "device_image"

# The scripts the GPU suite does not run, at their smallest size (the suite runs the others).
SMALLEST = {
    "preference_reference.py": ["--steps", "2", "--pairs", "8"],
    "distributed_cpu.py": ["--processes", "2", "--steps", "2", "--modes", "fsdp2"],
    "grammar_compile.py": ["--repeats", "2", "--sizes", "3,30"],
    "console_first_paint.py": ["--adapters", "3", "--metric-lines", "300", "--repeat", "1"],
    "gateway_overhead.py": ["--requests", "40", "--concurrency", "8"],  # starts a throwaway PostgreSQL and Redis
}
# Every row of the GPU suite at its smallest size on a CPU (gpu_suite.sh's knobs).
SMALLEST_SUITE = {
    "M15": "tiny",
    "M7": "tiny",
    "TRAIN_ARGS": "--seq-len 64 --steps 2 --warmup 1",
    "SERVE_ARGS": "--streams 4 --prompt-len 16 --tokens 8",
    "PROFILE_ARGS": "--seq-len 64",
    "SWEEP_ARGS": "--seq-len 64 --lrs 5e-3,1e-3 --ranks 4 --steps 4 --min-steps 1 --train-size 16 --test-size 4 "
    "--micro-batch-size 2",
    "TEST_ARGS": "-m gpu",  # the GPU tests (skipped here); the others in these files run in this suite
    "TIME_FACTOR": "4",  # the rows' time limits are a GPU's; a shared 2-core machine is slower
    # With both models tiny these rows run another row's command again: t-7b-4x1 is t-1.5b-4x1 (its
    # steps overridden by TRAIN_ARGS), serve-7b is serve-1.5b-32-adapters with fewer adapters
    "SKIP_ROWS": "t-7b-4x1 serve-7b",
    "DEADLINE": "1500",
}


def suite_rows() -> dict[str, tuple[str, str | None]]:
    """Each row of gpu_suite.sh: name -> (the script it runs, or "pytest"; its JSON file or None)."""
    text = GPU_SUITE.read_text().replace("\\\n", " ")
    scripts = dict(re.findall(r'^(\w+)="python3 benchmarks/(\w+)\.py"', text, re.M))
    rows = {}
    for name, command in re.findall(r"^row (\S+) \d+ (.*)$", text, re.M):
        runs = "pytest" if command.startswith("python3 -m pytest") else scripts[command.split()[0].lstrip("$")]
        json_file = re.search(r"--json \$R/(\S+\.json)", command)
        rows[name] = (runs, json_file.group(1) if json_file else None)
    return rows


def positive(result: dict, *paths: str) -> None:
    """Each dotted path of `result` holds a positive number, or a non-empty list or dict of them."""
    for path in paths:
        value = result
        for key in path.split("."):
            assert isinstance(value, dict) and key in value, f"no {path!r} in {result}"
            value = value[key]
        numbers = list(value.values()) if isinstance(value, dict) else value if isinstance(value, list) else [value]
        assert numbers and all(isinstance(n, int | float) and n > 0 for n in numbers), f"{path} = {value!r}"


def check_train_throughput(result: dict) -> None:
    positive(result, "lorafleet.tokens_per_s", "lorafleet.step_ms", "lorafleet.predicted_peak_gib")
    if result["peft"] is not None:
        positive(result, "peft.tokens_per_s", "speedup")


def check_serve_throughput(result: dict) -> None:
    positive(result, "lorafleet_engine_tok_s", "lorafleet_ms_per_token_step", "time_to_first_token_s")
    assert result["time_to_first_token_s"]["p50"] <= result["time_to_first_token_s"]["p99"]
    if result["peft_mixed_generate_tok_s"] is not None:
        positive(result, "peft_mixed_generate_tok_s", "hf_generate_no_lora_tok_s", "speedup_vs_peft")


def check_profile_train(result: dict) -> None:
    positive(result, "step_ms")


def check_preference_reference(result: dict) -> None:
    positive(result, "kept_ms_per_step", "every_step_ms_per_step", "epochs")


def check_distributed_cpu(result: dict) -> None:
    positive(result, "tokens_per_s")
    assert len(result["tokens_per_s"]) == 2, "one process, and the mode asked for"


def check_grammar_compile(result: dict) -> None:
    positive(result, "worker_start_s", "in_process_ms", "sandbox_cold_ms", "sandbox_cached_ms", "row_start_ms")


def check_console_first_paint(result: dict) -> None:
    positive(result, "first_contentful_paint_ms", "ready_ms")
    assert set(result["ready_ms"]) == {"fleet", "runs"}


def check_gateway_overhead(result: dict) -> None:
    for state in ("embedded", "shared"):
        positive(result, f"{state}.p50_ms", f"{state}.p99_ms", f"{state}.requests_per_s")
        assert result[state]["p50_ms"] <= result[state]["p99_ms"]


def check_sweep(result: dict) -> None:
    positive(result, "wall_s", "speedup_vs_peft", "speedup_vs_fleet", "peft_eval_loss")
    positive(result, "winner.eval_loss", "best_of_grid.eval_loss")
    assert result["winner"]["eval_loss"] >= result["best_of_grid"]["eval_loss"]


CHECKS = {
    "train_throughput": check_train_throughput,
    "serve_throughput": check_serve_throughput,
    "profile_train": check_profile_train,
    "preference_reference": check_preference_reference,
    "distributed_cpu": check_distributed_cpu,
    "grammar_compile": check_grammar_compile,
    "console_first_paint": check_console_first_paint,
    "gateway_overhead": check_gateway_overhead,
    "sweep": check_sweep,
}


def test_every_benchmark_script_runs_in_the_suite_and_has_a_check():
    scripts = {path.name for path in BENCHMARKS.glob("*.py")}
    in_gpu_suite = {f"{runs}.py" for runs, _ in suite_rows().values() if runs != "pytest"}
    assert in_gpu_suite == {"train_throughput.py", "serve_throughput.py", "profile_train.py", "sweep.py"}, (
        "the parser broke"
    )
    missing = scripts - in_gpu_suite - set(SMALLEST)
    assert not missing, f"give {sorted(missing)} a smallest size in SMALLEST (tests/test_benchmarks.py)"
    assert {name.removesuffix(".py") for name in scripts} <= set(CHECKS), "say in CHECKS what each script writes"


def test_benchmarks_reach_into_nothing_private():
    """A benchmark that patches or reads a private name breaks silently when that name changes
    (serve_throughput.py replaced Engine._account, whose arguments then changed): public hooks only."""
    private = [
        f"{path.name}:{node.lineno}: .{node.attr}"
        for path in sorted(BENCHMARKS.glob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
    ]
    assert not private, "\n".join(private)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMALLEST))
def test_a_benchmark_runs_at_its_smallest_size(script, tmp_path):
    result_file = tmp_path / "result.json"
    command = [sys.executable, str(BENCHMARKS / script), *SMALLEST[script], "--json", str(result_file)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    CHECKS[script.removesuffix(".py")](json.loads(result_file.read_text()))


@pytest.mark.slow
def test_the_gpu_suite_runs_end_to_end_on_the_cpu_without_the_packages_the_gpu_image_lacks(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    pythonpath = os.pathsep.join(filter(None, [str(DEVICE_IMAGE), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, **SMALLEST_SUITE, OUT=str(out), RESULTS=str(results), PYTHONPATH=pythonpath)
    done = subprocess.run(["bash", str(GPU_SUITE)], env=env, capture_output=True, text=True, timeout=1600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = {line.split(":")[0]: line for line in (results / "summary.txt").read_text().splitlines()}
    rows = {name: row for name, row in suite_rows().items() if name not in SMALLEST_SUITE["SKIP_ROWS"].split()}
    assert set(rows) <= set(summary), f"rows without a summary line:\n{done.stdout}"
    failed = {name: (results / f"{name}.log").read_text()[-3000:] for name in rows if " rc=0 " not in summary[name]}
    assert not failed, "\n\n".join(f"{summary[name]}\n{log}" for name, log in failed.items())
    for runs, json_file in rows.values():
        if json_file is not None:
            CHECKS[runs](json.loads((results / json_file).read_text()))
    assert (out / "gpu-results.tgz").stat().st_size > 0
