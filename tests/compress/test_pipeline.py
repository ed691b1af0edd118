"""The whole prune → distil → quantize pipeline on the demo fleet: a department's adapter merged
and compressed keeps its held-out accuracy within a stated margin while the model on disk shrinks
at least 3×. One department: the three take the same path through the pipeline (half a minute
each on two cores), and facilities, whose adapter is the least accurate, has the least room to
lose; tests/compress/test_{prune,distil,quantize}.py hold each stage on its own."""

from __future__ import annotations

import pytest

from lorafleet.compress.distil import DistilOptions
from lorafleet.compress.prune import PruneRequest
from lorafleet.compress.run import CompressOptions, compress
from lorafleet.eval.greedy import base_exact_match
from lorafleet.models.loading import load_base

ACCURACY_MARGIN = 0.10  # at most 10 points of held-out exact match lost


pytestmark = pytest.mark.slow  # trains the demo fleet once, then compresses one department's model


@pytest.fixture(scope="module")
def demo(trained_demo):
    out, rows = trained_demo
    return out, {row.adapter: row.adapter_accuracy for row in rows}


def test_compressed_adapter_model_keeps_accuracy_and_is_3x_smaller(demo, tmp_path):
    out, trained_accuracy = demo
    department = "facilities"
    data = out / "data"
    report = compress(
        CompressOptions(
            out / "base",
            tmp_path / "small",
            adapter=out / "adapters" / department,
            calib=data / f"{department}.jsonl",
            calib_limit=64,
            prune=PruneRequest(mlp=0.5),
            distil_data=data / f"{department}.jsonl",
            distil=DistilOptions(steps=100, learning_rate=3e-3),
            quantize="int4",
            eval_data=data / f"{department}-test.jsonl",
        ),
        log=lambda _: None,
        exact_match=base_exact_match,
    )
    stages = report["stages"]
    # the merged adapter answers as the adapter did
    assert stages["original"]["accuracy"] == pytest.approx(trained_accuracy[department])
    assert stages["quantized"]["accuracy"] >= stages["original"]["accuracy"] - ACCURACY_MARGIN
    assert stages["original"]["bytes"] >= 3 * stages["quantized"]["bytes"]
    assert report["adapters"].startswith("merged")
    assert load_base(tmp_path / "small").is_multimodal  # serve and train read it back
