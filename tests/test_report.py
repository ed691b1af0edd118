"""`lorafleet report`: a run killed and resumed is drawn as one self-contained HTML page whose
plots are real pictures, in the page and in a browser."""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import yaml
from matplotlib.colors import to_rgb
from PIL import Image

from lorafleet.cli import main
from lorafleet.config import load_fleet_spec
from lorafleet.demo.run import run_demo
from lorafleet.demo.synthetic import TASKS
from lorafleet.eval.run import read_items, score
from lorafleet.report import RunRecord, loss_and_lr_figure, read_run, smoothed
from lorafleet.train.trainer import FleetTrainer
from tests.conftest import write_text_dataset
from tests.eval.test_chat import CHATS
from tests.eval.test_chat import REPLIES as CHAT_REPLIES
from tests.eval.test_mmmu import hand_counted, write_jsonl


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory, tiny_lm_dir):
    """Three adapters, two at a time ("c" queues until "b" finishes), killed at fleet step 10 and
    resumed from the checkpoint at step 8 by `lorafleet train --resume`, which writes the report."""
    root = tmp_path_factory.mktemp("run")
    for i in range(3):
        write_text_dataset(root / f"d{i}.jsonl", n=9 + i, seed=i)
    adapters = [
        {"name": "a", "data": "d0.jsonl", "rank": 4, "micro_batch_size": 2, "grad_accum": 3, "steps": 6},
        {"name": "b", "data": "d1.jsonl", "rank": 2, "steps": 5},
        {"name": "c", "data": "d2.jsonl", "rank": 3, "micro_batch_size": 2, "steps": 7},
    ]
    for adapter in adapters:
        adapter["learning_rate"] = 3e-3
    spec = {"base": str(tiny_lm_dir), "output": "out", "adapters": adapters, "max_concurrent": 2}
    (root / "fleet.yaml").write_text(yaml.safe_dump(spec | {"checkpoint_every": 4, "keep_checkpoints": 2}))

    def crash_at_step_10(step: int) -> None:
        if step == 10:
            raise Crash

    with pytest.raises(Crash):
        FleetTrainer(load_fleet_spec(root / "fleet.yaml"), progress=False, on_step=crash_at_step_10).run()
    assert main(["train", str(root / "fleet.yaml"), "--resume", "--no-progress"]) == 0
    return root / "out"


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def test_the_run_record_shows_the_queue_the_checkpoints_and_the_resume(resumed_run):
    run = read_run(resumed_run)
    assert set(run.adapters[:2]) == {"a", "b"} and run.adapters[2] == "c"
    assert run.resumes == [8]
    assert run.checkpoints and all(step % 4 == 0 for step in run.checkpoints)
    b_done = run.of("b")[-1]["fleet_step"]
    assert run.of("c")[0]["fleet_step"] > b_done, "c joins only when b has finished"


def test_train_writes_a_self_contained_report_with_real_plots(resumed_run):
    page = (resumed_run / "report.html").read_text()
    parser = Images()
    parser.feed(page)
    assert "src='http" not in page and "<script" not in page, "nothing to fetch: the file stands alone"
    assert len(parser.sources) == 2
    for source in parser.sources:
        assert source.startswith("data:image/png;base64,")
        picture = Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        assert picture.format == "PNG"
        pixels = np.asarray(picture.convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20, "a plot, not a blank"
    cells = [t.strip() for t in parser.text]
    assert "Resumed from fleet steps: 8." in " ".join(cells)
    assert {"a", "b", "c"} <= set(cells), "a row of final metrics per adapter"


def test_the_learning_rate_lines_have_a_legend_naming_each_adapter_in_its_colour(resumed_run):
    run = read_run(resumed_run)
    _, lr = loss_and_lr_figure(run).axes
    legend = lr.get_legend()
    assert legend is not None, "the learning-rate panel names its lines"
    assert [text.get_text() for text in legend.get_texts()] == run.adapters
    colours = {line.get_label(): line.get_color() for line in lr.get_lines()}
    assert [handle.get_color() for handle in legend.legend_handles] == [colours[name] for name in run.adapters]


def test_adapters_sharing_one_schedule_each_stay_visible_on_the_learning_rate_panel(tmp_path):
    steps = [
        {"adapter": name, "step": s, "fleet_step": s, "loss": 5 / s, "lr": 1e-3 * (1 - s / 50), "tokens": 9 * s,
         "elapsed_s": s}
        for s in range(1, 51)
        for name in ("a", "b", "c")
    ]  # fmt: skip
    figure = loss_and_lr_figure(RunRecord(tmp_path, steps, []))
    _, lr = figure.axes
    lr.get_legend().remove()  # its swatches show every colour, whatever the lines do
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())[..., :3].astype(int)
    box = lr.get_window_extent()  # display coordinates: origin at the bottom left
    panel = pixels[int(pixels.shape[0] - box.y1) : int(pixels.shape[0] - box.y0), int(box.x0) : int(box.x1)]
    for index, name in enumerate("abc"):
        colour = np.array(to_rgb(f"C{index}")) * 255
        assert (np.abs(panel - colour).sum(axis=-1) < 30).sum() > 200, f"{name}'s line is hidden under the others"


