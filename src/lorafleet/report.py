"""`lorafleet report`: one self-contained HTML page of a training run, for people who were not there.

It reads what the trainer leaves in its output directory — `metrics.jsonl` (one line per optimizer
step of each adapter: loss, learning rate, tokens so far, fleet step, seconds since the process
started), `checkpoints/step-*.pt`, and any `eval*.json` written by `lorafleet eval --json` — and
draws loss and learning-rate curves per adapter, the fleet's tokens/s over time and which adapters
ran together, as PNGs embedded in the page (base64), so the file can be mailed or archived alone.
Loss curves can be smoothed as TensorBoard smooths them (`--smooth`), the raw curve kept faint.
Evaluations are tabled as `lorafleet eval` prints them: exact match and token F1 for chats,
accuracy per subfield and per difficulty for MMMU.

When the directory holds a sweep (`sweep.json`, written by `lorafleet sweep`), the page adds a
section per department searched: every trial's held-out curve with its rung decisions marked
(continued or stopped, at which step, or diverged) and a table of the trials, read from sweep.json
alone. A sweep's output keeps its trials' training in `trials/` (a fleet of their own): the page
draws their losses, throughput and checkpoints from there, above the sweep's sections.

A resume shows in the metrics as the clock starting again: the trainer keeps the lines up to the
checkpoint it resumes from, and the new process counts seconds from zero.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.errors import ConfigError
from lorafleet.fleet_dir import FleetDir, checkpoint_step

STEP_FIELDS = {"adapter", "step", "fleet_step", "loss", "lr", "tokens", "elapsed_s"}  # an optimizer step's line


@dataclass
class RunRecord:
    directory: Path
    steps: list[dict]  # metrics.jsonl, in file order
    checkpoints: list[int]  # fleet steps of the checkpoints still on disk
    resumes: list[int] = field(default_factory=list)  # fleet steps a run resumed from
    evals: dict[str, dict] = field(default_factory=dict)  # file name -> `lorafleet eval --json` output
    sweeps: list[dict] = field(default_factory=list)  # sweep.json's record of each department searched

    @property
    def adapters(self) -> list[str]:
        return list(dict.fromkeys(step["adapter"] for step in self.steps))

    def of(self, adapter: str) -> list[dict]:
        return [step for step in self.steps if step["adapter"] == adapter]


def read_run(directory: str | Path) -> RunRecord:
    """The run in `directory`: a fleet's output, or a sweep's (its sweep.json, with the trials'
    metrics and checkpoints read from `trials/`, where they trained as a fleet of their own)."""
    directory = Path(directory)
    sweep = FleetDir(directory).sweep
    sweeps = json.loads(sweep.read_text())["departments"] if sweep.exists() else []
    trained = FleetDir(directory)
    if sweeps and not trained.metrics.exists():
        trained = FleetDir(trained.trials)
    steps = _steps(trained.metrics, sweep_only_if_missing=bool(sweeps))
    checkpoints = sorted(checkpoint_step(path) for path in trained.checkpoint_files())
    evals = {}
    for path in FleetDir(directory).eval_results():
        content = json.loads(path.read_text())
        if isinstance(content, dict) and "overall" in content:
            evals[path.name] = content
    return RunRecord(directory, steps, checkpoints, _resumes(steps), evals, sweeps)


def _steps(metrics: Path, sweep_only_if_missing: bool) -> list[dict]:
    """The optimizer steps' lines of `metrics` (none for a sweep whose trials' metrics are gone:
    its page is drawn from sweep.json alone)."""
    if not metrics.exists():
        if sweep_only_if_missing:
            return []
        raise ConfigError(
            f"{metrics} does not exist: give the output directory of `lorafleet train` or `lorafleet sweep`"
        )
    lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [line for line in lines if STEP_FIELDS <= line.keys()]  # other kinds of line are not drawn
    if not steps and not sweep_only_if_missing:
        raise ConfigError(f"{metrics} is empty: the run has not finished an optimizer step yet")
    return steps


def _resumes(steps: list[dict]) -> list[int]:
    resumes = []
    for before, after in zip(steps, steps[1:], strict=False):
        if after["elapsed_s"] < before["elapsed_s"]:
            resumes.append(before["fleet_step"])
    return resumes


def wall_clock(steps: list[dict]) -> list[float]:
    """Seconds since the run began, with each resumed process's clock continuing the last one."""
    offset, previous, times = 0.0, 0.0, []
    for step in steps:
        if step["elapsed_s"] < previous - offset:
            offset = times[-1]
        times.append(offset + step["elapsed_s"])
        previous = times[-1]
    return times


