"""Zero egress, proven: training, serving and compressing with every non-loopback connection
refused (and name lookups of anything but localhost) still work, and nothing even tried to call out."""

from __future__ import annotations

import errno
import ipaddress
import socket

import openai
import pytest
import yaml

from lorafleet.cli import main
from lorafleet.serve.gateway.server import ServeOptions
from tests.conftest import write_image_dataset
from tests.serve.conftest import running_server

OUTSIDE = ("203.0.113.1", 443)  # TEST-NET-3: an address that is never local


def is_local(host: object) -> bool:
    if host in (None, "localhost", "", b"localhost"):
        return True
    try:
        return ipaddress.ip_address(host.decode() if isinstance(host, bytes) else str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture
def no_egress(monkeypatch):
    """Refuse every connection and name lookup that would leave the machine; record each attempt."""
    attempts: list[str] = []
    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo
    create_connection = socket.create_connection

    def outside(sock, address) -> bool:
        return sock.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0])

    def guarded_connect(self, address):
        if outside(self, address):
            attempts.append(f"connect {address}")
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"egress refused: {address}")
        return connect(self, address)

    def guarded_connect_ex(self, address):
        if outside(self, address):
            attempts.append(f"connect_ex {address}")
            return errno.ECONNREFUSED
        return connect_ex(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if not is_local(host):
            attempts.append(f"getaddrinfo {host}")
            raise socket.gaierror(socket.EAI_NONAME, f"egress refused: lookup of {host}")
        return getaddrinfo(host, *args, **kwargs)

    def guarded_create_connection(address, *args, **kwargs):
        if not is_local(address[0]):
            attempts.append(f"create_connection {address}")
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"egress refused: {address}")
        return create_connection(address, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    return attempts


def test_the_guard_refuses_the_outside_and_lets_loopback_through(no_egress):
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(OUTSIDE, timeout=1)
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(OUTSIDE)
    with socket.socket(socket.AF_INET6) as sock:
        assert sock.connect_ex(("2001:db8::1", 443, 0, 0)) == errno.ECONNREFUSED
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("huggingface.co", 443)
    assert len(no_egress) == 4
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client.connect(server.getsockname())  # loopback is allowed
    no_egress.clear()


def test_train_serve_and_compress_without_any_outside_connection(no_egress, tiny_vlm_dir, tmp_path, capsys):
    with pytest.raises(ConnectionRefusedError):  # the guard is in place for everything below
        socket.create_connection(OUTSIDE, timeout=1)
    no_egress.clear()
    data = write_image_dataset(tmp_path / "shapes.jsonl", n=4, seed=0)
    fleet = tmp_path / "fleet"
    adapters = [{"name": "shapes", "data": str(data), "steps": 2, "rank": 4}]
    spec = {"base": str(tiny_vlm_dir), "output": str(fleet), "checkpoint_every": 1, "adapters": adapters}
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(spec))
    assert main(["train", str(tmp_path / "fleet.yaml"), "--no-progress"]) == 0

    with running_server(ServeOptions(fleet_dir=fleet, base_dir=tiny_vlm_dir)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="shapes", messages=[{"role": "user", "content": "What colour?"}], max_tokens=3
        )
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0

    argv = ["compress", "--base", str(tiny_vlm_dir), "--adapter", str(fleet / "adapters" / "shapes")]
    assert main([*argv, "--calib", str(data), "--prune-mlp", "0.25", "--out", str(fleet / "small")]) == 0
    assert (fleet / "small" / "lineage.json").exists()
    assert main(["audit", "verify", str(fleet)]) == 0
    assert "audit log valid" in capsys.readouterr().out
    assert no_egress == []  # nothing even tried to leave the machine


def test_vllm_is_started_without_usage_statistics_or_hub_access(tiny_lm_dir):
    from lorafleet.serve.gateway.upstream import vllm_command

    _, environment = vllm_command(["vllm"], tiny_lm_dir, {}, 8100, None, [])
    assert environment["VLLM_NO_USAGE_STATS"] == environment["DO_NOT_TRACK"] == environment["HF_HUB_OFFLINE"] == "1"
