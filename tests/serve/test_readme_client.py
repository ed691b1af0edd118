"""The README's client example runs as written against a real server: nothing left for the reader to fill in."""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

from lorafleet.serve.gateway.server import ServeOptions
from tests.serve.conftest import running_server

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_client_example_runs_as_written(fleet_dir, tmp_path, monkeypatch):
    example = re.search(r"```python\n((?:(?!```).)*OpenAI\(base_url.*?)```", README.read_text(), re.S).group(1)
    # The demo's layout, as the example expects it after `lorafleet demo`: marketing is one of this fleet's adapters.
    demo = tmp_path / "demo-out"
    (demo / "adapters").mkdir(parents=True)
    (demo / "base").symlink_to(fleet_dir / "base")
    (demo / "adapters" / "marketing").symlink_to(fleet_dir / "adapters" / "finance")
    (demo / "data" / "marketing-test-images").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(demo / "data" / "marketing-test-images" / "0000.png")
    monkeypatch.chdir(tmp_path)
    with running_server(ServeOptions(fleet_dir=demo)) as (url, _):
        namespace: dict = {}
        exec(compile(example.replace("http://127.0.0.1:8000", url), "README.md", "exec"), namespace)
    reply = namespace["reply"]
    assert reply.model == "marketing" and reply.choices[0].finish_reason in ("stop", "length")
