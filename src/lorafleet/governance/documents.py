"""Documents drafted from the registry: a Hugging Face model card and an EU AI Act Annex IV draft.

`README.md` (written into the adapter's directory) is a model card whose YAML metadata the Hub
and `huggingface_hub.ModelCard` read: base_model, library_name peft, the training data by
SHA-256, the metrics and evaluation results, and for an adapter a sweep chose (`lorafleet sweep`)
how it was chosen: its department's space, every trial and why the winner won (and, retrained on
all the data, that its held-out number no longer is one). `annex-iv.md` follows the
nine points of Annex IV (Regulation (EU) 2024/1689, technical documentation, Art. 11(1)) in the
Official Journal's order. It fills in what the registry and the audit log know (software,
hardware, training method, data and the checks logged for those exact files, compute, metrics,
how the fleet was served, the change log) and marks every answer only the provider can give with
"PROVIDER MUST COMPLETE", so an unfinished draft is plain to see and easy to search for. Nothing
is claimed that the records do not show: a log that fails verification is said to, in the draft
and by `lorafleet docs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from lorafleet.errors import RegistryError
from lorafleet.governance.lineage import Lineage, base_model_name
from lorafleet.governance.log_facts import (
    LogFacts,
    data_checks,
    read_log_facts,
    security_measures,
    verification_line,
)
from lorafleet.governance.registry import Registry, children_in

PROVIDER_MUST_COMPLETE = "**PROVIDER MUST COMPLETE:**"
CARD_FILE = "README.md"
ANNEX_FILE = "annex-iv.md"


@dataclass
class Documents:
    card: Path
    annex: Path
    audit_problem: str | None  # why the fleet's audit log fails verification (the draft says so too)


def write_documents(lineage: Lineage, registries: list[Registry], fleet_dir: Path) -> Documents:
    """Write the model card and the Annex IV draft into the adapter's (or model's) directory, as
    the registry of `fleet_dir` places it (inside that fleet, wherever it was copied or moved)."""
    directory = Path(lineage.directory)
    if not directory.is_dir():
        raise RegistryError(
            f"{directory}, where the registry of {fleet_dir} places {lineage.name!r}, is not a directory; "
            "pass the fleet directory that holds the adapter (`--fleet`)"
        )
    children = children_in(registries, lineage)
    facts = read_log_facts(fleet_dir, lineage)
    card = directory / CARD_FILE
    card.write_text(model_card(lineage))
    annex = directory / ANNEX_FILE
    annex.write_text(annex_iv(lineage, children, facts))
    return Documents(card, annex, facts.problem)


# --- the model card -----------------------------------------------------------------------------


def card_metadata(lineage: Lineage):
    from huggingface_hub import EvalResult, ModelCardData

    results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=f"sha256:{scores['data_sha256']}",
            dataset_name=scores.get("data", data_key),
            metric_type=metric,
            metric_value=scores[metric],
        )
        for data_key, scores in lineage.evaluation.items()
        for metric in ("accuracy", "token_f1")
        if metric in scores
    ]
    return ModelCardData(
        base_model=base_name(lineage),
        library_name="peft" if lineage.kind == "adapter" else "transformers",
        datasets=[f"sha256:{data.sha256}" for data in lineage.data],
        metrics=sorted({result.metric_type for result in results}) or None,
        tags=["lorafleet", "lora", "peft"] if lineage.kind == "adapter" else ["lorafleet", "compressed"],
        model_name=lineage.name,
        eval_results=results or None,
    )


def model_card(lineage: Lineage) -> str:
    from huggingface_hub import ModelCard

    what = _what(lineage)
    body = "\n\n".join(
        [
            f"# {lineage.name}",
            f"{what[0].upper()}{what[1:]}; lineage id `{lineage.id}`. "
            "Everything below is drawn from the fleet's registry (`lorafleet registry show`); "
            f"the technical documentation draft is in `{ANNEX_FILE}`.",
            "## Intended use\n\n"
            + f"{PROVIDER_MUST_COMPLETE} who may use it, for what, and what it must not be used for.",
            "## Training data\n\n" + _data_table(lineage),
            "## Training procedure\n\n" + _procedure(lineage),
            *(["## How it was chosen\n\n" + _sweep(lineage.sweep)] if lineage.sweep else []),
            "## Results\n\n" + _results(lineage),
            "## Use\n\n```python\nfrom peft import PeftModel\nmodel = PeftModel.from_pretrained(base_model, "
            f'"{lineage.directory}")\n```\n\nor serve it with its fleet: `lorafleet serve --fleet FLEET_DIR` '
            f"(model name `{lineage.name}`).",
        ]
    )
    card = ModelCard.from_template(card_metadata(lineage), template_str="---\n{{ card_data }}\n---\n\n" + body + "\n")
    return str(card)


def base_name(lineage: Lineage) -> str:
    """The base as the card's `base_model` names it: its hub id or its own name, not a local path."""
    return lineage.base.get("name") or base_model_name(lineage.base.get("path", ""))


