"""The web console in a real headless Chromium, driving a real `lorafleet serve` of the demo fleet on
127.0.0.1: signing in with an admin key, the fleet and its scores, the lineage of a compressed model,
the playground streaming three models' answers through the API every client uses, a training run
drawn live, the serving counters, revoking a key, and an edited audit log flagged.

One server and one browser serve every test here (a browser start costs seconds, a server start more):
the suite's trained demo fleet is copied once, a compressed model is added to the copy, and
`lorafleet serve --manage-keys` serves it. The tests change the fleet as a person would, in file
order: the key revoked and the audit log edited come last. Every request the browser makes is
recorded; the last test holds that all of them went to the server on 127.0.0.1.

A failing test leaves a screenshot of its page in the session's temporary directory (the path is
printed). With LORAFLEET_CONSOLE_SCREENSHOTS=DIR each page is also saved there: docs/console/ holds
the ones the README shows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from lorafleet.serve.gateway.tenants import hash_key
from tests.serve.conftest import free_port
from tests.services import missing

pytestmark = pytest.mark.slow  # trains the demo fleet (shared with the compression and eval tests)

CHROMIUM = "/usr/bin/chromium"
# As root on a closed network: no sandbox, and none of Chromium's own calls home (they would be
# refused, and they are not the page's requests).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_KEY, VIEWER_KEY = "sk-console-admin", "sk-console-viewer"
COMPRESSED = "marketing-int8"
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def fleet(trained_demo, tmp_path_factory) -> Path:
    """A copy of the trained demo (the other tests read the original) with a compressed model of
    its marketing adapter registered in it."""
    from lorafleet.compress.run import CompressOptions, compress

    demo, _ = trained_demo
    root = tmp_path_factory.mktemp("console") / "fleet"
    shutil.copytree(demo, root)
    compress(
        CompressOptions(
            root / "base",
            root / "models" / COMPRESSED,
            adapter=root / "adapters" / "marketing",
            calib=root / "data" / "marketing.jsonl",
            calib_limit=8,
            quantize="int8",
            gptq=False,
            progress=False,
            fleet=root,
        )
    )
    return root


@pytest.fixture(scope="module")
def keys_path(fleet) -> Path:
    path = fleet.parent / "keys.yaml"
    tenants = [
        {"name": "ops", "key_sha256": hash_key(ADMIN_KEY), "adapters": "*", "admin": True},
        {"name": "viewer", "key_sha256": hash_key(VIEWER_KEY), "adapters": "*"},
    ]
    path.write_text(yaml.safe_dump({"tenants": tenants}))
    return path


@pytest.fixture(scope="module")
def origin(fleet, keys_path) -> Iterator[str]:
    """`lorafleet serve --manage-keys` of the fleet, in a process of its own, on 127.0.0.1."""
    port = free_port()
    command = [sys.executable, "-m", "lorafleet", "serve", "--fleet", str(fleet), "--keys", str(keys_path)]
    command += ["--manage-keys", "--host", "127.0.0.1", "--port", str(port)]
    log = (fleet.parent / "serve.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, fleet.parent / "serve.log")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def wait_until_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, f"lorafleet serve exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"lorafleet serve did not become ready in 180 s:\n{log.read_text()[-3000:]}")


class Browser:
    """One headless Chromium page for the module, and everything it asked for or complained about."""

    def __init__(self, playwright, origin: str) -> None:
        if not Path(CHROMIUM).exists():
            missing("chromium")  # skipped on a machine without it, failed under CI (.ci/run installs it)
        self.browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        self.context = self.browser.new_context(viewport={"width": 1360, "height": 900})
        self.requests: list[str] = []
        self.problems: list[str] = []
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        self.page.on("console", self._console)
        self.origin = origin

    def _console(self, message) -> None:
        if message.type == "error" and "401" not in message.text and "403" not in message.text:
            self.problems.append(f"console: {message.text}")

    def open(self, page: str):
        """The console at #page, signed in with the admin key (the tab keeps it once given)."""
        self.page.goto(f"{self.origin}/ui/#{page}")
        self.page.wait_for_selector("#nav:not([hidden]), #login:not([hidden])")
        if self.page.is_visible("#login"):
            self.sign_in(ADMIN_KEY)
        self.page.wait_for_selector(f"#page-{page}:not([hidden])")
        return self.page

    def sign_in(self, key: str) -> None:
        self.page.fill("#login-key", key)
        self.page.click("#login-form button[type=submit]")

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)


