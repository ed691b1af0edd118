"""Training runs as the console draws them: every `metrics.jsonl` in the fleet directory (the
fleet's own run, and runs kept inside it such as `erasures/<id>/run/` or a preference stage),
read incrementally from where the last read stopped, so a page open on a run of 100k lines costs
one full read and then only the new lines.

Per adapter it keeps columns (optimizer step, fleet step, loss, held-out loss, learning rate,
tokens/s over the last `RATE_WINDOW` steps); which adapters shared fleet steps; the checkpoints on
disk; and where the run resumed (the trainer's clock starting again, as report.py reads it). A
first paint gets each column thinned to at most `MAX_POINTS` points; live updates get the lines
appended since an offset. A file that was rewritten is read again from the start: a resumed run
drops the lines past its checkpoint and a fresh run replaces the file, either of which may have
grown past the old offset by the next read, so the reader checks that the bytes it read last are
still where it read them.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.fleet_dir import METRICS, FleetDir, checkpoint_step

MAX_POINTS = 2000  # per column on a first paint: a chart's width in pixels holds no more
RATE_WINDOW = 10  # optimizer steps over which an adapter's tokens/s is averaged
RUN_DEPTH = 3  # how deep inside the fleet directory runs are looked for
TAIL_BYTES = 128  # the end of what was read, compared on each refresh to notice a rewritten file
COLUMNS = ("step", "fleet_step", "loss", "eval_loss", "lr", "tokens_per_s")


def find_runs(fleet_dir: Path) -> list[str]:
    """Every run in the fleet directory, as a path relative to it ("." for the fleet's own)."""
    found = []
    for depth in range(RUN_DEPTH + 1):
        for path in sorted(fleet_dir.glob("/".join(["*"] * depth + [METRICS]))):
            relative = path.parent.relative_to(fleet_dir)
            if not any(part.startswith(".") for part in relative.parts):
                found.append(str(relative))
    return found


@dataclass
class AdapterSeries:
    columns: dict[str, list] = field(default_factory=lambda: {name: [] for name in COLUMNS})
    recent: list[tuple[float, int]] = field(default_factory=list)  # (clock, tokens) of the last steps

    def add(self, line: dict, clock: float) -> None:
        self.recent = [*self.recent[-(RATE_WINDOW - 1) :], (clock, line["tokens"])]
        (then, before), (now, tokens) = self.recent[0], self.recent[-1]
        rate = (tokens - before) / (now - then) if now > then else None
        for name, value in zip(COLUMNS, (line["step"], line["fleet_step"], line["loss"]), strict=False):
            self.columns[name].append(value)
        self.columns["eval_loss"].append(line.get("eval_loss"))
        self.columns["lr"].append(line.get("lr"))
        self.columns["tokens_per_s"].append(round(rate, 1) if rate is not None else None)

    def since(self, start: int) -> dict[str, list]:
        return {name: values[start:] for name, values in self.columns.items()}

    def thinned(self, most: int) -> dict[str, list]:
        """Every column at most `most` points, evenly spaced, keeping the last (the live end)."""
        count = len(self.columns["step"])
        if count <= most:
            return {name: list(values) for name, values in self.columns.items()}
        keep = sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})
        return {name: [values[i] for i in keep] for name, values in self.columns.items()}


class RunReader:
    """One run's metrics, read up to `offset` bytes; `refresh` reads what was appended since."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = FleetDir(directory).metrics
        self._lock = threading.Lock()
        self.generation = 0  # counts the times the file was read again from its start
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self._tail = b""  # the last TAIL_BYTES bytes read, which end at `offset`
        self.adapters: dict[str, AdapterSeries] = {}
        self.shared: dict[tuple[str, ...], list[int]] = {}  # adapters that stepped together -> fleet steps
        self.resumes: list[int] = []
        self._fleet_step: int | None = None
        self._together: list[str] = []
        self._clock_offset = 0.0
        self._last_elapsed = 0.0

    def refresh(self) -> None:
        """Read the lines appended since the last read (all of them after the file shrank)."""
        with self._lock:
            if not self.path.exists():
                if self.offset:
                    self._start_over()
                return
            with self.path.open("rb") as handle:
                if not self._still_there(handle):
                    self._start_over()
                handle.seek(self.offset)
                data = handle.read()
            complete = data.rfind(b"\n") + 1  # a line still being written waits for the next read
            for raw in data[:complete].splitlines():
                self._add(raw)
            self.offset += complete
            self._tail = (self._tail + data[:complete])[-TAIL_BYTES:]

    def _still_there(self, handle) -> bool:
        """Whether the bytes read last still end at `offset` (False: the file was rewritten)."""
        handle.seek(self.offset - len(self._tail))
        return handle.read(len(self._tail)) == self._tail

    def _start_over(self) -> None:
        self._reset()
        self.generation += 1

    def _add(self, raw: bytes) -> None:
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            return  # not a step: the report skips such lines too
        if not isinstance(line, dict) or not {"adapter", "step", "fleet_step", "loss", "tokens"} <= line.keys():
            return
        elapsed = float(line.get("elapsed_s", 0.0))
        if elapsed < self._last_elapsed:  # a resumed process counts its seconds from zero again
            self.resumes.append(self._fleet_step or 0)
            self._clock_offset += self._last_elapsed
        self._last_elapsed = elapsed
        if line["fleet_step"] != self._fleet_step:
            self._close_group()
            self._fleet_step = line["fleet_step"]
        self._together.append(line["adapter"])
        self.adapters.setdefault(line["adapter"], AdapterSeries()).add(line, self._clock_offset + elapsed)

    def _close_group(self) -> None:
        if self._together:
            self.shared.setdefault(tuple(sorted(set(self._together))), []).append(self._fleet_step)
        self._together = []

    def checkpoints(self) -> list[int]:
        return sorted(step for path in FleetDir(self.directory).checkpoint_files() if (step := checkpoint_step(path)))

    def overview(self, most: int = MAX_POINTS) -> dict:
        """The run for a first paint: every adapter's columns thinned to `most` points."""
        self.refresh()
        with self._lock:
            return {
                "generation": self.generation,
                "adapters": {name: series.thinned(most) for name, series in self.adapters.items()},
                "steps": {name: len(series.columns["step"]) for name, series in self.adapters.items()},
                "shared": self._shared_summary(),
                "resumes": list(self.resumes),
                "checkpoints": self.checkpoints(),
            }

    def update(self, counts: dict[str, int], generation: int) -> dict | None:
        """What was added since the client saw `counts` points of each adapter (None: nothing);
        a client of an older generation (the file was rewritten) gets told to start over."""
        self.refresh()
        with self._lock:
            if generation != self.generation:
                return {"reset": True}
            added = {
                name: series.since(counts.get(name, 0))
                for name, series in self.adapters.items()
                if len(series.columns["step"]) > counts.get(name, 0)
            }
            if not added:
                return None
            return {
                "adapters": added,
                "shared": self._shared_summary(),
                "resumes": list(self.resumes),
                "checkpoints": self.checkpoints(),
            }

    def _shared_summary(self) -> list[dict]:
        """Each set of adapters that stepped together: how many fleet steps, the first and last (the
        step being read counts with the adapters read so far)."""
        groups = {names: list(steps) for names, steps in self.shared.items()}
        if self._together:
            steps = groups.setdefault(tuple(sorted(set(self._together))), [])
            steps.append(self._fleet_step)
        return [
            {"adapters": list(names), "fleet_steps": len(steps), "first": steps[0], "last": steps[-1]}
            for names, steps in groups.items()
        ]