def _what(lineage: Lineage) -> str:
    base = f"`{base_name(lineage)}`"
    if lineage.kind == "adapter":
        return f"a low-rank adapter (LoRA) trained by lorafleet on the frozen pre-trained base model {base}"
    plan = ", ".join(f"{key} {value}" for key, value in lineage.compression.get("plan", {}).items())
    quantization = lineage.compression.get("quantization") or "not quantized"
    return f"a model compressed by lorafleet from {base} (pruned: {plan or 'nothing'}; {quantization})"


def _data_table(lineage: Lineage) -> str:
    if not lineage.data:
        return "No data recorded."
    rows = [
        "| file | SHA-256 | records | tokens | images | images SHA-256 | skipped |",
        "|---|---|---|---|---|---|---|",
    ]
    rows += [
        f"| `{data.path}` | `{data.sha256}` | {data.records} | {data.tokens} | {data.images} | "
        f"`{data.images_sha256 or '-'}` | {data.skipped} |"
        for data in lineage.data
    ]
    return "\n".join(rows)


def _procedure(lineage: Lineage) -> str:
    config = lineage.adapter_config
    keys = ("rank", "alpha", "dropout", "target_modules", "learning_rate", "schedule", "steps", "epochs")
    settings = ", ".join(f"{key} {config[key]}" for key in keys if config.get(key) is not None)
    lines = [
        f"- base model: `{base_name(lineage)}` ("
        + ", ".join(f"{name} sha256 `{digest}`" for name, digest in lineage.base.get("weights_sha256", {}).items())
        + ")",
        f"- adapter settings: {settings or 'not recorded'}",
        f"- seeds: {_pairs(lineage.seeds)}",
        f"- trained {lineage.started or '?'} to {lineage.finished or '?'} on {_pairs(lineage.hardware)}",
        f"- compute: {_pairs(lineage.compute)}",
        f"- software: {_pairs(lineage.software)}",
    ]
    lines += [
        f"- made from: {p['relation']} `{p.get('name') or p['path']}` ({p.get('id', '-')})" for p in lineage.parents
    ]
    return "\n".join(lines)


def _results(lineage: Lineage) -> str:
    loss = lineage.loss
    per_epoch = ", ".join(f"{value:.4f}" for value in loss.get("per_epoch", []))
    lines = [f"- training loss: final {loss.get('final')}, per epoch [{per_epoch}]"] if loss else []
    for data_key, scores in lineage.evaluation.items():
        shown = _pairs(scores, skip={"data", "data_sha256"})
        lines.append(f"- held-out `{scores.get('data', data_key)}` (sha256 `{scores.get('data_sha256')}`): {shown}")
    return "\n".join(lines) or "Not evaluated yet: `lorafleet eval --fleet FLEET_DIR --data HELD_OUT.jsonl`."