def test_the_loss_axis_is_labelled_in_plain_numbers(resumed_run):
    figure = loss_and_lr_figure(read_run(resumed_run))
    figure.canvas.draw()
    labels = [label.get_text() for label in figure.axes[0].get_yticklabels(which="both") if label.get_text()]
    assert labels and not [label for label in labels if "times" in label or "^" in label], labels


def test_smoothing_is_tensorboards_debiased_exponential_moving_average():
    # Weight 0.5 over 1, 0, 1: running averages 0.5, 0.25, 0.625, each divided by the weight the
    # average has gathered so far (1 - 0.5^n: 0.5, 0.75, 0.875), so the curve does not start at 0.
    assert smoothed([1.0, 0.0, 1.0], 0.5) == pytest.approx([1.0, 1 / 3, 5 / 7])
    assert smoothed([3.0, 1.0], 0.0) == [3.0, 1.0], "weight 0 is the raw curve"
    # A diverged step is drawn as it is and leaves the average alone, as in TensorBoard.
    diverged = smoothed([1.0, math.nan, 0.0], 0.5)
    assert diverged[0] == 1.0 and math.isnan(diverged[1]) and diverged[2] == pytest.approx(1 / 3)


def lines_through(axes, values: list[float]) -> list:
    return [line for line in axes.get_lines() if list(line.get_ydata()) == values]


def test_report_smooth_draws_each_loss_as_its_moving_average_over_the_raw_curve_kept_faint(resumed_run, tmp_path):
    out = tmp_path / "smoothed.html"
    assert main(["report", str(resumed_run), "--smooth", "0.9", "--out", str(out)]) == 0
    assert "moving average with weight 0.9" in out.read_text()
    run = read_run(resumed_run)
    loss, _ = loss_and_lr_figure(run, smoothing=0.9).axes
    for adapter in run.adapters:
        raw = [step["loss"] for step in run.of(adapter)]
        [faint], [average] = lines_through(loss, raw), lines_through(loss, smoothed(raw, 0.9))
        assert average.get_label() == adapter and average.get_alpha() is None
        assert faint.get_alpha() <= 0.3 and faint.get_color() == average.get_color()
        assert faint.get_label().startswith("_"), "the faint curve is not named twice in the legend"
    loss, _ = loss_and_lr_figure(run).axes  # without --smooth: the raw curves, in full colour
    assert all([line] == lines_through(loss, [s["loss"] for s in run.of(line.get_label())]) for line in loss.lines)
    assert all(line.get_alpha() is None for line in loss.lines)


def test_a_smoothing_weight_outside_0_to_1_is_refused_with_what_it_means(resumed_run, capsys):
    assert main(["report", str(resumed_run), "--smooth", "1"]) == 2
    assert "--smooth 1.0: the smoothing weight must be at least 0 and below 1" in capsys.readouterr().err


