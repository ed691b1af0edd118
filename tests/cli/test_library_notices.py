"""Commands that load a model print lorafleet's output, not harmless notices of the libraries below it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import yaml

from tests.conftest import write_text_dataset

# bitsandbytes, imported by peft and transformers, logs this on CPUs with AVX512-BF16 unless the
# `kernels` package can fetch a faster kernel from the Hub; its own CPU kernel serves instead.
BITSANDBYTES_NOTICE = "Failed to load CPU gemm_4bit_forward"


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow
def test_commands_that_load_a_model_print_no_bitsandbytes_kernel_notice(tiny_lm_dir, tmp_path):
    if importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("bitsandbytes is not installed (it comes with the test and qlora extras)")
    if BITSANDBYTES_NOTICE not in run(sys.executable, "-c", "import bitsandbytes"):
        pytest.skip("bitsandbytes prints no such notice on this machine (no AVX512-BF16, or `kernels` installed)")
    data = write_text_dataset(tmp_path / "chats.jsonl", 8, seed=0)
    adapter = {"name": "finance", "data": str(data), "rank": 4, "steps": 2, "micro_batch_size": 2}
    spec = {"base": str(tiny_lm_dir), "output": str(tmp_path / "run"), "checkpoint_every": 0, "adapters": [adapter]}
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(spec))
    lorafleet = (sys.executable, "-m", "lorafleet")
    printed = {
        "train": run(*lorafleet, "train", str(tmp_path / "fleet.yaml"), "--no-progress"),
        "eval": run(*lorafleet, "eval", "--fleet", str(tmp_path / "run"), "--data", str(data), "--no-progress"),
    }
    assert "finance" in printed["eval"], printed["eval"]
    assert {command: BITSANDBYTES_NOTICE in output for command, output in printed.items()} == dict.fromkeys(
        printed, False
    )
