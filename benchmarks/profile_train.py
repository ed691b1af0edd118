"""Where a fleet step's time goes: step times, Python (cProfile) and operators (torch.profiler).

    python benchmarks/profile_train.py --model qwen2.5-1.5b --adapters 4 --seqs 1

Steps 3-6 run under cProfile, steps 7-8 under torch.profiler (CPU and CUDA activities); the
tables go to stdout, a Chrome trace to --trace if given, the step times (and on CUDA the GPU's
busy time per step) to --json if given.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import PRESETS, adapter_specs, build_base, write_data  # noqa: E402

from lorafleet.config import FleetSpec  # noqa: E402
from lorafleet.train.trainer import FleetTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=PRESETS, default="tiny")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--seqs", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--trace", type=Path, help="write a Chrome trace of the profiled steps here")
    parser.add_argument("--json", type=Path, help="write the step times here")
    args = parser.parse_args()
    logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    base = build_base(args.model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    workdir = tempfile.TemporaryDirectory()  # data and the trained adapters; removed after the run
    tmp = Path(workdir.name)
    options = SimpleNamespace(rank=16, seqs=args.seqs, warmup=3, steps=7, dora=0)
    data = [write_data(tmp, f"a{i}", 64, args.seq_len, i) for i in range(args.adapters)]
    spec = FleetSpec(base=str(base.path), output=str(tmp / "out"), adapters=adapter_specs(options, data),
                     checkpoint_every=0, max_concurrent=args.adapters)  # fmt: skip
    python, operators, marks = cProfile.Profile(), None, []
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def on_step(step: int) -> None:
        nonlocal operators
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.perf_counter())
        if step == 3:
            python.enable()
        if step == 7:
            python.disable()
            operators = torch.profiler.profile(activities=activities)
            operators.__enter__()
        if step == 9 and operators is not None:
            operators.__exit__(None, None, None)
            if args.trace:
                operators.export_chrome_trace(str(args.trace))

    FleetTrainer(spec, base=base, progress=False, on_step=on_step).run()
    workdir.cleanup()
    step_ms = [round((b - a) * 1000, 1) for a, b in zip(marks, marks[1:], strict=False)]
    print("fleet step ms:", step_ms)
    busy = None
    for order, rows in (("tottime", 30), ("cumulative", 30)):
        out = io.StringIO()
        pstats.Stats(python, stream=out).sort_stats(order).print_stats(rows)
        print(out.getvalue()[:9000])
    if operators is not None:
        averages = operators.key_averages()
        print(averages.table(sort_by="self_cpu_time_total", row_limit=30)[:9000])
        if device.type == "cuda":
            print(averages.table(sort_by="self_cuda_time_total", row_limit=30)[:9000])
            busy = sum(event.self_device_time_total for event in averages) / 1000 / 2
            print(f"GPU busy per step: {busy:.1f} ms (kernels' self time over the 2 profiled steps)")
    if args.json:
        result = {"model": args.model, "adapters": args.adapters, "seqs": args.seqs, "seq_len": args.seq_len,
                  "step_ms": step_ms, "gpu_busy_ms_per_step": busy}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
