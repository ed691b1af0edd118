"""The fleet on more than one process: torch.distributed under `torchrun`.

`lorafleet train FLEET.yaml` launched by `torchrun --nproc-per-node N` (WORLD_SIZE > 1) joins the
process group here (gloo on CPU, NCCL on CUDA with the LOCAL_RANK's GPU) and trains in one of two
modes (the fleet's `parallel:` section, docs/distributed.md):

- adapter: each process holds the base and trains its share of the adapters, placed here by
  greedy longest-processing-time on their token load; no gradient crosses processes. Processes
  meet only at checkpoint steps and at the end, where process 0 gathers every adapter's state,
  the metrics and the finished adapters' facts, and alone writes the fleet's files.
- data: every process trains every adapter on its share of each micro-batch (examples r::world);
  the due adapters' LoRA gradients and the step's losses are summed in one all-reduce before the
  optimizer step. Process 0 alone writes.

Either way a checkpoint is the single-process checkpoint (every adapter's whole state), so a run
stopped on N processes resumes on any number, one included. A process that fails leaves its
message in `<output>/.distributed/`; the others, whose next collective then fails or times out,
raise it as their own error, naming the process, instead of hanging.
"""

from __future__ import annotations

import heapq
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lorafleet.config import FleetSpec
from lorafleet.errors import TrainingError
from lorafleet.models.hf_compat import inner_model
from lorafleet.models.loading import FrozenBase

ERRORS_DIR = ".distributed"
SHARES_WAIT = timedelta(days=7)


def launched() -> bool:
    """Whether this process is one of several started by torchrun (or an equivalent launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Group:
    """This process's place in the run, and the collectives the trainer uses."""

    rank: int
    world: int
    mode: str  # adapter | data
    device: torch.device
    errors: Path  # where a failing process leaves its message
    shards_base: bool = False  # data mode with the frozen base sharded (FSDP2)
    objects: dist.ProcessGroup | None = None  # gloo group for Python objects when the devices are GPUs

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def data_parallel(self) -> bool:
        return self.mode == "data"

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over every process, in place."""
        self._collective(lambda: dist.all_reduce(tensor))
        return tensor

    def gather(self, item: object) -> list[object] | None:
        """Every process's `item`, in rank order, on process 0 (None elsewhere)."""
        gathered = [None] * self.world if self.main else None
        self._collective(lambda: dist.gather_object(item, gathered, dst=0, group=self.objects))
        return gathered

    def broadcast(self, item: object) -> object:
        """Process 0's `item`, on every process."""
        box = [item]
        self._collective(lambda: dist.broadcast_object_list(box, src=0, group=self.objects))
        return box[0]

    def barrier(self) -> None:
        self._collective(lambda: dist.barrier(group=self.objects))

    def _collective(self, call: Callable[[], object]) -> None:
        try:
            call()
        except RuntimeError as err:  # DistBackendError and gloo's errors: a peer died or timed out
            raise self.peer_failure(err) from err

    def peer_failure(self, err: Exception) -> TrainingError:
        """The error to raise when a collective failed: another process's own message if it left
        one (waiting a little for a shared file system to show it), else what the backend said."""
        deadline = time.monotonic() + 5
        while True:
            reports = sorted(self.errors.glob("rank-*.error")) if self.errors.exists() else []
            reports = [path for path in reports if path.name != f"rank-{self.rank}.error"]
            if reports or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        resume = "resume from the last checkpoint with `lorafleet train FLEET.yaml --resume` (any number of processes)"
        if reports:
            failures = "; ".join(f"{path.stem} failed: {path.read_text().strip()}" for path in reports)
            where = f"of {self.world} processes; this is rank {self.rank}"
            return TrainingError(f"{failures} ({where}). Fix it and {resume}")
        return TrainingError(
            f"rank {self.rank} of {self.world}: a collective with the other processes failed ({err}); another "
            f"process stopped or did not answer within the timeout. See its output, then {resume}"
        )

    def report_failure(self, err: BaseException) -> None:
        """Leave this process's error where the others look for it."""
        self.errors.mkdir(parents=True, exist_ok=True)
        (self.errors / f"rank-{self.rank}.error").write_text(f"{type(err).__name__}: {err}\n")


@contextmanager
def process_group(spec: FleetSpec) -> Iterator[Group]:
    """Join the run's process group for the length of the block (the launcher's environment says
    where: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and leave it after."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _device(spec)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(minutes=spec.parallel.timeout_minutes)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, device_id=_device_id(device))
    errors = Path(spec.output) / ERRORS_DIR
    group = Group(rank, world, spec.parallel.mode, device, errors, spec.parallel.shard_base)
    try:
        if backend != "gloo" or group.mode == "adapter":
            # adapter mode: a process whose share is done waits for the others' next checkpoint step
            # or their end, however long that is (a process that dies still closes its connections)
            wait = SHARES_WAIT if group.mode == "adapter" else timeout
            group.objects = dist.new_group(backend="gloo", timeout=wait)
        if group.main:
            shutil.rmtree(errors, ignore_errors=True)  # an earlier run's messages
        group.barrier()
        yield group
        group.barrier()  # nobody is still reading what process 0 is about to tidy
        if group.main:
            shutil.rmtree(errors, ignore_errors=True)
    except BaseException as err:
        group.report_failure(err)
        raise
    finally:
        dist.destroy_process_group()


def _device(spec: FleetSpec) -> torch.device:
    """The process's device: its LOCAL_RANK's GPU, or the CPU (the spec's device says which)."""
    wanted = torch.device(spec.device) if spec.device else None
    if (wanted is None and torch.cuda.is_available()) or (wanted is not None and wanted.type == "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _device_id(device: torch.device) -> torch.device | None:
    return device if device.type == "cuda" else None


def place(work: dict[str, float], world: int, busy: list[float] | None = None) -> list[list[str]]:
    """Adapters to processes, greedy longest-processing-time: the heaviest adapter first, each to
    the least loaded process (ties to the lowest rank), so the busiest process carries at most
    4/3 of the best possible load. `busy`: the work each process already has. Every process
    computes the same placement."""
    loads = [(busy[rank] if busy else 0.0, rank) for rank in range(world)]
    heapq.heapify(loads)
    shares: list[list[str]] = [[] for _ in range(world)]
    order = sorted(work, key=lambda name: (-work[name], list(work).index(name)))
    for name in order:
        load, rank = heapq.heappop(loads)
        shares[rank].append(name)
        heapq.heappush(loads, (load + work[name], rank))
    return shares


def shard_base(base: FrozenBase, group: Group) -> None:
    """FSDP2 over the frozen base: each decoder layer (the vision tower's too) is one unit whose
    weights live 1/world per process and are gathered for its forward and again for its backward;
    the rest of the model below the head (embeddings, norms, projector) is the root unit. The output
    head stays whole on every process: the chunked loss calls it on its own, and small models tie
    it to the embeddings, which therefore stay whole too. The base is frozen, so nothing is
    reduce-scattered; the LoRA weights, added later, are not sharded and their gradients are summed
    as in data mode."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(group.device.type, (group.world,))
    inner = inner_model(base.model)
    head = set(base.model.get_output_embeddings().parameters())
    for name, layers in inner.named_modules():
        if isinstance(layers, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "layer"):
            for layer in layers:
                fully_shard(layer, mesh=mesh, ignored_params=head & set(layer.parameters()))
    fully_shard(inner, mesh=mesh, ignored_params=head)
    base.model.to(group.device)  # what no unit holds (the head) joins the shards on the device