def test_report_command_takes_eval_results_into_the_page(resumed_run, tmp_path):
    evaluation = {
        "data": "held-out.jsonl",
        "models": ["base", "a"],
        "overall": {m: {"accuracy": acc, "questions": 4, "unparseable": 1} for m, acc in [("base", 0.0), ("a", 0.75)]},
        "by_subfield": {},
        "tokens_per_s": 123.4,
    }
    (resumed_run / "eval-held-out.json").write_text(json.dumps(evaluation))
    out = tmp_path / "r.html"
    assert main(["report", str(resumed_run), "--out", str(out)]) == 0
    page = out.read_text()
    assert "Evaluation: eval-held-out.json" in page and "75.0% of 4 (1 unparseable)" in page
    (resumed_run / "eval-held-out.json").unlink()


@pytest.mark.slow  # builds, trains and evaluates the demo fleet, at its smallest
def test_the_demo_writes_its_report_and_says_where_when_it_finishes(tmp_path):
    out, lines = tmp_path / "demo", []
    run_demo(out, train_size=16, test_size=4, steps=3, progress=False, log=lines.append, preference_steps=2)
    assert lines[-1].endswith(f"report: {out / 'report.html'}"), lines[-1]
    assert set(read_run(out).adapters) == {task.department for task in TASKS}
    assert "Training run demo" in (out / "report.html").read_text()
    assert f"    report: {out / 'preference' / 'report.html'}" in lines, "the preference stage's run has its own"
    assert read_run(out / "preference").adapters == ["marketing-dpo"]
    assert (out / "preference" / "report.html").exists()


class Tables(HTMLParser):
    """The cell texts of each table, row by row."""

    def __init__(self):
        super().__init__()
        self.tables, self._cell = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell)
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def test_the_page_shows_token_f1_beside_exact_match_for_chats_and_accuracy_per_difficulty(resumed_run, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    kind, items = read_items(chats)
    replies = ["blue", CHAT_REPLIES[0], "", CHAT_REPLIES[1]]  # base and tuned, question by question
    evaluations = {
        "eval-chats.json": score(str(chats), kind, items, ["base", "tuned"], replies).to_json(),
        "eval-mmmu.json": hand_counted(write_jsonl(tmp_path)).to_json(),
    }
    for name, content in evaluations.items():
        (resumed_run / name).write_text(json.dumps(content))
    try:
        assert main(["report", str(resumed_run), "--out", str(tmp_path / "r.html")]) == 0
    finally:
        for name in evaluations:
            (resumed_run / name).unlink()
    parser = Tables()
    parser.feed((tmp_path / "r.html").read_text())
    chat_table, mmmu_table = parser.tables[1:]  # after the final metrics
    assert chat_table[:3] == [
        ["", "base", "tuned"],
        ["exact match", "0.0% of 2 (1 unparseable)", "50.0% of 2 (0 unparseable)"],
        ["token F1", "0.000", "0.833"],  # (1 + 2/3) / 2, tests/eval/test_chat.py
    ]
    rows = {row[0]: row[1:] for row in mmmu_table}
    assert "token F1" not in rows, "MMMU answers are letters: no token F1"
    assert rows["difficulty: Easy"] == ["0.0% of 1 (1 unparseable)", "100.0% of 1 (0 unparseable)"]
    assert rows["difficulty: Hard"] == ["0.0% of 2 (0 unparseable)", "50.0% of 2 (0 unparseable)"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium) to render")
def test_the_report_renders_in_headless_chromium_with_plots_on_screen(resumed_run, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1300,1200",
         f"--screenshot={shot}", (resumed_run / "report.html").as_uri()],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # The plots sit below the heading and the table; matplotlib's first line colour (tab:blue,
    # 31 119 180) must be on screen there, among many other colours.
    plot_area = pixels[300:1200]
    blue = (np.abs(plot_area - [31, 119, 180]).sum(axis=-1) < 30).sum()
    assert blue > 200, "no plot lines on screen"
    assert len(np.unique(plot_area.reshape(-1, 3), axis=0)) > 50
