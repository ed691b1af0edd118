"""Makes this Python see the GPU machine's image: the packages that image lacks are not installed.

Put this folder first on PYTHONPATH and every Python started with it (pytest, torchrun, the rows of
benchmarks/gpu_suite.sh, their subprocesses) finds none of ABSENT: `import` fails as it would
there, `importlib.util.find_spec` returns None and `importlib.metadata` knows no such distribution,
so libraries that probe for optional packages (transformers, peft) take the path they take there.

    PYTHONPATH=tests/device_image bash benchmarks/gpu_suite.sh

The image (an H200 machine's, 2026-12) holds torch, triton, transformers, peft, numpy, pyyaml,
safetensors, tokenizers, pillow, tqdm, pyarrow, matplotlib, prometheus-client, httpx and pytest:
not the web server, grammar support, nor the data, governance, replicas and test-only extras.
tests/test_device_image.py and tests/test_benchmarks.py run under it.
"""

from __future__ import annotations

import importlib.abc
import sys

ABSENT = frozenset({
    "llguidance", "fastapi", "starlette", "uvicorn", "openai", "cryptography", "datasketch", "phonenumbers",
    "pypdf", "bitsandbytes", "trl", "datasets", "spacy", "langchain_openai", "compressed_tensors",
    "psycopg", "psycopg_binary", "redis",
})  # fmt: skip


def absent(name: str) -> bool:
    """A module or distribution name (`compressed-tensors`, `uvicorn.config`) of an absent package."""
    return name.partition(".")[0].lower().replace("-", "_") in ABSENT


class WithoutAbsentPackages(importlib.abc.MetaPathFinder):
    """One finder of sys.meta_path, blind to the absent packages (it never finds them)."""

    def __init__(self, finder) -> None:
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        return None if absent(name) else self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        found = getattr(self.finder, "find_distributions", lambda *a, **k: ())(*args, **kwargs)
        return (d for d in found if not absent(d.metadata["Name"] or ""))

    def __getattr__(self, name: str):  # invalidate_caches and the like
        return getattr(self.finder, name)


sys.meta_path[:] = [WithoutAbsentPackages(finder) for finder in sys.meta_path]