@pytest.fixture(scope="module")
def browser(origin) -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        opened = Browser(playwright, origin)
        try:
            yield opened
        finally:
            opened.browser.close()


@pytest.fixture(autouse=True)
def screenshot_on_failure(request, browser, tmp_path_factory) -> Iterator[None]:
    yield
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        path = tmp_path_factory.getbasetemp() / "console-failures" / f"{request.node.name}.png"
        browser.screenshot(path)
        print(f"screenshot of the failing page: {path}")


def keep_screenshot(browser: Browser, name: str) -> None:
    """Save the page as docs/console/NAME.png when asked to (LORAFLEET_CONSOLE_SCREENSHOTS=docs/console)."""
    directory = os.environ.get("LORAFLEET_CONSOLE_SCREENSHOTS")
    if directory:
        browser.page.evaluate("() => window.scrollTo(0, 0)")
        browser.page.screenshot(path=str(Path(directory) / f"{name}.png"))


def chat(origin: str, key: str, model: str = "base") -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{origin}/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_the_console_opens_with_an_admin_key_only(browser, origin):
    page = browser.page
    response = page.goto(f"{origin}/ui/")
    csp = response.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    page.wait_for_selector("#login:not([hidden])")
    browser.sign_in("sk-not-a-key")
    page.wait_for_selector("#login-error:has-text('Incorrect or missing API key')")
    browser.sign_in(VIEWER_KEY)
    page.wait_for_selector("#login-error:has-text('needs an admin key')")
    assert page.is_hidden("#nav")
    browser.sign_in(ADMIN_KEY)
    page.wait_for_selector("#page-fleet:not([hidden])")
    assert page.inner_text("#who") == "signed in as ops"
    assert httpx.get(f"{origin}/ui/api/fleet").status_code == 401  # the data too, not just the page


def test_the_fleet_page_lists_every_adapter_with_its_scores_against_the_base(browser, trained_demo):
    _, rows = trained_demo
    page = browser.open("fleet")
    page.wait_for_selector("#adapters tbody tr")
    for row in rows:
        cells = page.locator(f"#adapters tr[data-adapter='{row.adapter}']")
        score = cells.locator(".score").first
        assert float(score.get_attribute("data-accuracy")) == pytest.approx(row.adapter_accuracy)
        assert f"{100 * row.base_accuracy:.0f}% → {100 * row.adapter_accuracy:.0f}%" in score.inner_text()
        assert cells.locator("td").nth(1).inner_text() == "yes"  # served
    page.wait_for_selector(f"#lineage g.node[data-name='{COMPRESSED}']")
    keep_screenshot(browser, "fleet")
    page.click("#adapters tr[data-adapter='marketing'] a.doc-link:has-text('model card')")
    page.wait_for_selector("#document-text:has-text('marketing')")


def test_the_lineage_graph_shows_a_compressed_models_parents(browser):
    page = browser.open("fleet")
    page.wait_for_selector(f"#lineage g.node[data-name='{COMPRESSED}']")
    relations = {
        edge.get_attribute("data-parent"): edge.get_attribute("data-relation")
        for edge in page.locator(f"#lineage g.edge[data-child='{COMPRESSED}']").all()
    }
    assert relations == {"base": "compressed_from", "marketing": "merged"}, relations
    assert page.locator("#lineage g.edge[data-child='facilities'][data-parent='base']").count() == 1
    assert page.locator(f"#models tr[data-model='{COMPRESSED}']").count() == 1


