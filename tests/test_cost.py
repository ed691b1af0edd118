"""The cost model: break-even volumes and cost per million tokens, checked against hand arithmetic."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lorafleet import cost
from lorafleet.cli import main
from lorafleet.errors import ConfigError
from lorafleet.serve.gateway.metrics import Metrics


@pytest.mark.parametrize(
    ("monthly", "price", "per_month", "per_day"),
    [(4500, 15, 300e6, 10e6), (6000, 5, 1.2e9, 40e6)],
)
def test_break_even_is_tens_of_millions_of_tokens_a_day_not_one_million(monthly, price, per_month, per_day):
    inputs = cost.CostInputs(monthly, 1000, 0.5, price, price, input_per_output=3)
    report = cost.estimate(inputs)
    assert report.break_even_tokens_per_month == pytest.approx(per_month)
    # 730 h a month is 30.4 days: 9.9 M and 39.5 M a day, "10-40 M" to the nearest ten
    assert report.break_even_tokens_per_day == pytest.approx(per_day, rel=0.015)
    assert report.break_even_tokens_per_day > 6 * 1.5e6  # the 0.5-1.5 M a day sometimes quoted is 6-80x low


def test_a_hand_computed_node():
    # 2 GPUs at $2.50/h: $3,650 a month. 1,000 output tokens/s with 3 input tokens each: 4,000 tokens/s,
    # 10.512 B tokens a month at full load, 5.256 B at 50%. API $3 in / $15 out: (3*3 + 15) / 4 = $6/M.
    inputs = cost.CostInputs(cost.monthly_cost(2.5, 2), 1000, 0.5, 3, 15, 3)
    report = cost.estimate(inputs)
    assert inputs.node_cost_per_month == pytest.approx(3650)
    assert report.api_blended_per_million == pytest.approx(6.0)
    assert report.self_hosted_per_million == pytest.approx(3650 / 5256)  # $0.694 per million tokens
    assert report.self_hosted_per_million_output == pytest.approx(4 * 3650 / 5256)
    assert report.capacity_tokens_per_day == pytest.approx(4000 * 0.5 * 86400)
    assert report.break_even_tokens_per_month == pytest.approx(3650 / 6 * 1e6)  # 608 M
    assert report.break_even_tokens_per_day == pytest.approx(3650 / 6 * 1e6 * 24 / 730)  # 20.0 M
    assert report.break_even_utilisation == pytest.approx(608.333e6 / 10.512e9, rel=1e-5)
    full = report.table[-1]
    assert full.utilisation == 1.0
    assert full.api_cost_per_month == pytest.approx(10512 * 6)
    assert full.saving_per_month == pytest.approx(10512 * 6 - 3650)


def test_a_tiny_volume_never_pays_for_a_node():
    report = cost.estimate(cost.CostInputs(6000, 10, 1.0, 0.1, 0.4, 3))
    assert report.break_even_utilisation > 1
    assert all(row.saving_per_month < 0 for row in report.table)
    assert "more than the node serves" in cost.format_report(report)


def test_throughput_comes_from_a_benchmark_json(tmp_path):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"lorafleet_engine_tok_s": 277.6, "lorafleet": {"tokens_per_s": 4904.0}}))
    assert cost.tokens_per_s_from_benchmark(path) == 277.6
    assert cost.tokens_per_s_from_benchmark(path, "lorafleet.tokens_per_s") == 4904.0
    with pytest.raises(ConfigError, match="--benchmark-key"):
        cost.tokens_per_s_from_benchmark(path, "peft.tokens_per_s")


def test_invalid_inputs_name_what_to_fix():
    with pytest.raises(ConfigError, match="utilisation"):
        cost.CostInputs(6000, 100, 50, 3, 15, 3)
    with pytest.raises(ConfigError, match="tokens/s"):
        cost.CostInputs(6000, 0, 0.5, 3, 15, 3)


@pytest.fixture
def metrics_server():
    """A server exposing the gateway's real Metrics, whose counters the test advances."""
    metrics = Metrics(running=lambda: 0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = metrics.exposition()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield metrics, f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()


def test_throughput_is_measured_from_a_servers_metrics(metrics_server):
    metrics, url = metrics_server
    metrics.observe("marketing", 200, prompt_tokens=999, completion_tokens=999, seconds=0.1)  # before: not counted
    timer = threading.Timer(0.1, lambda: metrics.observe("base", 200, 300, 100, 0.1))
    timer.start()
    load = cost.measure_metrics(url, seconds=0.5)
    timer.join()
    assert load.output_tokens_per_s == pytest.approx(100 / load.seconds)
    assert load.input_per_output == pytest.approx(3.0)


def test_an_idle_server_is_an_error_not_zero_cost(metrics_server):
    _, url = metrics_server
    with pytest.raises(ConfigError, match="under load"):
        cost.measure_metrics(url, seconds=0.05)


def test_the_cost_command_prints_json(capsys):
    argv = ["cost", "--gpu-price", "2.5", "--gpus", "2", "--tokens-per-s", "1000"]
    argv += ["--api-input-price", "3", "--api-output-price", "15", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["break_even_tokens_per_day"] == pytest.approx(20e6)
    assert [row["utilisation"] for row in report["table"]] == list(cost.UTILISATION_TABLE)
