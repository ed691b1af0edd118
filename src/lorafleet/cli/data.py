"""`lorafleet data`: check, redact, deduplicate or synthesise chat JSONL training data; find and
forget one person across a fleet (its data, adapters, request log), retraining what learned."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_data_parsers(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser(
        "data", help="check, redact, deduplicate or synthesise training data; find or forget one person in a fleet"
    )
    actions = data.add_subparsers(title="actions", metavar="ACTION", required=True)
    for add_action in (_add_check, _add_redact, _add_dedup, _add_synth, _add_find, _add_forget):
        add_action(actions)
    data.set_defaults(command="data")


def _add_check(actions: argparse._SubParsersAction) -> None:
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


def _add_redact(actions: argparse._SubParsersAction) -> None:
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


def _add_dedup(actions: argparse._SubParsersAction) -> None:
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


def _add_synth(actions: argparse._SubParsersAction) -> None:
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


def _add_person_arguments(action: argparse.ArgumentParser) -> None:
    action.add_argument("--fleet", type=Path, required=True, help="fleet directory (its registry names the data)")
    action.add_argument(
        "--person",
        type=Path,
        required=True,
        help="YAML/JSON file listing the person's names, emails, phones, ibans and ids (README: "
        "'A person asks to be forgotten'); keep it outside the fleet",
    )
    action.add_argument("--patterns", type=Path, help="phone regions and national-ID patterns (YAML/JSON)")
    action.add_argument(
        "--json", type=Path, help="also write the report as JSON here (places and kinds, no identifiers)"
    )


def _add_find(actions: argparse._SubParsersAction) -> None:
    find = actions.add_parser(
        "find",
        help="where a person's identifiers are: data records, adapters that learned them, logged requests",
        description="Every record (file:line) of every training and held-out file the fleet's registry knows that "
        "holds one of the person's identifiers, every adapter or model whose lineage names such a file (and "
        "everything made from one), every logged request, audit entry and checkpoint that holds them. Recorded "
        "in the audit log by hash. Exit status 1 when anything is found.",
    )
    _add_person_arguments(find)
    find.set_defaults(command="data", run=_run_data_find)


def _run_data_find(args: argparse.Namespace) -> int:
    from lorafleet.governance.audit import AuditLog

    report, _ = _find(args)
    print(report.format_text())
    entry = AuditLog(args.fleet).append("data.find", report.audit_summary())
    print(f"recorded in {args.fleet}'s audit log as data.find (seq {entry['seq']}), by hash only")
    return 0 if report.empty else 1


def _find(args: argparse.Namespace):
    import json

    from lorafleet.data.erasure import find_person
    from lorafleet.data.person import PersonMatcher, load_person
    from lorafleet.data.pii import PiiDetector, load_patterns

    detector = PiiDetector(load_patterns(args.patterns))
    matcher = PersonMatcher(load_person(args.person, detector.patterns.phone_regions), detector)
    report = find_person(args.fleet, matcher)
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=2))
    return report, matcher


def _add_forget(actions: argparse._SubParsersAction) -> None:
    forget = actions.add_parser(
        "forget",
        help="remove a person's records, redact the request log, withdraw and retrain what learned from them",
        description="Rewrites each data file without the person's records (atomically; lineage keeps the old "
        "hashes), redacts the request log, withdraws every adapter and model that learned from the records (serve "
        "refuses them unless forced), deletes checkpoints holding them and writes a fleet file that retrains "
        "exactly those adapters with their recorded configs and seeds (DIR/erasures/ID/retrain.yaml). With "
        "--retrain it trains them together and puts the new versions in place, children of the old ones.",
    )
    _add_person_arguments(forget)
    forget.add_argument(
        "--retrain",
        action="store_true",
        help="train the affected adapters again now (also finishes an earlier forget of the same person)",
    )
    forget.add_argument("--no-progress", action="store_true", help="no progress bars while retraining")
    forget.set_defaults(command="data", run=_run_data_forget)


def _run_data_forget(args: argparse.Namespace) -> int:
    from lorafleet.data.forget import forget_person, pending_plans

    report, matcher = _find(args)
    if report.empty:
        print("found nothing of the person in the fleet")
    else:
        print(forget_person(args.fleet, report, matcher).summary())
    plans = pending_plans(args.fleet, report.person_sha256)
    if not args.retrain:
        for plan in plans:
            print(f"retrain with: lorafleet data forget --fleet {args.fleet} --person {args.person} --retrain ({plan})")
        return 0
    for plan in plans:
        _retrain(args, plan)
    return 0


def _retrain(args: argparse.Namespace, plan) -> None:
    from lorafleet.config import load_fleet_spec
    from lorafleet.data.forget import adopt_retrained, retrain_runs
    from lorafleet.train.trainer import train_fleet

    for run in retrain_runs(plan):
        print(f"retraining {', '.join(run.adapters)} together ({run.fleet_file})")
        train_fleet(load_fleet_spec(run.fleet_file), progress=not args.no_progress)
    for lineage in adopt_retrained(args.fleet, plan):
        print(f"{lineage.name}: new version {lineage.id[:12]} in place, child of {lineage.parents[-1]['id'][:12]}")


def _audit_data_event(fleet: Path | None, event: str, summary: dict) -> None:
    if fleet is None:
        return
    from lorafleet.governance.audit import AuditLog

    entry = AuditLog(fleet).append(event, summary)
    print(f"recorded in {fleet}'s audit log as {event} (seq {entry['seq']})")