def test_a_playground_prompt_streams_answers_from_the_base_and_two_adapters_through_the_audited_api(
    browser, fleet, origin
):
    page = browser.open("playground")
    page.wait_for_selector("#models-to-ask input[data-model='marketing']")
    for model in ("base", "marketing", "facilities"):
        page.check(f"#models-to-ask input[data-model='{model}']")
    page.uncheck("#models-to-ask input[data-model='logistics']")
    record = json.loads((fleet / "data" / "marketing-test.jsonl").read_text().splitlines()[0])
    page.fill("#prompt", record["conversations"][0]["value"].removeprefix("<image>\n"))
    page.set_input_files("#image", str(fleet / "data" / record["image"]))
    page.click("#ask")
    for model in ("base", "marketing", "facilities"):
        page.wait_for_selector(f".answer[data-model='{model}'][data-done='true']")
    answers = {}
    for model in ("base", "marketing", "facilities"):
        pane = page.locator(f".answer[data-model='{model}']")
        assert "failed" not in (pane.get_attribute("class") or ""), pane.inner_text()
        assert int(pane.get_attribute("data-chunks")) >= 1
        answers[model] = pane.locator(".answer-text").inner_text()
    assert answers["marketing"] == record["conversations"][1]["value"] != answers["base"]
    keep_screenshot(browser, "playground")
    logged = [json.loads(line) for path in sorted((fleet / "audit").glob("*.jsonl")) for line in path.open()]
    served = [e["data"] for e in logged if e["event"] == "serve.request" and e["data"].get("tenant") == "ops"]
    assert {entry["model"] for entry in served[-3:]} == {"base", "marketing", "facilities"}
    assert all(entry["status"] == 200 and entry["completion_tokens"] > 0 for entry in served[-3:])


