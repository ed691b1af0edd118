"""The `lorafleet` command: one entry point for every stage of the fleet."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from lorafleet import __version__
from lorafleet.errors import LorafleetError

EXAMPLES = """\
examples:
  lorafleet demo                          tiny model, three departments, trained together (CPU, ~1 min)
  lorafleet demo --out my-demo            keep everything in ./my-demo
  lorafleet demo --preference             then correct one department's adapter with DPO on preference pairs
  lorafleet train fleet.yaml              train every adapter listed in fleet.yaml together
  lorafleet train fleet.yaml --resume     continue an interrupted run from its last checkpoint
  torchrun --nproc-per-node 4 -m lorafleet train fleet.yaml   the fleet on 4 GPUs (parallel: adapter or data)
  lorafleet plan fleet.yaml --budget-gb 80   predicted peak memory; how many adapters like these fit
  lorafleet serve --fleet demo-out        OpenAI-compatible API on 127.0.0.1:8000 (base + adapters)
  lorafleet serve --fleet demo-out --keys keys.yaml --host 0.0.0.0    with tenants, keys and limits
  lorafleet keys new                      a fresh API key and the hash that goes in keys.yaml
  lorafleet compress --base demo-out/base --calib demo-out/data/marketing.jsonl --prune-mlp 0.5 --plan
                                          what pruning half the MLP would remove
  lorafleet compress --base demo-out/base --adapter demo-out/adapters/marketing --calib demo-out/data/marketing.jsonl
      --eval demo-out/data/marketing-test.jsonl --prune-mlp 0.5 --distil-steps 100 --quantize int4 --out small
                                          merged, pruned, distilled, int4 (GPTQ), compressed-tensors
  lorafleet eval --fleet demo-out --data demo-out/data/marketing-test.jsonl
                                          base and every adapter on the same held-out questions (or MMMU)
  lorafleet data check demo-out/data/marketing.jsonl demo-out/data/marketing-test.jsonl
                                          records, tokens, images, duplicates, train/test overlap, personal data
  lorafleet data redact raw.jsonl clean.jsonl    personal data replaced by <EMAIL_1>-style placeholders
  lorafleet data synth --docs handbook/ --out qa.jsonl --endpoint http://127.0.0.1:8000 --model base
                                          question-answer chats grounded in your own documents
  lorafleet cost --gpu-price 3.5 --gpus 2 --tokens-per-s 1700 --api-input-price 3 --api-output-price 15
                                          self-hosted cost per million tokens and break-even against the API
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    _quiet_libraries()
    try:
        return args.run(args)
    except LorafleetError as err:
        print(f"lorafleet: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "lorafleet: interrupted; `lorafleet train FLEET.yaml --resume` continues from the last checkpoint",
            file=sys.stderr,
        )
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafleet",
        description="Train, compress and serve a fleet of LoRA adapters on one frozen open model.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lorafleet {__version__}")
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser("demo", help="train three adapters together on the built-in tiny model")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="where to put everything (default: demo-out)")
    demo.add_argument("--steps", type=int, default=1000, help="optimizer steps per adapter (default: 1000)")
    demo.add_argument("--train-size", type=int, default=1024, help="training pictures per department (default: 1024)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument(
        "--preference",
        type=int,
        nargs="?",
        const=30,
        default=0,
        metavar="STEPS",
        help="then correct marketing's adapter with DPO on right/wrong colour pairs (default 30 steps)",
    )
    demo.set_defaults(command="demo", run=_run_demo)

    train = commands.add_parser(
        "train",
        help="train the adapters of a fleet YAML together",
        description="Train every adapter of FLEET.yaml together in one batched pass over the frozen base.",
    )
    train.add_argument("fleet", type=Path, help="fleet spec (YAML): base, output, adapters")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the output")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(command="train", run=_run_train)

    plan = commands.add_parser(
        "plan",
        help="predict a fleet's peak training memory and how many adapters fit",
        description="Read FLEET.yaml and its data (no weights are loaded) and predict peak memory per "
        "adapter, for the adapters trained together, and how many adapters like the largest fit the budget.",
    )
    plan.add_argument("fleet", type=Path, help="fleet spec (YAML)")
    plan.add_argument(
        "--budget-gb", type=float, help="memory to plan for (default: memory_budget_gb, or 90%% of this GPU)"
    )
    plan.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="compute dtype (default: what training would use: the spec's, else bfloat16 on a GPU, float32 on CPU)",
    )
    plan.set_defaults(command="plan", run=_run_plan)

    serve = commands.add_parser(
        "serve",
        help="serve the base and every adapter behind an OpenAI-compatible API",
        description="Serve a fleet directory (base/ and adapters/<name>/) with an OpenAI-compatible API.",
    )
    serve.add_argument("--fleet", type=Path, required=True, help="fleet directory, e.g. demo-out")
    serve.add_argument("--base", type=Path, help="base model directory (default: <fleet>/base)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--keys", type=Path, help="KEYS.yaml: tenants, their keys, adapters and limits")
    serve.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default: 32)")
    serve.add_argument(
        "--max-seq-len",
        type=int,
        default=4096,
        help="tokens per request, prompt and reply (default: 4096, at most the model's context); "
        "the KV cache holds this many for each of --max-batch rows, allocated at start",
    )
    serve.add_argument("--log-content", action="store_true", help="also store prompts and replies in the log")
    serve.add_argument(
        "--audit-key",
        type=Path,
        help="Ed25519 private key (lorafleet audit keygen): sign checkpoints of the audit log at start, "
        "every --audit-sign-every seconds and at shutdown",
    )
    serve.add_argument(
        "--audit-sign-every",
        type=float,
        default=3600,
        metavar="SECONDS",
        help="with --audit-key, seconds between signed checkpoints while requests come in (default: 3600)",
    )
    serve.add_argument(
        "--allow-image-dir",
        type=Path,
        action="append",
        default=[],
        help="directory file:// image URLs may come from (repeatable)",
    )
    serve.add_argument(
        "--allow-image-host",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="host (and port; default the scheme's) http(s) image URLs may come from (repeatable); "
        "redirects are never followed",
    )
    serve.add_argument("--max-images", type=int, default=8, help="images per request (default: 8)")
    serve.add_argument(
        "--max-tiles", type=int, help="image tiles for every model (default: as each adapter was trained)"
    )
    serve.add_argument("--max-body-mb", type=float, default=32, help="request body size limit, MiB (default: 32)")
    serve.add_argument(
        "--public-metrics", action="store_true", help="with --keys, serve /metrics without a key (default: key needed)"
    )
    serve.add_argument(
        "--engine",
        choices=["local", "vllm"],
        default="local",
        help="local: lorafleet's engine in this process; vllm: start vLLM with the fleet's adapters",
    )
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help="attach to a running vLLM (or other OpenAI-compatible server) instead of generating here",
    )
    serve.add_argument(
        "--vllm-python",
        type=Path,
        metavar="PATH",
        help="the python of the environment vLLM is installed in (it cannot share lorafleet's: it pins another "
        "transformers), e.g. ~/vllm-env/bin/python (default: a vllm executable on PATH, else this Python)",
    )
    serve.add_argument("--vllm-port", type=int, default=8100, help="port for the vLLM process (default: 8100)")
    serve.add_argument(
        "--vllm-max-loras",
        type=int,
        help="adapters vLLM holds on the GPU at once (default: the fleet's size, at most 8)",
    )
    serve.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an argument for `vllm serve`, after lorafleet's (repeatable; "
        "e.g. --vllm-arg=--gpu-memory-utilization=0.8)",
    )
    serve.set_defaults(command="serve", run=_run_serve)

    compress = commands.add_parser(
        "compress",
        help="prune, distil and quantize a base (optionally with an adapter merged in) into a smaller model",
        description="Minitron-style structured pruning of the language model, ranked on calibration data. "
        "Optionally distils the pruned student toward the original (forward KL on logits). "
        "--quantize stores the language model's Linear weights as int8, int4 (w4a16) or fp8 in the "
        "compressed-tensors format: vLLM serves it, and lorafleet's engine and trainer run on it.",
    )
    compress.add_argument("--base", type=Path, required=True, help="base model directory")
    compress.add_argument("--adapter", type=Path, help="PEFT adapter to merge before compressing")
    compress.add_argument("--out", type=Path, help="output model directory")
    compress.add_argument("--calib", type=Path, help="calibration JSONL (training-data layout)")
    compress.add_argument("--prune-mlp", type=float, default=0.0, help="fraction of MLP neurons to remove")
    compress.add_argument("--prune-heads", type=float, default=0.0, help="fraction of key/value head groups to remove")
    compress.add_argument("--prune-layers", type=int, default=0, help="number of decoder layers to remove")
    compress.add_argument("--distil-steps", type=int, default=0, help="distillation steps after pruning (0: none)")
    compress.add_argument("--distil-data", type=Path, help="distillation JSONL (default: the calibration data)")
    compress.add_argument("--distil-lr", type=float, default=1e-4, help="distillation learning rate")
    compress.add_argument(
        "--quantize",
        choices=["int8", "int4", "w4a16", "w8a16", "fp8"],
        help="weight-only quantization of the language model (int4 = w4a16: groups of 128; int8, fp8: per channel)",
    )
    compress.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="on-disk dtype of the weights that stay unquantized (default: bfloat16 with --quantize, else as loaded)",
    )
    compress.add_argument(
        "--rtn", action="store_true", help="round int8/int4 weights to nearest instead of GPTQ on the calibration data"
    )
    compress.add_argument("--eval", type=Path, help="held-out chat JSONL: exact-match accuracy after every stage")
    compress.add_argument("--plan", action="store_true", help="show what would be removed; write nothing")
    compress.add_argument(
        "--fleet", type=Path, help="register the output in this fleet (default: the fleet directory --out lies in)"
    )
    compress.set_defaults(command="compress", run=_run_compress)

    keys = commands.add_parser("keys", help="make API keys for KEYS.yaml (only their hashes go in the file)")
    keys.add_argument("action", choices=["new", "hash"], help="new: a fresh random key; hash: the hash of KEY")
    keys.add_argument("key", nargs="?", help="the key to hash")
    keys.set_defaults(command="keys", run=_run_keys)
    _add_cost_parser(commands)
    _add_eval_parser(commands)
    report = commands.add_parser(
        "report",
        help="one self-contained HTML page of a training run: curves, throughput, admission, evals",
        description="Draw a training run (the output directory of `lorafleet train`) as one HTML file with "
        "embedded plots: loss and learning rate per adapter, tokens/s, which adapters ran together, "
        "checkpoints and resumes, and the tables of any eval*.json written there by `lorafleet eval --json`.",
    )
    report.add_argument("run_dir", type=Path, help="the training output directory (holds metrics.jsonl)")
    report.add_argument("--out", type=Path, help="the HTML file to write (default: RUN_DIR/report.html)")
    report.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="draw each loss curve as TensorBoard's moving average with this weight (0 to <1, e.g. 0.9), "
        "the raw curve faint behind it (default: 0, raw)",
    )
    report.set_defaults(command="report", run=_run_report)
    _add_governance_parsers(commands)
    _add_data_parsers(commands)
    return parser