def _sweep(sweep: dict) -> str:
    """The search that crowned this adapter (`lorafleet sweep`): its space, every trial with its
    values, metric and where it stopped (or diverged), and why the winner won."""
    metric, winner = sweep["metric"], sweep["winner"]
    space = ", ".join(
        f"{name} {kind} {values}" for name, drawn in sweep["space"].items() for kind, values in drawn.items()
    )
    rungs = sweep["rungs"]
    lines = [
        f"Chosen by a hyperparameter sweep of `{sweep['department']}`: {len(sweep['trials'])} trials "
        f"({sweep['sampler']} sampler, seed {sweep['seed']}) trained together as adapters of one fleet, "
        f"compared on held-out `{metric}` (lower is better), the worst stopped at rungs {rungs['steps']} "
        f"(successive halving, reduction factor {rungs['reduction_factor']}, budget {rungs['budget']} steps).",
        f"- space: {space}",
        f"- winner: trial `{winner['trial']}` ({_values(winner['values'])}): {winner['why']}",
        *([_retrained(sweep["retrained"])] if "retrained" in sweep else []),
        "",
        f"| trial | values | final {metric} | steps | outcome |",
        "|---|---|---|---|---|",
    ]
    for trial in sweep["trials"]:
        outcome = f"stopped at step {trial['stopped_at']}" if trial["stopped_at"] is not None else "full budget"
        if trial.get("diverged"):  # absent from the sweep.json of a sweep before diverged trials were marked
            outcome = f"diverged at step {trial['stopped_at'] + 1} (the loss was no longer a number)"
        if trial["name"] == winner["trial"]:
            outcome = "won"
        final = "-" if trial["final"] is None else f"{trial['final']:.6g}"
        lines.append(f"| `{trial['name']}` | {_values(trial['values'])} | {final} | {trial['steps']} | {outcome} |")
    return "\n".join(lines)


def _retrained(retrained: dict) -> str:
    """`lorafleet sweep --retrain-full`: these weights are not the winning trial's but its
    configuration trained again on the training and held-out files, so its held-out number is not."""
    files = "; ".join(f"`{d['path']}` (sha256 `{d['sha256']}`, {d['records']} records)" for d in retrained["data"])
    return (
        f"- retrained on all the data: these weights are trial `{retrained['trial']}`'s configuration trained "
        f"again for {retrained['steps']} steps on {files}, with no rungs. Held-out metric: {retrained['held_out']}."
    )


def _values(values: dict) -> str:
    return ", ".join(
        f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in values.items()
    )


def _pairs(values: dict, skip: set[str] = frozenset()) -> str:
    return ", ".join(f"{key} {value}" for key, value in values.items() if key not in skip) or "not recorded"


# --- the Annex IV draft -------------------------------------------------------------------------