def fleet_tokens_per_s(steps: list[dict], window: int = 10) -> tuple[list[float], list[float]]:
    """The fleet's tokens/s (all adapters) over time, averaged over `window` optimizer steps."""
    times, latest, totals = wall_clock(steps), {}, []
    for step in steps:
        latest[step["adapter"]] = step["tokens"]
        totals.append(sum(latest.values()))
    points = [
        (times[i], (totals[i] - totals[i - window]) / (times[i] - times[i - window]))
        for i in range(window, len(steps))
        if times[i] > times[i - window]
    ]
    return [t for t, _ in points], [rate for _, rate in points]


def smoothed(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing of a scalar curve: an exponential moving average with `weight` on the
    past, divided by the weight it has gathered so far (1 - weight^n) so that the curve does not
    start near zero. A non-finite value (a diverged step) is kept as it is and leaves the average alone."""
    average, points, curve = 0.0, 0, []
    for value in values:
        if not math.isfinite(value):
            curve.append(value)
            continue
        average, points = weight * average + (1 - weight) * value, points + 1
        curve.append(average / (1 - weight**points))
    return curve


def write_report(directory: str | Path, out: str | Path | None = None, smoothing: float = 0.0) -> Path:
    """`smoothing`: the weight of TensorBoard's moving average for the loss curves (0: raw)."""
    if not 0 <= smoothing < 1:
        raise ConfigError(
            f"--smooth {smoothing}: the smoothing weight must be at least 0 and below 1 "
            "(0 draws the raw loss; 0.9 averages over about the last 10 steps, as TensorBoard's slider)"
        )
    run = read_run(directory)
    out = Path(out) if out else FleetDir(run.directory).report
    out.write_text(render(run, smoothing))
    return out


def render(run: RunRecord, smoothing: float = 0.0) -> str:
    kind = "Sweep" if run.sweeps else "Training run"
    title = f"{kind} {run.directory.name}"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        *(_training_sections(run, smoothing) if run.steps else []),
    ]
    for sweep in run.sweeps:
        parts += _sweep_section(sweep)
    for name, content in run.evals.items():
        parts += [f"<h2>Evaluation: {html.escape(name)}</h2>", _eval_table(content)]
    parts.append("</body></html>")
    return "\n".join(parts)


def _training_sections(run: RunRecord, smoothing: float) -> list[str]:
    """The adapters' training: final numbers, loss and learning-rate curves, throughput, checkpoints
    (a sweep's trials, when the page is a sweep's)."""
    trials = " (the sweep's trials, in <code>trials/</code>)" if run.sweeps else ""
    return [
        f"<p>{len(run.adapters)} adapters{trials}, {max(s['fleet_step'] for s in run.steps)} fleet steps, "
        f"{wall_clock(run.steps)[-1]:.0f} s of training; directory <code>{html.escape(str(run.directory))}</code></p>",
        "<h2>Final metrics</h2>",
        _table(["adapter", "steps", "final loss", "mean loss, last 10", "tokens", "fleet steps"], _final_rows(run)),
        "<h2>Loss and learning rate</h2>",
        _smoothing_note(smoothing),
        _img(_png(loss_and_lr_figure(run, smoothing)), "loss and learning rate per adapter"),
        "<h2>Throughput and admission</h2>",
        _img(_timeline(run), "tokens/s over time and which adapters ran together"),
        "<h2>Checkpoints and resumes</h2>",
        f"<p>Checkpoints on disk at fleet steps: {', '.join(map(str, run.checkpoints)) or 'none'}. "
        f"Resumed from fleet steps: {', '.join(map(str, run.resumes)) or 'never resumed'}.</p>",
    ]


def _smoothing_note(smoothing: float) -> str:
    if not smoothing:
        return "<p>Loss per optimizer step, as logged (<code>lorafleet report --smooth 0.9</code> smooths it).</p>"
    return (
        f"<p>Loss: exponential moving average with weight {smoothing:g} (TensorBoard's smoothing); "
        "the loss of each step is drawn faint behind it.</p>"
    )


def _final_rows(run: RunRecord) -> list[list[str]]:
    rows = []
    for adapter in run.adapters:
        steps = run.of(adapter)
        last = [s["loss"] for s in steps[-10:]]
        span = f"{steps[0]['fleet_step']}–{steps[-1]['fleet_step']}"
        rows.append([adapter, str(steps[-1]["step"]), f"{steps[-1]['loss']:.4f}", f"{sum(last) / len(last):.4f}",
                     f"{steps[-1]['tokens']:,}", span])  # fmt: skip
    return rows


