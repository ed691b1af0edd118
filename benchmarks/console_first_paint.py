"""Time to first paint of the web console's Fleet and Runs pages in headless Chromium.

`lorafleet console` serves a fleet directory on 127.0.0.1 and a fresh Chromium tab opens each page
`--repeat` times; per page it reports the median of two times from the page's navigation start:
the browser's first contentful paint, and when the page's data is drawn (the console's
`lorafleet:<page>-ready` performance mark: the tables and lineage graph filled, the charts drawn),
and the latter for the first tab alone, which pays for the server's one full read of the metrics.

The fleet is either one on disk (`--fleet demo-out`, after `lorafleet demo`) or a synthetic one
written here: `--adapters N` registry records and adapter directories and a metrics.jsonl of
`--metric-lines` lines (the adapters stepping in groups of four, as a fleet does). docs/benchmarks.md
quotes the demo and 50 adapters with 100k lines.

    python benchmarks/console_first_paint.py --fleet demo-out --json first-paint-demo.json
    python benchmarks/console_first_paint.py --adapters 50 --metric-lines 100000 --json first-paint-50.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from lorafleet.fleet_dir import FleetDir
from lorafleet.governance.lineage import DataFile, Lineage
from lorafleet.governance.registry import Registry

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
CHROMIUM_FLAGS += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = ("fleet", "runs")
GROUP = 4  # adapters that step together in the synthetic run


def synthetic_fleet(root: Path, adapters: int, metric_lines: int) -> Path:
    """A fleet directory with `adapters` registered adapters (config and a small weights file each)
    and a metrics.jsonl of `metric_lines` lines."""
    fleet = FleetDir(root)
    registry = Registry(root)
    try:
        for index in range(adapters):
            registry.add(synthetic_adapter(fleet, f"adapter-{index:03d}", index))
    finally:
        registry.close()
    names = [f"adapter-{index:03d}" for index in range(adapters)]
    with fleet.metrics.open("w") as out:
        written, fleet_step = 0, 0
        while written < metric_lines:
            fleet_step += 1
            group = (fleet_step - 1) % max(1, adapters // GROUP)
            for name in names[group * GROUP : (group + 1) * GROUP][: metric_lines - written]:
                out.write(json.dumps(metric_line(name, fleet_step)) + "\n")
                written += 1
    return root


def synthetic_adapter(fleet: FleetDir, name: str, index: int) -> Lineage:
    directory = fleet.adapter(name)
    directory.mkdir(parents=True)
    config = {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    weights = hashlib.sha256(name.encode()).digest() * 64
    (directory / "adapter_model.safetensors").write_bytes(weights)
    data_sha = hashlib.sha256(f"data-{name}".encode()).hexdigest()
    return Lineage(
        name=name,
        kind="adapter",
        directory=str(directory),
        weights_sha256={"adapter_model.safetensors": hashlib.sha256(weights).hexdigest()},
        base={"path": str(fleet.base), "weights_sha256": {}},
        data=[DataFile(f"data/{name}.jsonl", data_sha, 1000, 45000, 1000, None, 0)],
        adapter_config=config,
        finished="2025-01-01T00:00:00Z",
        loss={"final": 0.1 + index / 1000, "steps": 2000},
        evaluation={data_sha: {"data": f"data/{name}-test.jsonl", "accuracy": 0.9, "base_accuracy": 0.1}},
    )


def metric_line(name: str, fleet_step: int) -> dict:
    loss = 2.0 / (1 + fleet_step / 100)
    return {
        "adapter": name,
        "step": fleet_step,
        "fleet_step": fleet_step,
        "loss": loss,
        "lr": 1e-3,
        "tokens": 400 * fleet_step,
        "elapsed_s": fleet_step * 0.05,
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_console(fleet: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorafleet", "console", "--fleet", str(fleet), "--port", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"lorafleet console exited: {process.stderr.read()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ui/", timeout=2)
            return process
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit("lorafleet console did not answer in 120 s")


def measure(url: str, repeat: int) -> dict:
    from playwright.sync_api import sync_playwright

    times: dict[str, dict[str, list[float]]] = {page: {"first_paint": [], "ready": []} for page in PAGES}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            for _ in range(repeat):
                for page_name in PAGES:
                    first_paint, ready = open_page(browser, f"{url}/ui/#{page_name}", page_name)
                    times[page_name]["first_paint"].append(first_paint)
                    times[page_name]["ready"].append(ready)
        finally:
            browser.close()
    return {
        "first_contentful_paint_ms": {page: round(statistics.median(t["first_paint"]), 1) for page, t in times.items()},
        "ready_ms": {page: round(statistics.median(t["ready"]), 1) for page, t in times.items()},
        # the first tab: the server reads the whole metrics file once, later tabs only what was added
        "first_open_ready_ms": {page: round(t["ready"][0], 1) for page, t in times.items()},
    }


def open_page(browser, url: str, page_name: str) -> tuple[float, float]:
    """A fresh tab (nothing cached): the first contentful paint and the page's ready mark, in ms."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    try:
        page = context.new_page()
        page.goto(url)
        mark = f"lorafleet:{page_name}-ready"
        # a function, not an expression: Playwright evals an expression in the page, which the CSP refuses
        page.wait_for_function(f"() => performance.getEntriesByName('{mark}').length > 0", timeout=120_000)
        return page.evaluate(
            f"""() => [
                performance.getEntriesByName('first-contentful-paint')[0].startTime,
                performance.getEntriesByName('{mark}')[0].startTime,
            ]"""
        )
    finally:
        context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", type=Path, help="a fleet directory on disk (default: a synthetic one)")
    parser.add_argument("--adapters", type=int, default=50, help="synthetic fleet: adapters (default 50)")
    parser.add_argument("--metric-lines", type=int, default=100_000, help="synthetic fleet: metrics lines")
    parser.add_argument("--repeat", type=int, default=5, help="tabs opened per page; the median is reported")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="console-first-paint-"))
    try:
        if args.fleet is not None:
            fleet, described = args.fleet, {"fleet": str(args.fleet)}
        else:
            fleet = synthetic_fleet(scratch / "fleet", args.adapters, args.metric_lines)
            described = {"adapters": args.adapters, "metric_lines": args.metric_lines}
        port = free_port()
        console = start_console(fleet, port)
        try:
            result = {"fleet": described, "repeat": args.repeat} | measure(f"http://127.0.0.1:{port}", args.repeat)
        finally:
            console.terminate()
            console.wait(timeout=30)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
