"""The console's server side without a browser (tests/serve/test_console_browser.py drives the page):
the admin-key rule, its Content-Security-Policy, the runs read incrementally and pushed as Server-Sent
Events, the latency quantiles, the keys file edits, the audit view's flags, and the package data a
wheel must carry. The console here is `lorafleet console`'s app, on a real uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest
import yaml

from lorafleet.errors import ConfigError
from lorafleet.governance.audit import AuditLog
from lorafleet.serve.gateway.console.app import CSP, Console, create_console_app
from lorafleet.serve.gateway.console.audit_view import AuditView, EntryFilter
from lorafleet.serve.gateway.console.keys import KeysFile
from lorafleet.serve.gateway.console.runs import RunReader, find_runs
from lorafleet.serve.gateway.console.serving_view import quantile
from lorafleet.serve.gateway.console.standalone import run_console
from lorafleet.serve.gateway.tenants import hash_key, load_tenants
from tests.serve.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "src" / "lorafleet" / "serve" / "gateway" / "console" / "static"


def step(adapter: str, fleet_step: int, elapsed: float, loss: float = 1.0, tokens: int | None = None) -> dict:
    return {
        "adapter": adapter,
        "step": fleet_step,
        "fleet_step": fleet_step,
        "loss": loss,
        "lr": 1e-3,
        "tokens": tokens if tokens is not None else 100 * fleet_step,
        "elapsed_s": elapsed,
    }


def append(path: Path, *lines: dict) -> None:
    with path.open("a") as out:
        out.writelines(json.dumps(line) + "\n" for line in lines)


@contextmanager
def console_server(fleet: Path, keys: Path | None = None) -> Iterator[str]:
    import uvicorn

    tenants = load_tenants(keys) if keys else None
    console = Console(fleet, lambda: tenants)
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_console_app(console), host="127.0.0.1", port=port, log_level="warning"))
    console.stopping = lambda: web.should_exit
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started:
        assert time.monotonic() < deadline, "console did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        web.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def keys(tmp_path) -> Path:
    path = tmp_path / "keys.yaml"
    tenants = [
        {"name": "ops", "key_sha256": hash_key("sk-ops"), "adapters": "*", "admin": True},
        {"name": "team", "key_sha256": hash_key("sk-team"), "adapters": "*"},
    ]
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path


def test_with_keys_every_console_call_needs_an_admin_key_and_the_page_allows_only_its_own_origin(tmp_path, keys):
    with console_server(tmp_path, keys) as url:
        assert httpx.get(f"{url}/ui/api/session").status_code == 401
        assert httpx.get(f"{url}/ui/api/fleet", headers={"Authorization": "Bearer sk-team"}).status_code == 403
        session = httpx.get(f"{url}/ui/api/session", headers={"Authorization": "Bearer sk-ops"})
        assert session.status_code == 200 and session.json()["tenant"] == "ops"
        assert session.headers["cache-control"] == "no-store"
        page = httpx.get(f"{url}/ui/")
        assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
        script = httpx.get(f"{url}/ui/static/vendor/uplot/uPlot.iife.min.js")
        assert script.status_code == 200 and script.headers["content-security-policy"] == CSP


def test_without_keys_the_console_opens_without_one_and_listens_on_loopback_only(tmp_path):
    with console_server(tmp_path) as url:
        session = httpx.get(f"{url}/ui/api/session").json()
        assert (session["tenant"], session["keys"], session["serving"]) == (None, False, False)
    with pytest.raises(ConfigError, match="without --keys"):
        run_console(tmp_path, None, "0.0.0.0", free_port(), log=print)


def test_the_page_loads_nothing_from_another_origin():
    """Every src and href of the page and every url() of its styles is this server's."""
    html = (STATIC / "index.html").read_text()
    for attribute in ("src", "href"):
        for value in html.split(f'{attribute}="')[1:]:
            target = value.split('"')[0]
            assert target.startswith(("/ui/", "#")), f"index.html {attribute}={target!r}"
    for css in STATIC.rglob("*.css"):
        assert "url(http" not in css.read_text() and "@import" not in css.read_text(), css
    assert "<script>" not in html and " style=" not in html  # nothing inline: the CSP refuses it


def test_the_wheel_carries_every_file_of_the_console():
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lorafleet"]
    package = REPO / "src" / "lorafleet"
    files = [str(path.relative_to(package)) for path in STATIC.rglob("*") if path.is_file()]
    missing = [name for name in files if not any(fnmatch(name, pattern) for pattern in globs)]
    assert files and not missing, f"add to [tool.setuptools.package-data] in pyproject.toml: {missing}"


