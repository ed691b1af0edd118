"""Typed job specs, validated once at the edge.

A fleet YAML becomes a `FleetSpec` holding one `AdapterSpec` per adapter. Unknown keys, missing
fields and out-of-range values are `ConfigError`s that name the file, the adapter and the field;
inside lorafleet the specs are trusted.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lorafleet.errors import ConfigError

ATTENTION_KERNELS = (None, "sdpa", "varlen", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCHEDULES = ("constant", "linear", "cosine")
REPORT_TARGETS = ("tensorboard",)  # where metrics go besides metrics.jsonl
OBJECTIVES = ("sft", "dpo", "mpo")
REFERENCES = ("base", "init")
# MPO (InternVL's post-training): preference (DPO sigmoid), quality (BCO pair), generation (SFT)
MPO_LOSS_WEIGHTS = (0.8, 0.2, 1.0)
PARALLEL_MODES = ("adapter", "data")
VARIANTS = ("lora", "dora")  # dora: weight-decomposed LoRA (a trained magnitude per output feature)
INITS = ("kaiming", "gaussian", "pissa", "olora")  # how a new adapter's A and B start (adapters/initial.py)


@dataclass
class AdapterSpec:
    """One adapter to train: its data and its hyperparameters."""

    name: str
    data: str
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    variant: str = "lora"  # lora | dora (DoRA: LoRA plus a trained magnitude vector, as peft's use_dora)
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank) instead of alpha / rank
    loraplus_lr_ratio: float | None = None  # LoRA+: B (and DoRA's magnitudes) at learning_rate x this
    init: str = "kaiming"  # kaiming | gaussian (A random, B zero) | pissa | olora (both from the base's weight)
    target_modules: list[str] | str = field(default_factory=lambda: list(ALL_PROJECTIONS))
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    micro_batch_size: int = 1
    grad_accum: int = 1
    steps: int | None = None  # optimizer steps; when unset, `epochs` over the data decides
    epochs: float | None = None
    schedule: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    shuffle: bool = True
    init_from: str | None = None  # a PEFT adapter directory to continue training
    skip_bad_records: bool = False  # count and report malformed records instead of stopping
    eval_data: str | None = None  # held-out records: their loss after the last step (and every eval_every)
    eval_every: int | None = None  # optimizer steps between held-out evaluations
    objective: str = "sft"  # sft | dpo | mpo (dpo and mpo train on preference pairs)
    beta: float = 0.1  # dpo/mpo: strength of the pull towards the reference
    loss_weights: list[float] | None = None  # mpo: preference, quality, generation (default 0.8, 0.2, 1.0)
    reference: str = "base"  # dpo/mpo: the base without the adapter, or "init": the init_from adapter, frozen

    def validate(self, where: str) -> None:
        problem = adapter_name_problem(self.name)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        for name in ("rank", "micro_batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{where}: {name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"{where}: dropout must be in [0, 1), got {self.dropout}")
        self._validate_variant(where)
        numbers = ("learning_rate", "alpha", "weight_decay", "max_grad_norm", "loraplus_lr_ratio")
        for name, minimum in ((name, 0.0 if name == "weight_decay" else None) for name in numbers):
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value) or (value <= 0 if minimum is None else value < minimum):
                bound = "positive" if minimum is None else f"at least {minimum:g}"
                raise ConfigError(f"{where}: {name} must be a finite number, {bound}; got {value}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}: warmup_steps must be at least 0, got {self.warmup_steps}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError(f"{where}: give steps or epochs, not both")
        if self.steps is not None and self.steps < 1 or self.epochs is not None and self.epochs <= 0:
            raise ConfigError(f"{where}: steps/epochs must be positive")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"{where}: schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError(f"{where}: target_modules is empty")
        self._validate_objective(where)
        if self.eval_every is not None and (self.eval_data is None or self.eval_every < 1):
            raise ConfigError(f"{where}: eval_every needs eval_data (a held-out file) and must be at least 1")

    def _validate_variant(self, where: str) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"{where}: variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.init not in INITS:
            raise ConfigError(f"{where}: init {self.init!r} is not one of {', '.join(INITS)}")
        if self.init in ("pissa", "olora") and self.variant == "dora":
            raise ConfigError(f"{where}: init: {self.init} with variant: dora is not supported yet; use one of them")
        if self.init != "kaiming" and self.init_from:
            raise ConfigError(f"{where}: init sets how a new adapter starts; init_from continues one: give one of them")
        if self.variant == "dora" and self.dropout:
            raise ConfigError(
                f"{where}: variant: dora trains without dropout in lorafleet (peft would apply it to DoRA's "
                f"base term as well); set dropout: 0, got {self.dropout}"
            )

    def _validate_objective(self, where: str) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"{where}: objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.reference not in REFERENCES:
            raise ConfigError(f"{where}: reference {self.reference!r} is not one of {', '.join(REFERENCES)}")
        if self.reference == "init" and not self.init_from:
            raise ConfigError(f"{where}: reference: init needs init_from (the adapter to hold as the reference)")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"{where}: beta must be a positive finite number, got {self.beta}")
        if self.loss_weights is not None:
            if self.objective != "mpo":
                raise ConfigError(f"{where}: loss_weights belong to objective: mpo (preference, quality, generation)")
            weights = self.loss_weights
            valid = all(isinstance(w, int | float) and math.isfinite(w) and w >= 0 for w in weights)
            if len(weights) != 3 or not valid:
                raise ConfigError(
                    f"{where}: loss_weights must be three non-negative numbers (preference, quality, generation), "
                    f"got {weights}"
                )


# An adapter's name is a directory name, a model name clients send and a key of PyTorch module
# tables (which cannot hold a "."), so one rule holds everywhere: config, training, serving, admin.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
RESERVED_NAMES = ("base",)  # the served base model answers to it


def adapter_name_problem(name: object) -> str | None:
    """Why `name` cannot name an adapter, or None when it can."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        return (
            f"adapter name {name!r} must be 1-64 letters, digits, '_' or '-', starting with a letter or digit "
            "(no '.', '/' or spaces)"
        )
    if name in RESERVED_NAMES:
        return f"adapter name {name!r} is reserved for the base model"
    return None


