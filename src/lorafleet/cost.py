"""Self-hosting against an API, from measured throughput: cost per million tokens and break-even.

The arithmetic is small but easy to get wrong by orders of magnitude, so it lives in one place
with its units in the names. A month is 730 hours (365 × 24 / 12), a day 24 hours.

Throughput is *output* tokens per second, measured end to end (prefill included) under a mix of
`input_per_output` prompt tokens per output token — what `benchmarks/serve_throughput.py`
reports and what a server's `/metrics` shows. Each output token served carries its prompt
tokens, so the node serves `tokens_per_s × (1 + input_per_output)` tokens a second, billed by an
API at the blended price `(input_per_output × input_price + output_price) / (1 + input_per_output)`.

Break-even does not depend on throughput: it is the volume whose API bill equals the node's
cost. Throughput says whether the node can serve that volume, and at what utilisation.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.errors import ConfigError

HOURS_PER_MONTH = 730.0
HOURS_PER_DAY = 24.0
UTILISATION_TABLE = (0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class CostInputs:
    node_cost_per_month: float  # USD: every GPU of the node, or the whole node's bill
    output_tokens_per_s: float  # measured at full load
    utilisation: float  # fraction of the month the node serves at that rate
    api_input_price: float  # USD per million input tokens
    api_output_price: float  # USD per million output tokens
    input_per_output: float  # prompt tokens per output token (3 for a 3:1 mix)

    def __post_init__(self) -> None:
        positive = {"node cost": self.node_cost_per_month, "tokens/s": self.output_tokens_per_s}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if not 0 < self.utilisation <= 1:
            raise ConfigError(f"utilisation must be in (0, 1], got {self.utilisation}: 0.5 means half the time")
        if self.api_input_price < 0 or self.api_output_price < 0 or self.input_per_output < 0:
            raise ConfigError("API prices and the input:output ratio must not be negative")
        if self.api_input_price * self.input_per_output + self.api_output_price == 0:
            raise ConfigError("the API costs nothing at these prices: give --api-input-price or --api-output-price")


@dataclass(frozen=True)
class UtilisationRow:
    utilisation: float
    tokens_per_month: float  # input and output, served by the node at this utilisation
    self_hosted_per_million: float  # USD per million tokens of the mix
    api_cost_per_month: float  # what the API would bill for the same tokens
    saving_per_month: float  # API bill minus node cost (negative: the API is cheaper)


@dataclass(frozen=True)
class CostReport:
    inputs: CostInputs
    api_blended_per_million: float
    self_hosted_per_million: float  # at the given utilisation, tokens of the mix
    self_hosted_per_million_output: float  # the same cost per million output tokens
    capacity_tokens_per_day: float  # at the given utilisation
    break_even_tokens_per_day: float
    break_even_tokens_per_month: float
    break_even_utilisation: float  # the utilisation at which the node serves the break-even volume (>1: never)
    table: list[UtilisationRow]

    def to_json(self) -> dict:
        return asdict(self)


def monthly_cost(gpu_price_per_hour: float, gpus: int) -> float:
    return gpu_price_per_hour * gpus * HOURS_PER_MONTH


def blended_price(api_input_price: float, api_output_price: float, input_per_output: float) -> float:
    """USD per million tokens of a mix with `input_per_output` input tokens per output token."""
    return (input_per_output * api_input_price + api_output_price) / (1 + input_per_output)


def break_even_tokens_per_month(node_cost_per_month: float, price_per_million: float) -> float:
    """Tokens a month whose API bill equals the node's cost."""
    return node_cost_per_month / price_per_million * 1e6


def estimate(inputs: CostInputs, utilisations: tuple[float, ...] = UTILISATION_TABLE) -> CostReport:
    blended = blended_price(inputs.api_input_price, inputs.api_output_price, inputs.input_per_output)
    mix_tokens_per_s = inputs.output_tokens_per_s * (1 + inputs.input_per_output)
    break_even_month = break_even_tokens_per_month(inputs.node_cost_per_month, blended)
    full_tokens_per_month = mix_tokens_per_s * HOURS_PER_MONTH * 3600
    here = _row(inputs, blended, full_tokens_per_month, inputs.utilisation)
    return CostReport(
        inputs=inputs,
        api_blended_per_million=blended,
        self_hosted_per_million=here.self_hosted_per_million,
        self_hosted_per_million_output=here.self_hosted_per_million * (1 + inputs.input_per_output),
        capacity_tokens_per_day=here.tokens_per_month / HOURS_PER_MONTH * HOURS_PER_DAY,
        break_even_tokens_per_day=break_even_month / HOURS_PER_MONTH * HOURS_PER_DAY,
        break_even_tokens_per_month=break_even_month,
        break_even_utilisation=break_even_month / full_tokens_per_month,
        table=[_row(inputs, blended, full_tokens_per_month, u) for u in utilisations],
    )


