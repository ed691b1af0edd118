"""Where a training run's per-step metrics go: `metrics.jsonl` always, TensorBoard when asked.

`metrics.jsonl` holds one line per optimizer step of each adapter (loss, pre-clip gradient norm,
learning rate, tokens, epoch, and the held-out loss on the steps that were evaluated); the report,
the lineage record and a resumed run read it back. With `report_to: [tensorboard]` the same
numbers go to TensorBoard event files, one run directory per adapter under `<output>/tensorboard/`,
so adapters show as comparable runs. The JSONL file is the record and the event files a view of
it: a resumed run drops the lines the killed run wrote after its checkpoint and writes the event
files afresh from the lines kept (TensorBoard's own `purge_step` depends on event files sorting
by name in the order they were written, which a restart within the same second breaks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lorafleet.errors import ConfigError
from lorafleet.fleet_dir import FleetDir

# metrics.jsonl key -> TensorBoard tag
SCALARS = {"loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr", "eval_loss": "eval/loss"}


class RunLog:
    def __init__(self, output: Path, report_to: list[str]) -> None:
        self.path = FleetDir(output).metrics
        self.tensorboard = "tensorboard" in report_to
        if self.tensorboard:
            _summary_writer()  # fail at the start of the run, not at its first step
        self.events = FleetDir(output).tensorboard
        self.writers: dict = {}

    def start_fresh(self) -> None:
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.events, ignore_errors=True)

    def resume_at(self, fleet_step: int) -> None:
        """Keep what was logged up to the checkpoint (`fleet_step`), drop what came after it."""
        kept = []
        if self.path.exists():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["fleet_step"] <= fleet_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if self.tensorboard:
            shutil.rmtree(self.events, ignore_errors=True)
            for line in kept:
                self._add_scalars(json.loads(line))

    def write(self, record: dict) -> None:
        with self.path.open("a") as log:
            log.write(json.dumps(record) + "\n")
        if self.tensorboard:
            self._add_scalars(record)

    def _add_scalars(self, record: dict) -> None:
        writer = self._writer(record["adapter"])
        for key, tag in SCALARS.items():
            if record.get(key) is not None:
                writer.add_scalar(tag, record[key], record["step"])
        writer.add_scalar("train/tokens", record["tokens"], record["step"])

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()

    def _writer(self, adapter: str):
        if adapter not in self.writers:
            self.writers[adapter] = _summary_writer()(str(self.events / adapter))
        return self.writers[adapter]


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ConfigError(
            "report_to: tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install 'lorafleet[tensorboard]'), or leave report_to out"
        ) from err
    return SummaryWriter