def annex_iv(lineage: Lineage, children: list[tuple[str, str, str]], facts: LogFacts) -> str:
    changes = change_log(lineage, children, facts)
    today = datetime.now(UTC).date().isoformat()
    must = PROVIDER_MUST_COMPLETE
    sections = [
        f"# Technical documentation (EU AI Act Annex IV): {lineage.name}\n\n"
        f"Draft generated by lorafleet on {today} from the fleet's registry and audit log, for the adapter "
        f"`{lineage.name}` (lineage id `{lineage.id}`). Regulation (EU) 2024/1689, Art. 11(1) and Annex IV: "
        "required for high-risk AI systems before they are placed on the market or put into service, kept up "
        "to date, and retained for 10 years (Art. 18). Under the Digital Omnibus on AI (Council approval "
        "29 June 2026; check its publication in the Official Journal) the high-risk obligations apply from "
        "2 December 2027 for Annex III systems and from 2 August 2028 for Annex I products. Facts below come "
        "from lorafleet's records; every line marked PROVIDER MUST COMPLETE needs the provider's own answer. "
        "This draft is not legal advice.",
        "## 1. General description of the AI system\n\n"
        f"(a) Intended purpose, provider, version: {must} intended purpose and the provider's name. Version: "
        f"lineage id `{lineage.id}`; " + _relation_to_previous(lineage, children) + "\n\n"
        f"(b) Interaction with other hardware, software or AI systems: {must} the systems it is part of. It runs "
        f"on the base model `{base_name(lineage)}` (loaded from `{lineage.base.get('path')}`).\n\n"
        f"(c) Software versions: {_pairs(lineage.software)}. Update requirements: {must}\n\n"
        f"(d) Forms in which it is placed on the market: a PEFT LoRA adapter directory ("
        + ", ".join(f"`{name}` sha256 `{digest}`" for name, digest in lineage.weights_sha256.items())
        + "), served through lorafleet's OpenAI-compatible API (`lorafleet serve`).\n\n"
        f"(e) Hardware: trained on {_pairs(lineage.hardware)}. {must} the hardware it runs on in service.\n\n"
        f"(f) Product photographs or illustrations (if a component of a product): {must}\n\n"
        f"(g) User interface provided to the deployer: {must}\n\n"
        f"(h) Instructions for use for the deployer: {must}",
        "## 2. Detailed description of the elements and of the development process\n\n"
        f"(a) Methods and steps: {_what(lineage)} (the base is third-party or own: {must} its origin and "
        "licence).\n\n" + _procedure(lineage) + "\n\n"
        f"(b) Design specifications, general logic, key design choices and their rationale: {must}\n\n"
        "(c) System architecture and computational resources used to develop, train, test and validate: the "
        f"base model with this adapter added to its linear layers ({_pairs(lineage.adapter_config, skip={'data'})}). "
        f"Compute: {_pairs(lineage.compute)}.\n\n"
        "(d) Data requirements and datasheets (training data as recorded, with hashes):\n\n"
        + _data_table(lineage)
        + "\n\nChecks of these exact files (matched by SHA-256) in the audit log:\n\n"
        + "\n".join(data_checks(lineage, facts))
        + f"\n\n{must} provenance, scope and main characteristics of the data, how it was obtained and selected, "
        "labelling and cleaning (Art. 10).\n\n"
        f"(e) Assessment of the human oversight measures (Art. 14): {must}\n\n"
        f"(f) Pre-determined changes and technical solutions for continuous compliance: {must}\n\n"
        "(g) Validation and testing procedures, data and metrics:\n\n" + _results(lineage) + "\n\n"
        f"{must} robustness and discriminatory-impact testing; dated and signed test reports.\n\n"
        f"(h) Cybersecurity measures: {security_measures(facts)} lorafleet opens no outbound connections "
        f"beyond those configured (an --upstream server, --allow-image-host). {must} the deployment's own "
        "measures.",
        "## 3. Monitoring, functioning and control\n\n"
        + _results(lineage)
        + f"\n\n{must} capabilities and limitations, accuracy for specific groups of persons, foreseeable "
        "unintended outcomes and risks, human oversight measures, input data specifications.",
        "## 4. Appropriateness of the performance metrics\n\n"
        f"Metrics recorded: {', '.join(_metric_names(lineage)) or 'training loss only'}. {must} why these "
        "metrics are appropriate for the intended purpose.",
        f"## 5. Risk management system (Art. 9)\n\n{must} the risk management system.",
        "## 6. Relevant changes made through the lifecycle\n\n" + ("\n".join(changes) or "No changes recorded."),
        f"## 7. Harmonised standards applied\n\n{must} the harmonised standards applied, or the other solutions "
        "and specifications used to meet the requirements of Chapter III, Section 2.",
        f"## 8. EU declaration of conformity (Art. 47)\n\n{must} a copy of the declaration.",
        "## 9. Post-market monitoring (Art. 72(3))\n\n"
        "lorafleet records every served request in the fleet's audit log (time, tenant, key id, model, adapter "
        "hash, input and output hashes, token counts, status, latency; Art. 12); `lorafleet audit export` "
        f"hands a time range to a reviewer. {must} the post-market monitoring plan.",
    ]
    return "\n\n".join(sections) + "\n"


def _relation_to_previous(lineage: Lineage, children: list[tuple[str, str, str]]) -> str:
    made_from = [
        f"{p['relation']} `{p.get('name') or p['path']}` ({p.get('id', 'unregistered')})" for p in lineage.parents
    ]
    made_into = [f"{relation} `{name}` ({child_id})" for relation, name, child_id in children]
    parts = [f"made from {', '.join(made_from)}" if made_from else "a first version (no parent)"]
    if made_into:
        parts.append(f"later versions: {', '.join(made_into)}")
    return "; ".join(parts) + "."


def _metric_names(lineage: Lineage) -> list[str]:
    return sorted(
        {metric for scores in lineage.evaluation.values() for metric in scores if metric in ("accuracy", "token_f1")}
    )


def change_log(lineage: Lineage, children: list[tuple[str, str, str]], facts: LogFacts) -> list[str]:
    """The adapter's history: the audit entries that name it (after checking the chain), and the
    registry's links to what it was made from and what was made from it."""
    lines = [f"- made from {p['relation']} `{p.get('name') or p['path']}`" for p in lineage.parents]
    lines += [f"- {relation}: `{name}` ({child_id}) was made from it" for relation, name, child_id in children]
    lines.append(f"- {verification_line(facts)}")
    lines += [f"- {entry['time']} `{entry['event']}` (audit seq {entry['seq']})" for entry in facts.about]
    return lines