@dataclass
class ParallelSpec:
    """How a fleet trains under torchrun (WORLD_SIZE > 1); docs/distributed.md compares the modes."""

    # adapter: each process holds the base and trains a share of the adapters (no gradient traffic);
    # data: every process trains every adapter on its share of each micro-batch's examples, LoRA
    # gradients summed across processes before each optimizer step.
    mode: str = "adapter"
    # How long a process waits for the others in a collective before it gives up with an error.
    timeout_minutes: float = 30.0
    # data mode: shard the frozen base over the processes (FSDP2, fully_shard per decoder layer), for
    # a base that does not fit one GPU; each layer's weights are gathered for its forward and backward.
    shard_base: bool = False

    def validate(self, where: str) -> None:
        if self.mode not in PARALLEL_MODES:
            raise ConfigError(f"{where}: mode {self.mode!r} is not one of {', '.join(PARALLEL_MODES)}")
        if self.shard_base and self.mode != "data":
            raise ConfigError(f"{where}: shard_base needs mode: data (every process must run the same layers in step)")
        if not (math.isfinite(self.timeout_minutes) and self.timeout_minutes > 0):
            raise ConfigError(f"{where}: timeout_minutes must be a positive number, got {self.timeout_minutes}")


@dataclass
class FleetSpec:
    """A training job: one base model and the adapters to train on it together."""

    base: str
    output: str
    adapters: list[AdapterSpec]
    max_concurrent: int = 8  # adapters in one batch at once; the rest wait their turn
    max_seq_len: int = 4096  # a longer record is an error (never truncated: images would break)
    max_tiles: int | None = None  # image tiles per image; default: the model's image processor
    packing: bool = False  # all sequences back to back in one row: no padding, no FLOPs wasted on it
    # Padded (or packed) lengths are rounded up to a multiple of this, so that the GPU sees a few
    # distinct shapes instead of a new one every step (each costs kernel plans, graphs, compiles).
    length_multiple: int = 64
    # Loss through the output head only at label positions, in chunks recomputed in backward:
    # the full (tokens × vocabulary) logits never exist.
    chunked_loss: bool = True
    # Recompute each decoder layer's activations in backward instead of keeping them: less
    # memory for longer sequences or more adapters, about a third more compute.
    activation_checkpointing: bool = False
    # Regional torch.compile: each decoder layer compiled once (every layer reuses the code), so a
    # step launches fused kernels instead of one per operation. The first steps pay the compile.
    compile: bool = False
    # Adapters join the running batch only while the predicted peak memory (train/memory.py)
    # stays within this many GiB; default: 90% of the GPU, no limit on CPU.
    memory_budget_gb: float | None = None
    # QLoRA: "nf4" loads the frozen base's language-model Linears as 4-bit NormalFloat
    # (bitsandbytes, double-quantized); adapters stay fp32 and save in the same PEFT format.
    quantize_base: str | None = None
    # Attention kernel: sdpa, varlen (ours: with packing, SDPA on each packed sequence alone
    # instead of one masked (total length)² matrix), eager, or flash_attention_2 (flash-attn on a
    # GPU: the same per-sequence attention in one kernel). Default: varlen when packing, else sdpa.
    attention: str | None = None
    checkpoint_every: int = 100  # fleet steps between checkpoints; 0 turns them off
    keep_checkpoints: int = 2
    seed: int = 0  # seeds dropout; each adapter's own seed sets its initialisation and data order
    device: str | None = None  # default: cuda if available, else cpu
    dtype: str | None = None  # default: bfloat16 on cuda, float32 on cpu
    report_to: list[str] | str = field(default_factory=list)  # also write metrics there: "tensorboard"
    # Days the fleet's audit log keeps entries (whole months are deleted once older); None: forever.
    # Providers and deployers of high-risk AI systems keep its logs at least six months (EU AI Act Art. 19(1), 26(6)).
    audit_keep_days: int | None = None
    parallel: ParallelSpec = field(default_factory=ParallelSpec)  # only read under torchrun

    def validate(self, where: str) -> None:
        if not self.adapters:
            raise ConfigError(f"{where}: adapters is empty; list at least one adapter")
        names = [adapter.name for adapter in self.adapters]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"{where}: adapter names must be unique, repeated: {', '.join(duplicates)}")
        if self.length_multiple < 1:
            raise ConfigError(f"{where}: length_multiple must be at least 1")
        if self.max_concurrent < 1:
            raise ConfigError(f"{where}: max_concurrent must be at least 1")
        if self.attention not in ATTENTION_KERNELS:
            known = ", ".join(k for k in ATTENTION_KERNELS if k)
            raise ConfigError(f"{where}: attention {self.attention!r} is not one of {known}")
        if self.quantize_base not in (None, "nf4"):
            raise ConfigError(
                f"{where}: quantize_base {self.quantize_base!r} is not supported; use nf4 or leave it out"
            )
        if self.memory_budget_gb is not None and self.memory_budget_gb <= 0:
            raise ConfigError(f"{where}: memory_budget_gb must be positive (or left out for the default)")
        if self.dtype not in (None, "float32", "bfloat16", "float16"):
            raise ConfigError(f"{where}: dtype {self.dtype!r} is not float32, bfloat16 or float16")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        unknown = sorted(set(self.report_to) - set(REPORT_TARGETS))
        if unknown:
            raise ConfigError(f"{where}: report_to {', '.join(unknown)} is not one of {', '.join(REPORT_TARGETS)}")
        if self.audit_keep_days is not None and self.audit_keep_days < 1:
            raise ConfigError(f"{where}: audit_keep_days must be at least 1 (or left out to keep every entry)")
        for index, adapter in enumerate(self.adapters):
            adapter.validate(f"{where}: adapters[{index}] ({adapter.name})")
        self.parallel.validate(f"{where}: parallel")
        if self.parallel.shard_base and self.quantize_base:
            raise ConfigError(f"{where}: parallel shard_base does not work with quantize_base yet; leave one out")


class UserYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers: PyYAML implements YAML 1.1, where a float
    needs a dot and a signed exponent, so `learning_rate: 1e-3` would arrive as the string '1e-3'.
    People write it and mean the number (as YAML 1.2, JSON and Python do)."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
UserYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
UserYamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?  # 1.  1.5  1.5e3  (YAML 1.1 needed e+3)
                |[0-9][0-9_]*[eE][-+]?[0-9]+                  # 1e-3  2E5      (a string in YAML 1.1)
                |\.[0-9_]+(?:[eE][-+]?[0-9]+)?                # .5
                |\.(?:inf|Inf|INF))$
           |^\.(?:nan|NaN|NAN)$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> object:
    """YAML (or JSON) text as lorafleet reads every file a user edits: safely, with YAML 1.2's numbers."""
    return yaml.load(text, Loader=UserYamlLoader)  # safe: a SafeLoader subclass


def read_yaml(path: Path, what: str) -> object:
    """A YAML (or JSON) file a user edits, or a ConfigError saying which file and why."""
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"cannot read the {what} {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"the {what} {path} is not UTF-8 text (byte {err.start}): save it as UTF-8") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML/JSON: {err}") from err
    except RecursionError as err:  # PyYAML builds nested collections by recursion
        raise ConfigError(f"the {what} {path} nests its lists and mappings too deep to read") from err


