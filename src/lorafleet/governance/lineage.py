"""What made an adapter: the facts its `lineage.json` records, gathered where they are known.

A lineage record names the base (path and SHA-256 of its weight files), every data file (SHA-256,
records, tokens, images and their combined SHA-256, skipped records), the full adapter and fleet
config, the seeds, the software (lorafleet's version and git commit where there is one), the
hardware, start and end, the loss (final and per epoch), the compute used, and parent links
(`init_from`, a compressed model's base and adapter). Training writes it beside each adapter and
into the fleet's registry (governance/registry.py); the model card and the Annex IV draft are
generated from it (governance/documents.py).

Paths inside the fleet directory (the adapter's own directory, a base or data file kept in the
fleet) are stored relative to it and resolved against wherever the fleet is read from, so a
copied or moved fleet describes itself, not the directory it was copied from. Held-out scores
are keyed by the data file's SHA-256, with its path beside them: two files of the same name are
two evaluations.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lorafleet
from lorafleet.errors import RegistryError

LINEAGE_FILE = "lineage.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class DataFile:
    path: str
    sha256: str
    records: int  # encoded and trained on
    tokens: int  # in those records, prompt and reply
    images: int
    images_sha256: str | None  # SHA-256 over the images' own SHA-256s, in record order
    skipped: int  # bad records skipped (skip_bad_records)


@dataclass
class Lineage:
    name: str
    kind: str  # "adapter" (trained) or "model" (compressed)
    directory: str
    weights_sha256: dict[str, str]  # file name -> SHA-256
    base: dict  # {"path": ..., "weights_sha256": {...}}
    data: list[DataFile] = field(default_factory=list)
    adapter_config: dict = field(default_factory=dict)
    fleet_config: dict = field(default_factory=dict)
    seeds: dict = field(default_factory=dict)
    software: dict = field(default_factory=dict)
    hardware: dict = field(default_factory=dict)
    started: str | None = None
    finished: str | None = None
    loss: dict = field(default_factory=dict)  # {"final": x, "per_epoch": [...], "steps": n}
    compute: dict = field(default_factory=dict)  # tokens, seconds, estimated FLOPs
    evaluation: dict = field(default_factory=dict)  # held-out file's SHA-256 -> its path and scores
    parents: list[dict] = field(default_factory=list)  # {"relation", "name", "path", "id"}
    compression: dict = field(default_factory=dict)  # a compressed model's settings and stages
    sweep: dict = field(default_factory=dict)  # the search that chose this adapter: space, trials, why it won

    @property
    def id(self) -> str:
        return weights_id(self.weights_sha256)

    def to_dict(self) -> dict:
        return {"id": self.id, **asdict(self)}

    @staticmethod
    def from_dict(raw: dict) -> Lineage:
        values = {key: value for key, value in raw.items() if key != "id"}
        values["data"] = [DataFile(**item) for item in values.get("data", [])]
        return Lineage(**values)


def weights_id(weights_sha256: dict[str, str]) -> str:
    """Content address: SHA-256 over the weight files' hashes (the same weights, the same id)."""
    joined = "".join(f"{name}:{digest}\n" for name, digest in sorted(weights_sha256.items()))
    return hashlib.sha256(joined.encode()).hexdigest()


def write_lineage(lineage: Lineage, directory: str | Path, fleet_dir: str | Path | None = None) -> Path:
    """Write `lineage.json` into `directory`; paths inside `fleet_dir` (when given) relative to it."""
    record = within_fleet(lineage, fleet_dir) if fleet_dir is not None else lineage
    path = Path(directory) / LINEAGE_FILE
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record.to_dict(), indent=2, sort_keys=False) + "\n")
    os.replace(partial, path)
    return path


def within_fleet(lineage: Lineage, fleet_dir: str | Path) -> Lineage:
    """The record as a fleet stores it: every path inside `fleet_dir` relative to it."""
    root = Path(fleet_dir).resolve()

    def relative(path: str) -> str:
        if not Path(path).is_absolute():
            return path
        resolved = Path(path).resolve()
        return str(resolved.relative_to(root)) if resolved.is_relative_to(root) else path

    return _map_paths(lineage, relative)


def resolved_in(lineage: Lineage, fleet_dir: str | Path) -> Lineage:
    """The record with its fleet-relative paths resolved against where the fleet is now."""
    root = Path(fleet_dir).resolve()
    return _map_paths(lineage, lambda path: path if Path(path).is_absolute() else str(root / path))


def _map_paths(lineage: Lineage, change) -> Lineage:
    record = Lineage.from_dict(json.loads(json.dumps(lineage.to_dict())))  # a deep copy
    record.directory = change(record.directory)
    if record.base.get("path"):
        record.base["path"] = change(record.base["path"])
    for data in record.data:
        data.path = change(data.path)
    for scores in record.evaluation.values():
        if scores.get("data"):
            scores["data"] = change(scores["data"])
    for parent in record.parents:
        parent["path"] = change(parent["path"])
    return record


