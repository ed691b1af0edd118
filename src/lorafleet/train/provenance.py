"""What a training run records for governance: audit entries and each adapter's lineage.

The trainer calls one method per event (run started or resumed, checkpoint saved, adapter saved,
run finished); this module turns them into entries of the fleet's audit log and, per finished
adapter, a `lineage.json` beside it and a row in the fleet's registry. The data files, their
images and the base's weight files are hashed once, when the run starts.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

from lorafleet.config import AdapterSpec, FleetSpec
from lorafleet.data.encode import Example
from lorafleet.data.preference import PreferencePair, read_preference_records
from lorafleet.data.records import read_records
from lorafleet.fleet_dir import FleetDir
from lorafleet.governance.audit import AuditLog, utc_now
from lorafleet.governance.lineage import (
    DataFile,
    Lineage,
    base_model_name,
    describe_data,
    hardware,
    parent_link,
    per_epoch_loss,
    sha256_file,
    software,
    weight_hashes,
    write_lineage,
)
from lorafleet.governance.registry import register
from lorafleet.governance.retention import apply_retention, set_retention
from lorafleet.models.loading import FrozenBase
from lorafleet.train.job import AdapterJob


class TrainingProvenance:
    def __init__(
        self, spec: FleetSpec, base: FrozenBase, examples: dict[str, list[Example]], skipped: dict[str, list[str]]
    ) -> None:
        self.spec = spec
        self.output = Path(spec.output)
        self.audit = AuditLog(self.output)
        self.device = str(base.device)
        self.base_parameters = sum(parameter.numel() for parameter in base.model.parameters())
        self.base = {
            "path": str(Path(spec.base).resolve()),
            "name": base_model_name(spec.base),
            "weights_sha256": weight_hashes(spec.base) if Path(spec.base).is_dir() else {},
        }
        self.data: dict[str, DataFile] = {}
        for adapter in spec.adapters:
            self.describe_data(adapter, examples[adapter.name], skipped)
        self.started: dict[str, str] = {}

    def describe_data(self, adapter: AdapterSpec, examples: list[Example], skipped: dict[str, list[str]]) -> None:
        """What the adapter's lineage says of its training data (hashed here: once per adapter)."""
        self.data[adapter.name] = describe_training_data(adapter.data, examples, len(skipped.get(adapter.name, [])))

    def run_started(self, resumed_at: int | None) -> None:
        """`resumed_at`: the fleet step of the checkpoint a resumed run continues from."""
        facts = {
            "output": str(self.output),
            "base": self.base,
            "adapters": [adapter.name for adapter in self.spec.adapters],
            "data": {name: dataclasses.asdict(data) for name, data in self.data.items()},
            "device": self.device,
        }
        if self.spec.audit_keep_days is not None:
            set_retention(self.output, self.spec.audit_keep_days, via="lorafleet train")
            apply_retention(self.output, via="lorafleet train")
        if resumed_at is None:
            self.audit.append("train.start", facts)
        else:
            self.audit.append("train.resume", facts | {"fleet_step": resumed_at})

    def adapter_started(self, name: str) -> None:
        self.started[name] = utc_now()

    def checkpoint_saved(self, path: Path, fleet_step: int, active: list[str]) -> None:
        self.audit.append(
            "train.checkpoint",
            {"path": str(path), "sha256": sha256_file(path), "fleet_step": fleet_step, "active": active},
        )

    def adapter_saved(self, job: AdapterJob, directory: Path, fleet_step: int, step_losses: list[float]) -> Lineage:
        """Write the finished adapter's lineage beside it, register it, and log it."""
        spec = job.spec
        final_loss = step_losses[-1] if step_losses else None
        started = self.started.get(spec.name)
        finished = utc_now()
        losses = per_epoch_loss(FleetDir(self.output).metrics, spec.name)
        seconds = (_parse(finished) - _parse(started)).total_seconds() if started else None
        lineage = Lineage(
            name=spec.name,
            kind="adapter",
            directory=str(Path(directory).resolve()),
            weights_sha256=weight_hashes(directory),
            base=self.base,
            data=[self.data[spec.name]],
            adapter_config=dataclasses.asdict(spec),
            fleet_config=dataclasses.asdict(self.spec),
            seeds={"adapter": spec.seed, "fleet": self.spec.seed},
            software=software(),
            hardware=hardware(self.device),
            started=started,
            finished=finished,
            loss={"final": final_loss, "per_epoch": losses, "optimizer_steps": job.optimizer_step},
            compute={
                "tokens": job.tokens,
                "seconds": seconds,
                # Frozen base: forward 2·N·T and the input gradients 2·N·T; LoRA's own FLOPs are noise.
                "estimated_flops": 4 * self.base_parameters * job.tokens,
                "base_parameters": self.base_parameters,
            },
            parents=[parent_link(spec.init_from, "init_from")] if spec.init_from else [],
        )
        write_lineage(lineage, directory, self.output)
        register(self.output, lineage)
        self.audit.append(
            "train.adapter_saved",
            {
                "adapter": spec.name,
                "directory": lineage.directory,
                "lineage_id": lineage.id,
                "weights_sha256": lineage.weights_sha256,
                "final_loss": final_loss,
                "optimizer_steps": job.optimizer_step,
                "fleet_step": fleet_step,
            },
        )
        return lineage

    def adapter_diverged(self, name: str, loss: float, fleet_step: int, optimizer_steps: int) -> None:
        """An adapter stopped unsaved because its loss was no longer a number (a sweep's trial)."""
        self.audit.append(
            "train.adapter_diverged",
            {"adapter": name, "loss": str(loss), "fleet_step": fleet_step, "optimizer_steps": optimizer_steps},
        )

    def run_finished(self, fleet_steps: int, tokens: int, adapters: dict[str, Path]) -> None:
        self.audit.append(
            "train.finish",
            {"fleet_steps": fleet_steps, "tokens": tokens, "adapters": {k: str(v) for k, v in adapters.items()}},
        )


def describe_training_data(path: str | Path, examples: list[Example], skipped: int) -> DataFile:
    if examples and isinstance(examples[0], PreferencePair):  # dpo/mpo data
        records = read_preference_records(path)
    else:
        records, _ = read_records(path, skip_bad=True)
    return describe_data(path, records, examples, skipped)


def _parse(moment: str) -> datetime:
    return datetime.fromisoformat(moment.replace("Z", "+00:00")).astimezone(UTC)