def test_the_serving_page_shows_the_servers_counters_and_loads_and_unloads_an_adapter(browser, origin):
    page = browser.open("serving")
    page.wait_for_selector("#by-tenant tr[data-tenant='ops']")
    ops_models = page.locator("#by-tenant tr[data-tenant='ops'] td:nth-child(2)").all_inner_texts()
    assert {"base", "marketing", "facilities"} <= set(ops_models)
    assert page.inner_text("#stat-p50").endswith("s")  # a number with its unit: latencies were observed
    keep_screenshot(browser, "serving")
    page.click("#loadable tr[data-adapter='logistics'] button:has-text('Unload')")
    page.wait_for_selector("#loadable tr[data-adapter='logistics'] button:has-text('Load')")
    models = httpx.get(f"{origin}/v1/models", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert "logistics" not in {model["id"] for model in models["data"]}
    page.click("#loadable tr[data-adapter='logistics'] button:has-text('Load')")
    page.wait_for_selector("#loadable tr[data-adapter='logistics'] button:has-text('Unload')")
    assert chat(origin, ADMIN_KEY, "logistics").status_code == 200


def write_live_run(fleet: Path) -> Path:
    """A one-adapter run kept inside the fleet directory, long enough to be watched, not to finish."""
    run = fleet / "runs" / "live"
    run.mkdir(parents=True)
    adapter = {"name": "live", "data": "../../data/marketing.jsonl", "rank": 4, "alpha": 8, "learning_rate": 1e-3}
    adapter |= {"micro_batch_size": 2, "grad_accum": 1, "steps": 5000, "warmup_steps": 2}
    (run / "fleet.yaml").write_text(yaml.safe_dump({"base": "../../base", "output": ".", "adapters": [adapter]}))
    return run


def test_a_training_run_started_now_draws_its_loss_live_without_a_reload(browser, fleet):
    page = browser.open("runs")
    page.wait_for_selector("#shared tbody tr:has-text('facilities + logistics + marketing')")
    keep_screenshot(browser, "runs")
    page.evaluate("window.sameDocument = true")  # gone if the page reloads
    run = write_live_run(fleet)
    log = (run.parent / "live.log").open("w")
    training = subprocess.Popen([sys.executable, "-m", "lorafleet", "train", str(run / "fleet.yaml")], stdout=log)
    try:
        page.wait_for_selector("#run-select option[value='runs/live']", state="attached", timeout=180_000)
        page.select_option("#run-select", "runs/live")
        page.wait_for_function("() => Number(document.querySelector('#chart-loss').dataset.points) >= 1")
        first = int(page.get_attribute("#chart-loss", "data-points"))
        page.wait_for_function(
            f"() => Number(document.querySelector('#chart-loss').dataset.points) >= {first + 3}", timeout=120_000
        )
        assert page.evaluate("window.sameDocument") is True
        assert training.poll() is None, "the run ended before the chart was watched"
    finally:
        training.terminate()
        training.wait(timeout=60)
        log.close()


def test_revoking_a_key_makes_the_next_request_with_it_fail(browser, origin, keys_path):
    page = browser.open("tenants")
    page.wait_for_selector("#create-form:not([hidden])")
    page.fill("#new-name", "contractor")
    page.fill("#new-adapters", "marketing")
    page.click("#create-form button[type=submit]")
    page.wait_for_selector("#tenants tr[data-tenant='contractor']")
    key = page.inner_text("#new-key-value")
    assert hash_key(key) in keys_path.read_text() and key not in keys_path.read_text()
    assert chat(origin, key, "marketing").status_code == 200
    keep_screenshot(browser, "tenants")
    revoke = page.locator("#tenants tr[data-tenant='contractor'] button[data-action='revoke']")
    revoke.click()
    revoke.click()  # a destructive button asks once more
    page.wait_for_selector("#tenants tr[data-tenant='contractor']", state="detached")
    refused = chat(origin, key, "marketing")
    assert refused.status_code == 401, refused.text
    assert chat(origin, ADMIN_KEY).status_code == 200


def test_the_audit_page_flags_an_edited_log(browser, fleet):
    page = browser.open("audit")
    page.wait_for_selector("#verification[data-valid='true']")
    page.fill("#audit-event", "serve.key_")
    page.click("#audit-form button[type=submit]")
    page.wait_for_function(ONLY_KEY_EVENTS_LISTED)
    assert page.locator("#entries tr[data-event='serve.key_revoked']").count() == 1
    keep_screenshot(browser, "audit")
    segment, number = edit_audit_entry(fleet, "serve.key_created", b'"contractor"', b'"contractoR"')
    page.click("#audit-form button[type=submit]")
    page.wait_for_selector("#verification[data-valid='false']")
    assert f"{segment}:{number}" in page.inner_text("#verification")
    assert page.inner_text("#entries tr[data-event='serve.key_created'] td:last-child") == "EDITED"


ONLY_KEY_EVENTS_LISTED = """() => {
    const rows = [...document.querySelectorAll('#entries tbody tr')];
    return rows.length > 0 && rows.every((row) => row.dataset.event.startsWith('serve.key_'));
}"""


def edit_audit_entry(fleet: Path, event: str, old: bytes, new: bytes) -> tuple[str, int]:
    """Change bytes of the newest `event` entry in place (same length: the server keeps appending
    to the same file)."""
    for path in sorted((fleet / "audit").glob("*.jsonl"), reverse=True):
        lines = path.read_bytes().split(b"\n")
        for index in range(len(lines) - 1, -1, -1):
            if f'"event":"{event}"'.encode() in lines[index].replace(b": ", b":") and old in lines[index]:
                offset = sum(len(line) + 1 for line in lines[:index]) + lines[index].index(old)
                with path.open("r+b") as handle:
                    handle.seek(offset)
                    handle.write(new)
                return path.name, index + 1
    raise AssertionError(f"no {event} entry with {old!r} in {fleet / 'audit'}")


def test_every_request_the_browser_made_went_to_the_server_on_127_0_0_1(browser, origin):
    assert browser.requests, "the browser made no requests"
    elsewhere = [url for url in browser.requests if not url.startswith(f"{origin}/")]
    assert not elsewhere, elsewhere
    assert any(url.endswith("/uPlot.iife.min.js") for url in browser.requests)  # the chart library, shipped
    assert not browser.problems, browser.problems
