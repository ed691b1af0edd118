"""The GPU suite imports on the GPU machine's image, which has torch, transformers and peft but no
web server, no grammar support and none of the data, governance or test-only extras
(tests/device_image/sitecustomize.py lists them). A GPU run is short and rare: an import error
found there costs the run, so it is found here, on the CPU, with those packages hidden."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GPU_SUITE = REPO / "benchmarks" / "gpu_suite.sh"
DEVICE_IMAGE = REPO / "tests" / "device_image"

# What a GPU run needs beyond the suite's own scripts: training, and the engine without grammars.
CORE = ["lorafleet.train", "lorafleet.train.trainer", "lorafleet.serve.engine", "lorafleet.serve.engine.engine"]

IMPORT_AND_COLLECT = """
import importlib, sys
import pytest
try:
    import llguidance
except ModuleNotFoundError:
    pass
else:
    sys.exit("llguidance imported: the device image's packages are not hidden")
for name in sys.argv[1].split(","):
    importlib.import_module(name)
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *sys.argv[2].split(",")]))
"""


@pytest.mark.slow
def test_the_gpu_suite_imports_and_collects_without_the_packages_the_gpu_image_lacks():
    suite = GPU_SUITE.read_text().replace("\\\n", " ")  # its commands, continued lines joined
    scripts = sorted(set(re.findall(r"python3 benchmarks/(\w+)\.py", suite)))
    test_files = re.findall(r"tests/\S+\.py", re.search(r"^row \S+ \d+ python3 -m pytest (.*)$", suite, re.M)[1])
    assert "serve_throughput" in scripts and "tests/serve/test_decode.py" in test_files, "gpu_suite.sh changed shape"
    # the PYTHONPATH gpu_suite.sh sets, behind the folder that hides the absent packages
    path = [DEVICE_IMAGE, REPO / "src", REPO, REPO / "benchmarks"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, path)))
    command = [sys.executable, "-c", IMPORT_AND_COLLECT, ",".join(CORE + scripts), ",".join(test_files)]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert re.search(r"\d+ tests? collected", done.stdout), done.stdout  # pytest exits 2 on a collection error