def _row(inputs: CostInputs, blended: float, full_tokens_per_month: float, utilisation: float) -> UtilisationRow:
    tokens = full_tokens_per_month * utilisation
    api_bill = tokens / 1e6 * blended
    return UtilisationRow(
        utilisation=utilisation,
        tokens_per_month=tokens,
        self_hosted_per_million=inputs.node_cost_per_month / tokens * 1e6,
        api_cost_per_month=api_bill,
        saving_per_month=api_bill - inputs.node_cost_per_month,
    )


def tokens_per_s_from_benchmark(path: Path, key: str = "lorafleet_engine_tok_s") -> float:
    """A throughput from a benchmark's JSON; `key` may be dotted (`lorafleet.tokens_per_s`)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read a benchmark JSON ({err})") from err
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ConfigError(f"{path}: no `{key}` in this benchmark; name the tokens/s field with --benchmark-key")
        value = value[part]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{path}: `{key}` is {value!r}, not a number of tokens/s")
    return float(value)


@dataclass(frozen=True)
class MeasuredLoad:
    output_tokens_per_s: float
    input_tokens_per_s: float
    seconds: float

    @property
    def input_per_output(self) -> float | None:
        return self.input_tokens_per_s / self.output_tokens_per_s if self.output_tokens_per_s else None


def measure_metrics(url: str, seconds: float = 10.0) -> MeasuredLoad:
    """Token rates of a running lorafleet server: two scrapes of its Prometheus `/metrics`,
    `seconds` apart. This is the load the server carries now, not its capacity."""
    first, started = _token_counts(url), time.monotonic()
    time.sleep(seconds)
    second, elapsed = _token_counts(url), time.monotonic() - started
    output = (second["completion"] - first["completion"]) / elapsed
    if output <= 0:
        raise ConfigError(
            f"{url}: no tokens were generated in {elapsed:.1f} s; measure under load or pass --tokens-per-s"
        )
    return MeasuredLoad(output, (second["prompt"] - first["prompt"]) / elapsed, elapsed)


def _token_counts(url: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    except OSError as err:
        raise ConfigError(f"cannot read {url} ({err}); is `lorafleet serve` running there?") from err
    return parse_token_counts(text, url)


def parse_token_counts(text: str, source: str = "metrics") -> dict[str, float]:
    """Prompt and completion tokens summed over every model, from `lorafleet_tokens_total` samples."""
    if "# TYPE lorafleet_tokens_total counter" not in text:
        raise ConfigError(f"{source}: no lorafleet_tokens_total counter; is this a lorafleet server's /metrics?")
    counts = {"prompt": 0.0, "completion": 0.0}
    for line in text.splitlines():
        if line.startswith("lorafleet_tokens_total{"):
            labels, _, value = line.rpartition(" ")
            for kind in counts:
                if f'kind="{kind}"' in labels:
                    counts[kind] += float(value)
    return counts


def format_report(report: CostReport) -> str:
    inputs = report.inputs
    lines = [
        f"node: ${inputs.node_cost_per_month:,.0f} a month; {inputs.output_tokens_per_s:,.1f} output tokens/s "
        f"with {inputs.input_per_output:g} input tokens each; utilisation {inputs.utilisation:.0%}",
        f"API: ${inputs.api_input_price:g} / ${inputs.api_output_price:g} per million input / output tokens "
        f"= ${report.api_blended_per_million:.3f} per million tokens of this mix",
        f"self-hosted: ${report.self_hosted_per_million:.3f} per million tokens "
        f"(${report.self_hosted_per_million_output:.3f} per million output tokens), "
        f"{_tokens(report.capacity_tokens_per_day)} tokens a day",
        f"break-even: {_tokens(report.break_even_tokens_per_day)} tokens a day, "
        f"{_tokens(report.break_even_tokens_per_month)} a month "
        + (
            f"(the node serves that at {report.break_even_utilisation:.0%} utilisation)"
            if report.break_even_utilisation <= 1
            else f"(more than the node serves: {report.break_even_utilisation:.1f}x its capacity)"
        ),
        "",
        f"{'utilisation':>11}  {'tokens/month':>12}  {'$/M self':>9}  {'API $/month':>12}  {'saving $/month':>14}",
    ]
    for row in report.table:
        lines.append(
            f"{row.utilisation:>11.0%}  {_tokens(row.tokens_per_month):>12}  {row.self_hosted_per_million:>9.3f}  "
            f"{row.api_cost_per_month:>12,.0f}  {row.saving_per_month:>14,.0f}"
        )
    return "\n".join(lines)


def _tokens(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:,.1f} {unit}"
    return f"{count:,.0f}"
