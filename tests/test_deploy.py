"""deploy/ is a starting point a platform team can trust: every manifest parses, and every
`lorafleet serve` it runs is accepted by lorafleet's own parser, flag for flag, with the shared
state's flags (docker cannot run here, so the manifests are checked as lorafleet reads them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from lorafleet.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def gateway_commands() -> dict[str, list[str]]:
    """Every `lorafleet serve` argument list in deploy/, by where it is."""
    found = {}
    compose = documents(DEPLOY / "compose.yaml")[0]
    for name, service in compose["services"].items():
        if service.get("command", [None])[0] == "serve":
            found[f"compose.yaml: {name}"] = service["command"]
    for doc in documents(DEPLOY / "k8s" / "lorafleet.yaml"):
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if container.get("args", [None])[0] == "serve":
                found[f"k8s/lorafleet.yaml: {doc['metadata']['name']}"] = container["args"]
    return found


def test_there_are_a_compose_file_and_kubernetes_manifests_and_every_one_parses():
    assert {path.relative_to(DEPLOY).as_posix() for path in MANIFESTS} >= {"compose.yaml", "k8s/lorafleet.yaml"}
    for path in MANIFESTS:
        assert documents(path), path


@pytest.mark.parametrize("where", sorted(gateway_commands()))
def test_every_gateway_command_is_one_lorafleet_serve_accepts_with_the_shared_state(where):
    argv = gateway_commands()[where]
    # ${VAR} (compose) and $(VAR) (Kubernetes) are filled in at deployment; STATE_URL is the
    # Secret's database URL (its comment shows it made as postgresql://…).
    argv = [re.sub(r"\$\{[^}]+\}|\$\([^)]+\)", "value", arg.replace("$(STATE_URL)", "postgresql://x")) for arg in argv]
    args = build_parser().parse_args(argv)  # an unknown flag exits here, naming it
    assert args.state.startswith("postgresql://") and args.redis.startswith("redis://"), where
    assert args.host == "0.0.0.0" and args.keys is not None and args.upstream, where


def test_the_gateway_runs_as_replicas_beside_postgresql_redis_and_vllm():
    compose = documents(DEPLOY / "compose.yaml")[0]["services"]
    assert compose["gateway"]["deploy"]["replicas"] >= 2
    assert compose["postgres"]["image"] == "postgres:15" and compose["redis"]["image"].startswith("redis:")
    assert "--enable-lora" in compose["vllm"]["command"]
    kinds = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents(DEPLOY / "k8s" / "lorafleet.yaml")}
    assert kinds[("Deployment", "lorafleet-gateway")]["spec"]["replicas"] >= 2
    assert {
        ("Service", name) for name in ("lorafleet-gateway", "lorafleet-vllm", "lorafleet-postgres", "lorafleet-redis")
    } <= set(kinds)
    assert "'.[replicas]'" in (DEPLOY / "Dockerfile").read_text()