def test_a_run_is_read_incrementally_with_shared_steps_resumes_and_a_rewritten_file(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    append(metrics, step("a", 1, 1.0), step("b", 1, 1.0), step("a", 2, 2.0), step("b", 2, 2.0), step("a", 3, 3.0))
    reader = RunReader(tmp_path)
    overview = reader.overview()
    assert overview["steps"] == {"a": 3, "b": 2}
    shared = {tuple(group["adapters"]): group["fleet_steps"] for group in overview["shared"]}
    assert shared == {("a", "b"): 2, ("a",): 1}
    assert reader.update({"a": 3, "b": 2}, overview["generation"]) is None  # nothing new
    with metrics.open("a") as out:
        out.write(json.dumps(step("b", 3, 3.0)) + "\n" + '{"adapter": "a", "st')  # a line still being written
    added = reader.update({"a": 3, "b": 2}, overview["generation"])
    assert list(added["adapters"]) == ["b"] and added["adapters"]["b"]["step"] == [3]
    assert added["adapters"]["b"]["tokens_per_s"] == [100.0]  # (300 - 100) tokens over (3 - 1) s
    # resumed from the checkpoint at fleet step 1: the lines after it dropped, and more written since
    # than were dropped before the reader looks again (the file is longer than what it had read)
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:2]))
    append(metrics, step("a", 2, 0.5), step("b", 2, 0.5), step("a", 3, 0.7), step("b", 3, 0.7), step("a", 4, 0.9))
    assert reader.update({"a": 3, "b": 3}, overview["generation"]) == {"reset": True}
    again = reader.overview()
    assert again["generation"] == overview["generation"] + 1 and again["resumes"] == [1]
    assert again["adapters"]["a"]["step"] == [1, 2, 3, 4]


def test_a_first_paint_gets_at_most_the_points_a_chart_can_show_ending_at_the_newest(tmp_path):
    append(tmp_path / "metrics.jsonl", *(step("a", i, float(i), loss=1.0 / i) for i in range(1, 5001)))
    columns = RunReader(tmp_path).overview(most=100)["adapters"]["a"]
    assert len(columns["step"]) == 100 and columns["step"][0] == 1 and columns["step"][-1] == 5000
    assert columns["loss"][-1] == pytest.approx(1.0 / 5000)


def test_runs_are_found_inside_the_fleet_directory(tmp_path):
    for run in ("", "erasures/x/run", ".hidden"):
        (tmp_path / run).mkdir(parents=True, exist_ok=True)
        (tmp_path / run / "metrics.jsonl").write_text("")
    assert find_runs(tmp_path) == [".", "erasures/x/run"]


def test_new_metric_lines_are_pushed_as_server_sent_events(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    append(metrics, step("a", 1, 1.0))
    with console_server(tmp_path) as url:
        overview = httpx.get(f"{url}/ui/api/runs/overview", params={"run": "."}).json()
        query = {"run": ".", "generation": overview["generation"], "counts": json.dumps(overview["steps"])}
        with httpx.stream("GET", f"{url}/ui/api/live", params=query, timeout=30) as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            append(metrics, step("a", 2, 2.0, loss=0.5))
            lines = events.iter_lines()
            assert next(lines) == "event: run"
            pushed = json.loads(next(lines).removeprefix("data: "))
    assert pushed["adapters"]["a"]["step"] == [2] and pushed["adapters"]["a"]["loss"] == [0.5]


def test_latency_quantiles_are_read_from_the_histogram_as_prometheus_does():
    buckets = [(0.1, 10.0), (0.5, 60.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1 + 0.4 * (50 - 10) / 50)
    assert quantile(0.99, buckets) == pytest.approx(0.5 + 0.5 * (99 - 60) / 40)
    assert quantile(0.5, [(float("inf"), 0.0)]) is None
    assert quantile(0.99, [(1.0, 1.0), (float("inf"), 5.0)]) == 1.0  # above the largest bound: that bound


def test_keys_are_created_rotated_and_revoked_in_the_keys_file_which_keeps_only_hashes(keys):
    reloads = []
    keys_file = KeysFile(keys, reloads.append)
    by = {"tenant": "ops", "key_id": "x"}
    key = keys_file.create("contractor", ["marketing"], False, 10, None, by)
    assert load_tenants(keys).authenticate(key).name == "contractor" and key not in keys.read_text()
    rotated = keys_file.rotate("contractor", by)
    assert load_tenants(keys).authenticate(key) is None and load_tenants(keys).authenticate(rotated) is not None
    keys_file.revoke("contractor", by)
    assert load_tenants(keys).authenticate(rotated) is None and reloads == [by, by, by]
    with pytest.raises(ConfigError, match="exists already"):
        keys_file.create("team", "*", False, None, None, by)
    keys_file.revoke("team", by)
    with pytest.raises(ConfigError, match="last tenant"):
        keys_file.revoke("ops", by)
    assert load_tenants(keys).authenticate("sk-ops").name == "ops"  # a refused change leaves the file as it was


def test_the_audit_view_names_where_the_chain_breaks_and_flags_the_edited_entry(tmp_path):
    log = AuditLog(tmp_path)
    for name in ("a", "b", "c"):
        log.append("serve.adapter_load", {"adapter": name, "tenant": "ops"})
    view = AuditView(tmp_path)
    assert view.verification()["valid"] is True
    assert [e["data"]["adapter"] for e in view.entries(EntryFilter(adapter="b"))] == ["b"]
    (segment,) = (tmp_path / "audit").glob("*.jsonl")
    segment.write_text(segment.read_text().replace('"adapter":"b"', '"adapter":"B"'))
    verification = view.verification()
    assert verification["valid"] is False and f"{segment.name}:2" in verification["problem"]
    assert [entry["intact"] for entry in view.entries(EntryFilter())] == [True, False, True]