def _sweep_section(sweep: dict) -> list[str]:
    """One department's sweep: each trial's held-out curve with its rung decisions, and a table of them."""
    winner, metric = sweep["winner"], sweep["metric"]
    decisions = {}
    for decision in sweep["decisions"]:
        outcome = "continued" if decision["continues"] else "stopped"
        decisions.setdefault(decision["trial"], []).append(
            f"step {decision['step']}: {outcome} ({decision['value']:.4f}, {decision['competitors']} at the rung)"
        )
    for trial in sweep["trials"]:
        if trial.get("diverged"):  # sweep.json of a sweep before diverged trials were marked has no field
            decisions.setdefault(trial["name"], []).append(
                f"diverged at step {trial['stopped_at'] + 1}: the loss was no longer a number"
            )
    rows = [
        [
            _trial_label(trial, winner["trial"]),
            ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                      for key, value in trial["values"].items()),
            "-" if trial["final"] is None else f"{trial['final']:.4f}",
            str(trial["steps"]),
            "; ".join(decisions.get(trial["name"], [])) or "no rung reached",
        ]
        for trial in sweep["trials"]
    ]  # fmt: skip
    return [
        f"<h2>Sweep of {html.escape(sweep['department'])}</h2>",
        f"<p>{len(sweep['trials'])} trials compared on held-out {html.escape(metric)} at rungs "
        f"{', '.join(map(str, sweep['rungs']['steps']))} (reduction factor {sweep['rungs']['reduction_factor']}); "
        f"winner {html.escape(winner['trial'])}: {html.escape(winner['why'])}.</p>",
        *([_retrained(sweep)] if "retrained" in sweep else []),
        _img(_png(sweep_figure(sweep)), "held-out curve of every trial with its rung decisions"),
        _table(["trial", "values", f"final {metric}", "steps", "rung decisions"], rows),
    ]


def _trial_label(trial: dict, winner: str) -> str:
    if trial["name"] == winner:
        return f"{trial['name']} (winner)"
    return f"{trial['name']} (diverged)" if trial.get("diverged") else trial["name"]


def _retrained(sweep: dict) -> str:
    retrained = sweep["retrained"]
    return (
        f"<p>The department's adapter is {html.escape(retrained['trial'])}'s configuration retrained on the "
        f"training and held-out files ({retrained['steps']} steps); its held-out number: "
        f"{html.escape(retrained['held_out'])}.</p>"
    )


def sweep_figure(sweep: dict):
    """Every trial's held-out curve in its own colour (the winner's thick), the rungs as dotted
    lines, and each rung decision a mark on the curve: a dot where the trial continued, a cross
    where it stopped; a diverged trial is named so in the legend (its curve ends before its loss broke)."""
    figure, (axes,) = _figure(1, width=10)
    winner = sweep["winner"]["trial"]
    for index, trial in enumerate(sweep["trials"]):
        steps, values = zip(*trial["curve"], strict=True) if trial["curve"] else ((), ())
        width = 3.0 if trial["name"] == winner else 1.2
        # a point on every evaluation: a trial stopped at the first rung has a curve of one point
        label = trial["name"] + (" (diverged)" if trial.get("diverged") else "")
        axes.plot(steps, values, color=f"C{index % 10}", linewidth=width, marker=".", label=label)
    for rung in sweep["rungs"]["steps"]:
        axes.axvline(rung, color="grey", linestyle=":", linewidth=0.8)
    for outcome, marker, color in (("continued", "o", "green"), ("stopped", "x", "red")):
        marks = [(d["step"], d["value"]) for d in sweep["decisions"] if d["continues"] == (outcome == "continued")]
        if marks:
            axes.scatter(*zip(*marks, strict=True), marker=marker, color=color, zorder=3, label=outcome)
    metric = sweep["metric"]
    axes.set(title=f"held-out {metric} of every trial; rung decisions marked", xlabel="optimizer step", ylabel=metric)
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figure


def _eval_table(content: dict) -> str:
    """Models side by side: accuracy overall (chats: exact match, then token F1), per subfield and
    per difficulty, as `lorafleet eval` prints them."""
    models, overall = content.get("models", list(content["overall"])), content["overall"]
    chat = all("token_f1" in overall[m] for m in models)
    rows = [["exact match" if chat else "overall", *(_score(overall[m]) for m in models)]]
    if chat:
        rows.append(["token F1", *(f"{overall[m]['token_f1']:.3f}" for m in models)])
    rows += [[name, *(_score(tallies[m]) for m in models)] for name, tallies in content.get("by_subfield", {}).items()]
    rows += [
        [f"difficulty: {name}", *(_score(tallies[m]) for m in models)]
        for name, tallies in content.get("by_difficulty", {}).items()
    ]
    caption = f"<p>{html.escape(str(content.get('data', '')))}: {content.get('tokens_per_s', 0):,.1f} tokens/s</p>"
    return caption + _table(["", *models], rows)