def load_fleet_spec(path: str | Path) -> FleetSpec:
    """Read and validate a fleet YAML; relative paths are taken from the YAML's directory."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"fleet spec {path} does not exist")
    try:
        raw = parse_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    spec = fleet_spec_from_dict(raw, str(path))
    resolve_paths(spec, path.resolve().parent)
    return spec


def resolve_paths(spec: FleetSpec, root: Path) -> None:
    """Make the spec's relative paths relative to `root` (the directory of the file that names them),
    and absolute: adapters record the base as a path any directory resolves."""
    spec.base = _resolve(root, spec.base)
    spec.output = _resolve(root, spec.output)
    for adapter in spec.adapters:
        adapter.data = _resolve(root, adapter.data)
        adapter.init_from = _resolve(root, adapter.init_from) if adapter.init_from else None
        adapter.eval_data = _resolve(root, adapter.eval_data) if adapter.eval_data else None


def fleet_spec_from_dict(raw: object, where: str = "fleet spec") -> FleetSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with base, output and adapters")
    adapters_raw = raw.get("adapters")
    if not isinstance(adapters_raw, list):
        raise ConfigError(f"{where}: 'adapters' must be a list of adapter mappings")
    adapters = [_build(AdapterSpec, item, f"{where}: adapters[{index}]") for index, item in enumerate(adapters_raw)]
    built = {**raw, "adapters": adapters}
    if "parallel" in raw:
        if not isinstance(raw["parallel"], dict):
            raise ConfigError(f"{where}: parallel must be a mapping, e.g. parallel: {{mode: data}}")
        built["parallel"] = _build(ParallelSpec, raw["parallel"], f"{where}: parallel")
    spec = _build(FleetSpec, built, where)
    spec.validate(where)
    return spec


def _resolve(root: Path, value: str) -> str:
    candidate = Path(value).expanduser()
    return str(candidate if candidate.is_absolute() else root / candidate)


def _build(cls: type, raw: object, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    where = f"{where} ({raw['name']})" if "name" in raw else where
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(fields)}"
            raise ConfigError(f"{where}: unknown field {key!r}{hint}")
    missing = [
        name
        for name, f in fields.items()
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required field {missing[0]!r}")
    values = {key: _coerce(value, hints[key], f"{where}: {key}") for key, value in raw.items()}
    return cls(**values)


def _coerce(value: object, hint: object, where: str) -> object:
    """Check `value` against a field's type; ints are accepted where floats are expected, and
    whole floats where ints are."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None:
            return None
        origin = typing.get_origin(option)
        if origin is list and isinstance(value, list):
            return value
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is int and isinstance(value, float) and value.is_integer():
            return int(value)  # `steps: 1e3` is a float to YAML, and a whole number to the reader
        if option in (str, bool) and isinstance(value, option):
            return value
        if option not in (int, float, str, bool, type(None)) and origin is None:
            return value  # nested specs, already built
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{where} must be {names}, got {value!r}")