def _add_governance_parsers(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser(
        "audit",
        help="verify, export, sign or prune a fleet's hash-chained audit log",
        description="The audit log in DIR/audit/ records training, serving and administration, each entry "
        "holding the SHA-256 of the one before it.",
    )
    actions = audit.add_subparsers(title="actions", metavar="ACTION", required=True)
    verify = actions.add_parser("verify", help="check the chain; exit 1 naming the first bad entry")
    verify.add_argument("dir", type=Path, help="fleet directory (or its audit/ directory, or an exported file)")
    verify.add_argument("--public-key", type=Path, help="also check the signed checkpoints with this public key")
    verify.add_argument(
        "--checkpoints",
        type=Path,
        metavar="FILE",
        help="with --public-key, also check this copy of checkpoints.jsonl, kept where the fleet's host cannot write",
    )
    verify.set_defaults(run=_run_audit_verify)
    export = actions.add_parser("export", help="copy the entries of a time range to one JSONL file")
    export.add_argument("dir", type=Path, help="fleet directory")
    export.add_argument("--since", help="first time included (ISO 8601, UTC unless given, e.g. 2026-11-01)")
    export.add_argument("--until", help="first time excluded (ISO 8601)")
    export.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    export.set_defaults(run=_run_audit_export)
    keygen = actions.add_parser("keygen", help="a new Ed25519 key pair for signing checkpoints")
    keygen.add_argument("key", type=Path, help="private key file to create (the public key goes to KEY.pub)")
    keygen.set_defaults(run=_run_audit_keygen)
    sign = actions.add_parser("sign", help="sign the chain's newest entry (run periodically, e.g. from cron)")
    sign.add_argument("dir", type=Path, help="fleet directory")
    sign.add_argument("--key", type=Path, required=True, help="Ed25519 private key (lorafleet audit keygen)")
    sign.set_defaults(run=_run_audit_sign)
    prune = actions.add_parser(
        "prune",
        help="delete whole months of entries (and logged requests) older than the retention period",
        description="Providers and deployers of high-risk AI systems keep the logs it generates at least six "
        "months (EU AI Act Art. 19(1), 26(6)). Each deletion is recorded in the log, with who and when.",
    )
    prune.add_argument("dir", type=Path, help="fleet directory")
    prune.add_argument(
        "--keep-days",
        type=int,
        help="keep entries this many days, at least the stored retention "
        "(default: the fleet config's audit_keep_days, as stored in DIR/audit/)",
    )
    prune.add_argument("--key", type=Path, help="Ed25519 private key: sign a checkpoint after pruning")
    prune.set_defaults(run=_run_audit_prune)
    audit.set_defaults(command="audit")

    registry = commands.add_parser(
        "registry",
        help="what made each adapter and model: data and base hashes, configs, losses, parents, children",
        description="Read the lineage registry (lorafleet.sqlite) of one or more fleet directories.",
    )
    actions = registry.add_subparsers(title="actions", metavar="ACTION", required=True)
    for name, helptext, names in (
        ("list", "every adapter and model registered", []),
        ("show", "one record: base, data, configs, loss, compute, parents and children", ["name"]),
        ("diff", "the fields in which two records differ", ["a", "b"]),
    ):
        action = actions.add_parser(name, help=helptext)
        for positional in names:
            action.add_argument(positional, help="a name, or the start of an id (8 characters or more)")
        action.add_argument(
            "--fleet",
            type=Path,
            action="append",
            required=True,
            help="fleet directory; repeat to look in several (children are found in every one)",
        )
        action.add_argument("--json", action="store_true", help="print JSON")
        action.set_defaults(run=_run_registry, action=name)
    registry.set_defaults(command="registry")

    docs = commands.add_parser(
        "docs",
        help="draft a model card (README.md) and EU AI Act Annex IV documentation for an adapter",
        description="Write README.md (a Hugging Face model card) and annex-iv.md into the adapter's directory, "
        "filled from the registry and the audit log; what only the provider can answer is marked "
        "PROVIDER MUST COMPLETE.",
    )
    docs.add_argument("name", help="adapter or model name (or the start of its id)")
    docs.add_argument(
        "--fleet", type=Path, action="append", required=True, help="fleet directory (repeat to look in several)"
    )
    docs.set_defaults(command="docs", run=_run_docs)


def _add_data_parsers(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="check, redact, deduplicate or synthesise chat JSONL training data")
    actions = data.add_subparsers(title="actions", metavar="ACTION", required=True)
    check = actions.add_parser(
        "check",
        help="records, tokens, images, malformed records, duplicates, overlap between files, personal data",
        description="Give a training file first and its held-out file after it to see records that leak between "
        "them. Exit status 1 when a file or record cannot be read.",
    )
    check.add_argument("files", nargs="+", type=Path, metavar="FILE", help="chat JSONL files")
    check.add_argument("--base", type=Path, help="count tokens and tiles with this model's tokenizer (default: tiny)")
    check.add_argument("--max-tiles", type=int, help="tiles per image as training would use (default: the model's)")
    check.add_argument("--max-seq-len", type=int, default=4096, help="a longer record is an error, as in training")
    check.add_argument("--threshold", type=float, default=0.8, help="near-duplicate Jaccard over 3-word shingles")
    check.add_argument("--patterns", type=Path, help="national-ID patterns and phone regions (YAML/JSON)")
    check.add_argument("--json", type=Path, help="also write the report as JSON here")
    check.add_argument("--histogram", type=Path, help="also draw tokens per record as a PNG here")
    check.add_argument("--fleet", type=Path, help="record the check (counts, file hashes) in DIR's audit log")
    check.add_argument("--no-progress", action="store_true", help="no progress bar")
    check.set_defaults(command="data", run=_run_data_check)
    redact = actions.add_parser("redact", help="replace personal data with placeholders; strip image metadata")
    redact.add_argument("input", type=Path, metavar="IN", help="chat JSONL to read (never modified)")
    redact.add_argument("out", type=Path, metavar="OUT", help="redacted JSONL to write (images go to OUT-images/)")
    redact.add_argument("--dry-run", action="store_true", help="count what would be replaced; write nothing")
    redact.add_argument("--patterns", type=Path, help="national-ID patterns and phone regions (YAML/JSON)")
    redact.add_argument(
        "--ner-model",
        type=Path,
        help="spaCy pipeline directory: also replace organisations, places and the names of people it finds",
    )
    redact.add_argument("--json", type=Path, help="also write the counts as JSON here")
    redact.add_argument("--fleet", type=Path, help="record the redaction (counts, file hashes) in DIR's audit log")
    redact.add_argument("--no-progress", action="store_true", help="no progress bar")
    redact.set_defaults(command="data", run=_run_data_redact)
    dedup = actions.add_parser("dedup", help="drop exact and near-duplicate records, keeping the first")
    dedup.add_argument("input", type=Path, metavar="IN", help="chat JSONL to read (never modified)")
    dedup.add_argument("out", type=Path, metavar="OUT", help="JSONL to write without the duplicates")
    dedup.add_argument(
        "--threshold",
        type=float,
        default=0.8,
        help="drop a record whose 3-word-shingle Jaccard with an earlier one is at least this (0.8)",
    )
    dedup.add_argument("--fleet", type=Path, help="record the dedup (counts, file hashes) in DIR's audit log")
    dedup.add_argument("--no-progress", action="store_true", help="no progress bar")
    dedup.set_defaults(command="data", run=_run_data_dedup)
    synth = actions.add_parser("synth", help="question-answer chats grounded in your documents (txt, md, pdf)")
    synth.add_argument("--docs", type=Path, required=True, help="directory of .txt, .md and .pdf documents")
    synth.add_argument("--out", type=Path, required=True, help="chat JSONL to write (appended to when resuming)")
    source = synth.add_mutually_exclusive_group(required=True)
    source.add_argument("--endpoint", help="OpenAI-compatible server, e.g. http://127.0.0.1:8000 (lorafleet serve)")
    source.add_argument("--extractive", action="store_true", help="no model: questions from sentences, answers copied")
    synth.add_argument("--model", help="model or adapter name at --endpoint (e.g. base)")
    synth.add_argument(
        "--api-key",
        default=os.environ.get("LORAFLEET_API_KEY"),
        help="key for --endpoint (default: $LORAFLEET_API_KEY)",
    )
    synth.add_argument("--max-tokens", type=int, default=512, help="tokens per generated reply (512)")
    synth.add_argument("--prompts", type=Path, help="prompt template YAML (default: the shipped synth_prompts.yaml)")
    synth.add_argument("--patterns", type=Path, help="national-ID patterns and phone regions (YAML/JSON)")
    synth.add_argument("--chunk-words", type=int, default=220, help="words per chunk at most (220)")
    synth.add_argument(
        "--min-support",
        type=float,
        default=0.6,
        help="share of an answer's content words that must occur in its chunk (0.6)",
    )
    synth.add_argument("--json", type=Path, help="also write the counts (kept, dropped by reason) as JSON here")
    synth.add_argument("--fleet", type=Path, help="record the run (documents and output by hash) in DIR's audit log")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(command="data", run=_run_data_synth)
    data.set_defaults(command="data")


def _add_eval_parser(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="the base and each adapter on the same held-out questions (chat JSONL or MMMU format)",
        description="Decode a held-out file with the base and each adapter, batched together by lorafleet's "
        "engine, and score them: exact match and token F1 for chat JSONL, MMMU's rules for MMMU-format "
        "JSONL or Parquet (id, question, options, answer, image_1..image_7).",
    )
    evaluate.add_argument("--fleet", type=Path, required=True, help="fleet directory (base/ and adapters/<name>/)")
    evaluate.add_argument("--data", type=Path, required=True, help="held-out JSONL (chat or MMMU) or MMMU Parquet")
    evaluate.add_argument("--adapters", help="comma-separated adapters to evaluate (default: all)")
    evaluate.add_argument("--base", type=Path, help="base model directory (default: <fleet>/base)")
    evaluate.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (default: 64)")
    evaluate.add_argument("--max-batch", type=int, default=32, help="answers decoded together (default: 32)")
    evaluate.add_argument("--json", type=Path, help="also write the scores and every answer as JSON here")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(command="eval", run=_run_eval)


def _add_cost_parser(commands: argparse._SubParsersAction) -> None:
    cost = commands.add_parser(
        "cost",
        help="self-hosting vs an API: cost per million tokens and break-even, from measured throughput",
        description="Cost per million tokens of serving on your own GPUs, and the volume at which that beats an "
        "API, from a measured output throughput (tokens/s, end to end, prefill included).",
    )
    node = cost.add_mutually_exclusive_group(required=True)
    node.add_argument("--gpu-price", type=float, help="USD per GPU-hour (times --gpus and 730 hours a month)")
    node.add_argument("--monthly", type=float, help="USD a month for the whole node")
    cost.add_argument("--gpus", type=int, default=1, help="GPUs in the node (default: 1)")
    speed = cost.add_mutually_exclusive_group(required=True)
    speed.add_argument("--tokens-per-s", type=float, help="output tokens/s the node serves at full load")
    speed.add_argument("--benchmark", type=Path, help="a benchmarks/*.json result to read tokens/s from")
    speed.add_argument("--metrics-url", help="a running server's /metrics: its current output tokens/s")
    cost.add_argument(
        "--benchmark-key", default="lorafleet_engine_tok_s", help="tokens/s field of --benchmark (dotted for nested)"
    )
    cost.add_argument("--sample-seconds", type=float, default=10.0, help="--metrics-url: seconds between scrapes")
    cost.add_argument("--utilisation", type=float, default=0.5, help="fraction of the time at full load (0.5)")
    cost.add_argument("--api-input-price", type=float, required=True, help="USD per million input tokens")
    cost.add_argument("--api-output-price", type=float, required=True, help="USD per million output tokens")
    cost.add_argument(
        "--input-per-output", type=float, default=3.0, help="input tokens per output token in your traffic (3)"
    )
    cost.add_argument("--json", action="store_true", help="print JSON instead of the table")
    cost.set_defaults(command="cost", run=_run_cost)


def _run_demo(args: argparse.Namespace) -> int:
    from lorafleet.demo.run import run_demo

    rows = run_demo(
        args.out,
        train_size=args.train_size,
        steps=args.steps,
        progress=not args.no_progress,
        log=print,
        preference_steps=args.preference,
    )
    return 0 if all(row.adapter_accuracy > row.base_accuracy for row in rows) else 1


def _run_train(args: argparse.Namespace) -> int:
    from lorafleet.config import load_fleet_spec
    from lorafleet.report import write_report
    from lorafleet.train.distributed import is_main_process
    from lorafleet.train.trainer import train_fleet

    spec = load_fleet_spec(args.fleet)
    result = train_fleet(spec, resume=args.resume, progress=not args.no_progress)
    if not is_main_process():  # under torchrun, process 0 reports for the whole fleet
        return 0
    for name, directory in result.adapters.items():
        losses = result.losses.get(name, [])
        last = f"final loss {losses[-1]:.4f}" if losses else ""
        print(f"{name}: {directory} {last}")
    for name, problems in result.skipped.items():
        print(f"{name}: skipped {len(problems)} bad records; first: {problems[0]}", file=sys.stderr)
    print(f"report: {write_report(spec.output)}")
    return 0


def _run_plan(args: argparse.Namespace) -> int:
    import torch

    from lorafleet.config import load_fleet_spec
    from lorafleet.train.plan import format_plan, plan_fleet

    spec = load_fleet_spec(args.fleet)
    fleet_plan = plan_fleet(spec, args.budget_gb, getattr(torch, args.dtype) if args.dtype else None)
    print(format_plan(fleet_plan, spec))
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from lorafleet.serve.gateway.images import ImagePolicy
    from lorafleet.serve.gateway.run import serve
    from lorafleet.serve.gateway.server import ServeOptions
    from lorafleet.serve.gateway.tenants import load_tenants

    options = ServeOptions(
        fleet_dir=args.fleet,
        base_dir=args.base,
        tenants=load_tenants(args.keys) if args.keys else None,
        image_policy=ImagePolicy(allowed_dirs=list(args.allow_image_dir), allowed_hosts=list(args.allow_image_host)),
        log_content=args.log_content,
        max_batch=args.max_batch,
        max_seq_len=args.max_seq_len,
        max_images=args.max_images,
        max_tiles=args.max_tiles,
        max_body_bytes=int(args.max_body_mb * 2**20),
        public_metrics=args.public_metrics,
        engine=args.engine,
        upstream_url=args.upstream,
        vllm_port=args.vllm_port,
        vllm_args=list(args.vllm_arg),
        vllm_gpu_slots=args.vllm_max_loras,
        vllm_python=args.vllm_python.expanduser() if args.vllm_python else None,
        audit_key=args.audit_key,
        audit_sign_every_s=args.audit_sign_every,
    )
    serve(options, args.host, args.port, log=lambda message: print(message, file=sys.stderr))
    return 0


def _run_compress(args: argparse.Namespace) -> int:
    import torch

    from lorafleet.compress.distil import DistilOptions
    from lorafleet.compress.prune import PruneRequest
    from lorafleet.compress.run import CompressOptions, compress
    from lorafleet.serve.engine.speed import decode_speed

    request = PruneRequest(mlp=args.prune_mlp, heads=args.prune_heads, layers=args.prune_layers)
    distillation = DistilOptions(
        steps=args.distil_steps,
        learning_rate=args.distil_lr,
        checkpoint=args.out / "distil-checkpoint.pt" if args.out else None,
    )
    compress(
        CompressOptions(
            args.base,
            args.out,
            args.adapter,
            args.calib,
            request,
            plan_only=args.plan,
            distil_data=args.distil_data,
            distil=distillation,
            quantize=args.quantize,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            eval_data=args.eval,
            gptq=not args.rtn,
            fleet=args.fleet,
        ),
        log=print,
        decode_speed=decode_speed,
    )
    return 0


def _run_keys(args: argparse.Namespace) -> int:
    import secrets

    from lorafleet.errors import ConfigError
    from lorafleet.serve.gateway.tenants import hash_key

    if args.action == "hash" and not args.key:
        raise ConfigError("lorafleet keys hash needs the KEY to hash")
    key = args.key if args.action == "hash" else "sk-lf-" + secrets.token_urlsafe(32)
    if args.action == "new":
        print(f"key:        {key}   (give this to the tenant; it is not stored)")
    print(f"key_sha256: {hash_key(key)}")
    return 0


def _run_report(args: argparse.Namespace) -> int:
    from lorafleet.report import write_report

    print(write_report(args.run_dir, args.out, smoothing=args.smooth))
    return 0


def _run_eval(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from lorafleet.eval.preference import evaluate_preferences, format_scores, is_preference_file
    from lorafleet.eval.run import EvalOptions, evaluate, format_report

    adapters = [name.strip() for name in args.adapters.split(",") if name.strip()] if args.adapters else None
    options = EvalOptions(args.fleet, args.data, adapters, args.base, args.max_tokens, args.max_batch)
    if args.data.exists() and is_preference_file(args.data):  # pairs: which answer each model prefers
        scores = evaluate_preferences(options, progress=not args.no_progress)
        print(format_scores(scores))
        if args.json:
            result = {"format": "preference", "data": str(args.data)} | asdict(scores)
            args.json.write_text(json.dumps(result, indent=2))
            print(f"scores in {args.json}")
        return 0
    report = evaluate(options, progress=not args.no_progress)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
        print(f"scores and answers in {args.json}")
    return 0


def _run_cost(args: argparse.Namespace) -> int:
    import json

    from lorafleet import cost

    if args.metrics_url:
        load = cost.measure_metrics(args.metrics_url, args.sample_seconds)
        tokens_per_s = load.output_tokens_per_s
        print(
            f"measured over {load.seconds:.1f} s: {load.output_tokens_per_s:,.1f} output and "
            f"{load.input_tokens_per_s:,.1f} input tokens/s (the current load, not the capacity)",
            file=sys.stderr,
        )
    elif args.benchmark:
        tokens_per_s = cost.tokens_per_s_from_benchmark(args.benchmark, args.benchmark_key)
    else:
        tokens_per_s = args.tokens_per_s
    node = args.monthly if args.monthly is not None else cost.monthly_cost(args.gpu_price, args.gpus)
    inputs = cost.CostInputs(
        node, tokens_per_s, args.utilisation, args.api_input_price, args.api_output_price, args.input_per_output
    )
    report = cost.estimate(inputs)
    print(json.dumps(report.to_json(), indent=2) if args.json else cost.format_report(report))
    return 0


def _run_data_check(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from lorafleet.data.check import check_files, counting_base, format_report, write_histogram
    from lorafleet.data.pii import PiiDetector, load_patterns

    base, tokenizer = counting_base(args.base)
    report = check_files(
        args.files,
        base,
        tokenizer,
        PiiDetector(load_patterns(args.patterns)),
        args.threshold,
        args.max_tiles,
        progress=lambda lines, name: tqdm(lines, desc=name, unit="record", disable=args.no_progress),
        max_seq_len=args.max_seq_len,
    )
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
        print(f"report in {args.json}")
    if args.histogram:
        print(f"histogram in {write_histogram(report, args.histogram)}")
    _audit_data_event(args.fleet, "data.check", report.audit_summary())
    return 1 if report.errors else 0


def _run_data_redact(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from lorafleet.data.pii import EntityRecognizer, PiiDetector, load_patterns
    from lorafleet.data.redact import redact_file

    ner = EntityRecognizer(args.ner_model) if args.ner_model else None
    detector = PiiDetector(load_patterns(args.patterns), ner)
    report = redact_file(
        args.input,
        args.out,
        detector,
        args.dry_run,
        progress=lambda lines: tqdm(lines, desc="redact", unit="record", disable=args.no_progress),
    )
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
    if not args.dry_run:
        _audit_data_event(args.fleet, "data.redact", report.audit_summary())
    return 0


def _audit_data_event(fleet: Path | None, event: str, summary: dict) -> None:
    if fleet is None:
        return
    from lorafleet.governance.audit import AuditLog

    entry = AuditLog(fleet).append(event, summary)
    print(f"recorded in {fleet}'s audit log as {event} (seq {entry['seq']})")


def _run_data_dedup(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lorafleet.data.dedup import audit_summary, dedup_file

    kept, dropped = dedup_file(
        args.input,
        args.out,
        args.threshold,
        progress=lambda lines: tqdm(lines, desc="dedup", unit="record", disable=args.no_progress),
    )
    for item in dropped:
        similarity = f" (Jaccard {item.similarity:.2f})" if item.kind == "near" else ""
        print(f"dropped {item.source}: {item.kind} duplicate of {item.duplicate_of}{similarity}")
    print(f"kept {kept}, dropped {len(dropped)} -> {args.out}")
    _audit_data_event(args.fleet, "data.dedup", audit_summary(args.input, args.out, args.threshold, kept, dropped))
    return 0


def _run_data_synth(args: argparse.Namespace) -> int:
    import json

    from tqdm import tqdm

    from lorafleet.data.pii import PiiDetector, load_patterns
    from lorafleet.data.synth import EXTRACTIVE, OpenAIGenerator, SynthOptions, load_prompts, synthesise
    from lorafleet.errors import ConfigError

    if args.endpoint and not args.model:
        raise ConfigError("--endpoint needs --model: the model or adapter to ask (e.g. base)")
    generator = OpenAIGenerator(args.endpoint, args.model, args.api_key, args.max_tokens) if args.endpoint else None
    options = SynthOptions(
        args.docs,
        args.out,
        generator,
        args.model if generator else EXTRACTIVE,
        load_prompts(args.prompts),
        args.chunk_words,
        args.min_support,
    )
    progress = lambda chunks: tqdm(chunks, desc="synth", unit="chunk", disable=args.no_progress)  # noqa: E731
    report = synthesise(options, PiiDetector(load_patterns(args.patterns)), progress)
    for reason in report.skipped:
        print(f"lorafleet: warning: {reason}", file=sys.stderr)
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
    _audit_data_event(args.fleet, "data.synth", report.audit_summary(options))
    return 0


def _run_audit_verify(args: argparse.Namespace) -> int:
    from lorafleet.errors import AuditError, ConfigError
    from lorafleet.governance.audit import verify_chain
    from lorafleet.governance.retention import describe_retention
    from lorafleet.governance.signing import load_public_key, verify_checkpoints

    if args.checkpoints and not args.public_key:
        raise ConfigError("--checkpoints needs --public-key: the copy is checked by its signatures")
    key = load_public_key(args.public_key) if args.public_key else None  # a bad key file is a usage error
    try:
        report = verify_chain(args.dir)
        signed = verify_checkpoints(args.dir, key, report, args.checkpoints) if key else None
    except AuditError as err:
        print(f"lorafleet: audit log NOT valid: {err}", file=sys.stderr)
        return 1
    print(f"audit log valid: {report.entries} entries, seq {report.first_seq}..{report.last_seq}")
    for line in describe_retention(report):
        print(line)
    if signed is not None:
        print(f"signed checkpoints: {signed.checked} verified, {signed.before_retention} before retention")
    return 0


def _run_audit_export(args: argparse.Namespace) -> int:
    from lorafleet.governance.audit import export_entries

    count = export_entries(args.dir, args.out, args.since, args.until)
    print(f"{count} entries written to {args.out}")
    return 0


def _run_audit_keygen(args: argparse.Namespace) -> int:
    from lorafleet.governance.signing import generate_key

    public = generate_key(args.key)
    print(f"private key: {args.key}   (keep it off the fleet's host)\npublic key:  {public}")
    return 0


def _run_audit_sign(args: argparse.Namespace) -> int:
    from lorafleet.governance.signing import load_private_key, sign_checkpoint

    checkpoint = sign_checkpoint(args.dir, load_private_key(args.key))
    print(f"signed entry seq {checkpoint['seq']} ({checkpoint['hash'][:16]}...)")
    return 0


def _run_audit_prune(args: argparse.Namespace) -> int:
    from lorafleet.errors import AuditError
    from lorafleet.governance.retention import check_keep_days, prune, retention_days
    from lorafleet.governance.signing import load_private_key, sign_checkpoint
    from lorafleet.serve.gateway.request_log import apply_request_retention

    keep_days = args.keep_days if args.keep_days is not None else retention_days(args.dir)
    if keep_days is None:
        raise AuditError(f"{args.dir}: no retention period stored; pass --keep-days or set audit_keep_days")
    warning = check_keep_days(keep_days, "--keep-days" if args.keep_days is not None else "audit_keep_days")
    if warning:
        print(f"lorafleet: warning: {warning}", file=sys.stderr)
    key = load_private_key(args.key) if args.key else None
    deleted = prune(args.dir, keep_days, via="lorafleet audit prune")
    rows = apply_request_retention(args.dir, keep_days, via="lorafleet audit prune")
    print(f"deleted {len(deleted)} monthly segments: {', '.join(p.name for p in deleted) or 'none'}")
    print(f"deleted {rows} logged requests older than {keep_days} days")
    if key is not None:
        checkpoint = sign_checkpoint(args.dir, key)
        print(f"signed entry seq {checkpoint['seq']} ({checkpoint['hash'][:16]}...)")
    return 0


def _run_registry(args: argparse.Namespace) -> int:
    import json

    from lorafleet.governance import registry as lineage_registry

    registries = [lineage_registry.Registry.open(fleet) for fleet in args.fleet]
    if args.action == "list":
        records = [lineage for registry in registries for lineage in registry.all()]
        print(
            json.dumps([r.to_dict() for r in records], indent=2)
            if args.json
            else lineage_registry.format_table(records)
        )
    elif args.action == "show":
        lineage, _ = lineage_registry.find_in(registries, args.name)
        children = lineage_registry.children_in(registries, lineage)
        if args.json:
            links = [{"relation": relation, "name": name, "id": child} for relation, name, child in children]
            print(json.dumps(lineage.to_dict() | {"children": links}, indent=2))
        else:
            print(lineage_registry.format_record(lineage, children))
    else:
        (a, _), (b, _) = lineage_registry.find_in(registries, args.a), lineage_registry.find_in(registries, args.b)
        changed = lineage_registry.diff(a, b)
        if args.json:
            print(json.dumps([{"field": key, "a": x, "b": y} for key, x, y in changed], indent=2))
        else:
            print(f"{len(changed)} fields differ between {a.name} ({a.id[:12]}) and {b.name} ({b.id[:12]})")
            for key, x, y in changed:
                print(f"  {key}: {x!r} -> {y!r}")
    return 0


def _run_docs(args: argparse.Namespace) -> int:
    from lorafleet.governance.documents import PROVIDER_MUST_COMPLETE, write_documents
    from lorafleet.governance.registry import Registry, find_in

    registries = [Registry.open(fleet) for fleet in args.fleet]
    lineage, registry = find_in(registries, args.name)
    documents = write_documents(lineage, registries, registry.fleet_dir)
    todo = documents.annex.read_text().count(PROVIDER_MUST_COMPLETE)
    print(f"model card: {documents.card}")
    print(f"Annex IV draft: {documents.annex} ({todo} places marked PROVIDER MUST COMPLETE)")
    if documents.audit_problem:
        print(
            f"lorafleet: the fleet's audit log does NOT verify, and the drafts say so: {documents.audit_problem}",
            file=sys.stderr,
        )
        return 1
    return 0


def _quiet_libraries() -> None:
    """Our progress bars and messages only: silence transformers' per-file bars and notices."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


if __name__ == "__main__":
    sys.exit(main())