def _score(tally: dict) -> str:
    return f"{tally['accuracy']:.1%} of {tally['questions']} ({tally['unparseable']} unparseable)"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def loss_and_lr_figure(run: RunRecord, smoothing: float = 0.0):
    """The loss (and held-out loss) and learning-rate curves of every adapter, in one colour each;
    with `smoothing`, each loss curve is its moving average over the raw curve drawn faint."""
    figure, (loss, lr) = _figure(2)
    widths = _learning_rate_widths(run)
    for index, adapter in enumerate(run.adapters):
        steps = run.of(adapter)
        color = f"C{index % 10}"
        x, losses = [s["step"] for s in steps], [s["loss"] for s in steps]
        if smoothing:  # a leading "_" keeps the faint curve out of the legend
            loss.plot(x, losses, color=color, alpha=0.25, linewidth=0.8, label=f"_{adapter} raw")
            losses = smoothed(losses, smoothing)
        loss.plot(x, losses, color=color, label=adapter)
        held_out = [s for s in steps if s.get("eval_loss") is not None]
        if held_out:  # held-out loss (eval_data): dashed, in the adapter's colour
            steps_, values = [s["step"] for s in held_out], [s["eval_loss"] for s in held_out]
            loss.plot(steps_, values, color=color, linestyle="--", marker="o", label=f"{adapter} (held out)")
        lr.plot(x, [s["lr"] for s in steps], color=color, linewidth=widths[adapter], label=adapter)
    loss.set(title="loss", xlabel="optimizer step", yscale="log")
    _plain_log_labels(loss)
    lr.set(title="learning rate", xlabel="optimizer step")
    for panel in (loss, lr):  # each panel names its lines: schedules of several adapters often overlap
        panel.legend(fontsize="small")
    return figure


def _learning_rate_widths(run: RunRecord) -> dict[str, float]:
    """Line widths for the learning-rate panel. Adapters often share a schedule, and the last line
    drawn would hide the others: a line is drawn wider the more later lines run on top of it, so
    that coinciding curves show as stripes of every colour; a curve of its own keeps the usual width."""
    schedules = [{s["step"]: s["lr"] for s in run.of(adapter)} for adapter in run.adapters]

    def coincide(first: dict, second: dict) -> bool:
        shared = first.keys() & second.keys()
        return bool(shared) and all(math.isclose(first[step], second[step], rel_tol=1e-9) for step in shared)

    covered = [sum(coincide(mine, later) for later in schedules[i + 1 :]) for i, mine in enumerate(schedules)]
    most = max(covered) or 1
    return {adapter: 1.5 + 3.0 * count / most for adapter, count in zip(run.adapters, covered, strict=True)}


def _plain_log_labels(axes) -> None:
    """Label a log axis 0.6, 2, 3 rather than 6 × 10⁻¹, 2 × 10⁰: a loss rarely spans many decades."""
    from matplotlib.ticker import LogFormatter, StrMethodFormatter

    class PlainMinorLabels(LogFormatter):  # matplotlib's choice of which minor ticks to label (few), in plain numbers
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    axes.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    axes.yaxis.set_minor_formatter(PlainMinorLabels())


def _timeline(run: RunRecord) -> bytes:
    figure, (speed, admission) = _figure(2)
    times, rates = fleet_tokens_per_s(run.steps)
    speed.plot(times, rates)
    speed.set(title="fleet tokens/s", xlabel="seconds")
    for row, adapter in enumerate(run.adapters):
        fleet_steps = [s["fleet_step"] for s in run.of(adapter)]
        span = (fleet_steps[0], fleet_steps[-1] - fleet_steps[0] + 1)
        admission.broken_barh([span], (row - 0.4, 0.8), color=f"C{row % 10}")
    for step in run.checkpoints:
        admission.axvline(step, color="grey", linestyle=":", label="checkpoint" if step == run.checkpoints[0] else None)
    for step in run.resumes:
        admission.axvline(step, color="red", label="resumed" if step == run.resumes[0] else None)
    admission.set(title="adapters running together", xlabel="fleet step", yticks=range(len(run.adapters)))
    admission.set_yticklabels(run.adapters)
    if run.checkpoints or run.resumes:
        admission.legend()
    return _png(figure)


def _figure(panels: int, width: float = 6):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels, figsize=(width * panels, 3.6), layout="constrained", squeeze=False)
    return figure, axes[0]


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1280px}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
)