def record_evaluation(lineage: Lineage, data: str | Path, data_sha256: str, scores: dict) -> None:
    """Add held-out scores under the data file's SHA-256 (a file evaluated again replaces its own
    scores, never those of another file with the same name), with the file's path."""
    lineage.evaluation[data_sha256] = {"data": str(Path(data).resolve()), "data_sha256": data_sha256} | scores


def read_lineage(directory: str | Path) -> Lineage:
    """The `lineage.json` in `directory`, its fleet-relative paths resolved against the fleet that
    holds the directory now (its own `directory` field says how deep in the fleet it lies)."""
    path = Path(directory) / LINEAGE_FILE
    if not path.exists():
        raise RegistryError(f"{path} does not exist; lineage is written when lorafleet trains or compresses")
    try:
        lineage = Lineage.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise RegistryError(f"{path}: not a lineage record ({err})") from err
    if Path(lineage.directory).is_absolute():
        return lineage
    here, depth = Path(directory).resolve(), len(Path(lineage.directory).parts)
    return resolved_in(lineage, here.parents[depth - 1] if depth else here)


# --- facts --------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_hashes(directory: str | Path) -> dict[str, str]:
    """SHA-256 of every weight file in a model or adapter directory, by file name."""
    directory = Path(directory)
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return {path.name: sha256_file(path) for path in files}


def combined_sha256(digests: list[str]) -> str:
    return hashlib.sha256("".join(digest + "\n" for digest in digests).encode()).hexdigest()


def describe_data(path: str | Path, records: list, examples: list, skipped: int) -> DataFile:
    """A data file as it was used: its hash, what it held (`records` as read, each with `.images`;
    `examples` as encoded, each with `.num_tokens`) and its images' combined hash."""
    image_hashes = [
        hashlib.sha256(image).hexdigest() if isinstance(image, bytes) else sha256_file(image)
        for record in records
        for image in record.images
        if isinstance(image, bytes) or Path(image).exists()
    ]
    return DataFile(
        path=str(Path(path).resolve()),
        sha256=sha256_file(path),
        records=len(examples),
        tokens=sum(example.num_tokens for example in examples),
        images=len(image_hashes),
        images_sha256=combined_sha256(image_hashes) if image_hashes else None,
        skipped=skipped,
    )


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_CACHE_DIR = re.compile(r"^models--([\w.-]+)--([\w.-]+)$")


def base_model_name(path: str | Path) -> str:
    """What a base checkpoint calls itself: the hub id its config records (or its Hugging Face
    cache directory spells), else its directory's name; never a path of the machine it was on."""
    path = Path(path)
    config = path / "config.json"
    if config.is_file():
        try:
            recorded = json.loads(config.read_text()).get("_name_or_path")
        except (json.JSONDecodeError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and HUB_ID.match(recorded) and not Path(recorded).exists():
            return recorded
    for part in reversed(path.parts):
        cached = HUB_CACHE_DIR.match(part)
        if cached:
            return f"{cached[1]}/{cached[2]}"
    return path.name


def parent_link(path: str | Path, relation: str) -> dict:
    """A link to the adapter or model something was made from: its lineage id when it has one."""
    link = {"relation": relation, "path": str(Path(path).resolve()), "weights_sha256": weight_hashes(path)}
    if (Path(path) / LINEAGE_FILE).exists():
        parent = read_lineage(path)
        link |= {"id": parent.id, "name": parent.name}
    return link


def software() -> dict:
    import torch
    import transformers

    return {
        "lorafleet": lorafleet.__version__,
        "git_commit": git_commit(Path(lorafleet.__file__).parent),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


@functools.cache
def git_commit(directory: Path) -> str | None:
    """The commit lorafleet runs from, "+dirty" with uncommitted changes; None outside a checkout.
    Asked once per process: the code running is the code imported, whatever the checkout holds
    later (and a sweep saving many trials would otherwise start two git processes per trial)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no", "."],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def hardware(device: str) -> dict:
    import torch

    facts = {"device": device, "platform": platform.platform(), "cpu": platform.machine(), "cpus": os.cpu_count()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
        facts["gpus"] = torch.cuda.device_count()
        facts["cuda"] = torch.version.cuda
    return facts


def per_epoch_loss(metrics_file: str | Path, adapter: str) -> list[float]:
    """Mean loss of each (whole or partial) epoch of `adapter`, from the trainer's metrics.jsonl."""
    path = Path(metrics_file)
    if not path.exists():
        return []
    epochs: dict[int, list[float]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["adapter"] == adapter:
            # `epoch` is the stream's position after the step: the step belongs to the epoch it ran in.
            epochs.setdefault(int(max(record["epoch"] - 1e-9, 0)), []).append(record["loss"])
    return [sum(losses) / len(losses) for _, losses in sorted(epochs.items())]
