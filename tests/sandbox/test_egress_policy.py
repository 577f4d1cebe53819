"""The egress policy (pure) and its gate over a real Unix socket, with an injected resolver.

Nothing here resolves a name with the system or leaves loopback: the resolver is a table.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json

import pytest
from groundloop.sandbox.egress import EgressGate, EgressOwner, EgressPolicy, Rule, parse_admitted, parse_rules, public
from groundloop.sessions.egress import parse_param


def policy(allow, private=(), **kw) -> EgressPolicy:
    names, nets = parse_admitted(list(private))
    return EgressPolicy(parse_rules(list(allow)), names, nets, **kw)


# ---- rules


@pytest.mark.parametrize(
    "text, host, ports",
    [
        ("pypi.org", "pypi.org", (80, 443)),
        ("PyPI.org.", "pypi.org", (80, 443)),
        ("*.example.org", "*.example.org", (80, 443)),
        ("index:8080", "index", (8080,)),
        ("index:*", "index", None),
        ("[::1]:80", "::1", (80,)),
        ("10.0.0.1", "10.0.0.1", (80, 443)),
    ],
)
def test_rules_parse(text, host, ports):
    assert Rule.parse(text) == Rule(host, ports)


@pytest.mark.parametrize("text", ["", "*", "*example.org", "a b", "host:0", "host:99999", "host:x", "[::1"])
def test_bad_rules_are_refused_with_their_text(text):
    with pytest.raises(ValueError):
        Rule.parse(text)


def test_wildcards_match_subdomains_only_and_ports_count():
    p = policy(["*.example.org", "pypi.org:443"])
    assert p.refusal("files.example.org", 443) is None
    assert p.refusal("a.b.example.org", 80) is None
    assert "allow-list" in p.refusal("example.org", 443)
    assert "allow-list" in p.refusal("badexample.org", 443)
    assert "allow-list" in p.refusal("pypi.org", 80)
    assert p.refusal("pypi.org", 443) is None


def test_off_by_default():
    p = policy([])
    assert not p.enabled
    assert "off" in p.refusal("pypi.org", 443)


def test_a_session_narrows_and_never_widens():
    p = policy(["pypi.org", "*.pythonhosted.org"])
    narrow = p.narrow(["pypi.org", "evil.example"])
    assert narrow.refusal("pypi.org", 443) is None
    assert "this session's" in narrow.refusal("files.pythonhosted.org", 443)
    assert "allow-list" in narrow.refusal("evil.example", 443)  # the session's own entry widens nothing
    assert p.narrow(None) is p
    nothing = p.narrow([])
    assert nothing.refusal("pypi.org", 443) is not None
    # narrowing again keeps the first narrowing
    assert narrow.narrow(["files.pythonhosted.org"]).refusal("files.pythonhosted.org", 443) is not None


def test_the_connect_parameter():
    assert parse_param(None) is None
    assert parse_param("none") == []
    assert parse_param("") == []
    assert parse_param("pypi.org, *.example.org:8080") == ["pypi.org", "*.example.org:8080"]
    with pytest.raises(ValueError, match="egress rule"):
        parse_param("a b")


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "::1",
        "fe80::1",
        "fd00:ec2::254",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "ff02::1",
    ],
)
def test_non_public_addresses_are_refused_without_the_override(addr):
    a = ipaddress.ip_address(addr)
    assert not public(a)
    assert not policy(["x"]).admits("x", a)


def test_public_addresses_pass_and_the_override_admits_by_name_or_network():
    assert policy(["x"]).admits("x", ipaddress.ip_address("93.184.216.34"))
    p = policy(["index.internal", "other"], private=["index.internal", "10.9.0.0/16"])
    assert p.admits("index.internal", ipaddress.ip_address("127.0.0.1"))
    assert not p.admits("other", ipaddress.ip_address("127.0.0.1"))
    assert p.admits("other", ipaddress.ip_address("10.9.1.2"))
    assert not p.admits("other", ipaddress.ip_address("10.8.1.2"))


# ---- the gate, over a real Unix socket


class Table:
    """A resolver that answers from a table and counts its calls."""

    def __init__(self, table):
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host, port):
        self.calls.append(host)
        if host not in self.table:
            raise OSError("no such name")
        return [ipaddress.ip_address(a) for a in self.table[host]]


async def ask(path, host, port, payload=b""):
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(json.dumps({"host": host, "port": port}).encode() + b"\n")
    answer = json.loads(await reader.readuntil(b"\n"))
    data = b""
    if answer["ok"] and payload:
        writer.write(payload)
        writer.write_eof()
        data = await reader.read()
    writer.close()
    return answer, data


@pytest.fixture
async def echo():
    async def handle(reader, writer):
        data = await reader.read()
        writer.write(b"echo:" + data)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def gate_with(tmp_path, pol, resolver, records):
    gate = EgressGate(str(tmp_path / "egress.sock"), pol, resolver=resolver)
    await gate.start()
    gate.bind(EgressOwner(user="alice", session="s1", policy=pol, observer=records.append))
    return gate


async def test_the_gate_connects_to_the_checked_address_never_the_name_again(tmp_path, echo):
    records = []
    resolver = Table({"index.test": ["127.0.0.1"]})
    pol = policy([f"index.test:{echo}"], private=["127.0.0.0/8"])
    gate = await gate_with(tmp_path, pol, resolver, records)
    try:
        answer, data = await ask(gate.path, "index.test", echo, b"ping")
        assert answer == {"ok": True, "address": "127.0.0.1"}
        assert data == b"echo:ping"
        assert resolver.calls == ["index.test"]  # resolved once; "index.test" means nothing to the system
        await asyncio.sleep(0)
        (rec,) = records
        assert (rec.user, rec.session, rec.host, rec.verdict) == ("alice", "s1", "index.test", "allowed")
        assert rec.bytes_out == 4 and rec.bytes_in == 9
    finally:
        await gate.close()


async def test_a_name_rebound_to_loopback_is_refused(tmp_path, echo):
    records = []
    resolver = Table({"cdn.example": ["127.0.0.1"], "mixed.example": ["10.0.0.1", "127.0.0.1"]})
    gate = await gate_with(tmp_path, policy(["*.example:*"]), resolver, records)
    try:
        answer, _ = await ask(gate.path, "cdn.example", echo)
        assert not answer["ok"] and "loopback" in answer["reason"] and "ALLOW_PRIVATE" in answer["reason"]
        answer, _ = await ask(gate.path, "mixed.example", echo)
        assert not answer["ok"]
        answer, _ = await ask(gate.path, "not.allowed", 80)
        assert not answer["ok"] and "GROUNDLOOP_EGRESS_ALLOW" in answer["reason"]
        assert "not.allowed" not in resolver.calls  # refused before any resolution
        assert [r.verdict for r in records] == ["refused"] * 3
    finally:
        await gate.close()


async def test_an_unbound_gate_refuses_everything(tmp_path, echo):
    pol = policy([f"127.0.0.1:{echo}"], private=["127.0.0.1"])
    gate = EgressGate(str(tmp_path / "egress.sock"), pol, resolver=Table({}))
    await gate.start()
    try:
        answer, _ = await ask(gate.path, "127.0.0.1", echo)
        assert not answer["ok"] and "no session" in answer["reason"]
    finally:
        await gate.close()


async def test_the_concurrent_connection_limit(tmp_path):
    hold = asyncio.Event()

    async def handle(reader, writer):
        await hold.wait()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    records = []
    pol = policy([f"127.0.0.1:{port}"], private=["127.0.0.1"], max_connections=2)
    gate = await gate_with(tmp_path, pol, Table({}), records)
    writers = []
    try:
        for _ in range(2):
            reader, writer = await asyncio.open_unix_connection(gate.path)
            writer.write(json.dumps({"host": "127.0.0.1", "port": port}).encode() + b"\n")
            assert json.loads(await reader.readuntil(b"\n"))["ok"]
            writers.append(writer)
        answer, _ = await ask(gate.path, "127.0.0.1", port)
        assert not answer["ok"] and "the limit is 2" in answer["reason"]
    finally:
        hold.set()
        for w in writers:
            w.close()
        await gate.close()
        server.close()


async def test_a_malformed_ask_is_refused_and_the_gate_goes_on(tmp_path, echo):
    records = []
    gate = await gate_with(tmp_path, policy(["*.example:*"]), Table({}), records)
    try:
        for line in (b"not json\n", b'{"host": "a\\u0000.example", "port": 80}\n', b'{"host": "x.example"}\n'):
            reader, writer = await asyncio.open_unix_connection(gate.path)
            writer.write(line)
            answer = json.loads(await reader.readuntil(b"\n"))
            assert answer == {"ok": False, "reason": "bad egress request"}
            writer.close()
        answer, _ = await ask(gate.path, "x" * 70 + ".example", 80)  # resolver refuses: a failure, not a crash
        assert not answer["ok"]
    finally:
        await gate.close()


async def test_connections_asking_at_once_cannot_pass_the_limit_together(tmp_path):
    """The limit is taken before the resolver's await: twenty asks at once, limit 2, slow resolver."""
    hold = asyncio.Event()

    async def handle(reader, writer):
        await hold.wait()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    class Slow(Table):
        async def __call__(self, host, port):
            await asyncio.sleep(0.05)
            return await super().__call__(host, port)

    pol = policy([f"index.test:{port}"], private=["index.test"], max_connections=2)
    gate = await gate_with(tmp_path, pol, Slow({"index.test": ["127.0.0.1"]}), [])
    conns = []
    try:
        for _ in range(20):
            reader, writer = await asyncio.open_unix_connection(gate.path)
            writer.write(json.dumps({"host": "index.test", "port": port}).encode() + b"\n")
            conns.append((reader, writer))
        answers = [json.loads(await r.readuntil(b"\n")) for r, _ in conns]
        assert sum(a["ok"] for a in answers) == 2
    finally:
        hold.set()
        for _, w in conns:
            w.close()
        await gate.close()
        server.close()


def test_a_bad_setting_names_its_variable():
    from groundloop.sandbox.settings import SandboxSettings, SettingsError, load

    with pytest.raises(SettingsError, match="GROUNDLOOP_EGRESS_ALLOW: bad egress rule"):
        EgressPolicy.from_settings(load(SandboxSettings, {"GROUNDLOOP_EGRESS_ALLOW": "pypi.org,*"}))
    with pytest.raises(SettingsError, match="GROUNDLOOP_EGRESS_ALLOW_PRIVATE"):
        EgressPolicy.from_settings(load(SandboxSettings, {"GROUNDLOOP_EGRESS_ALLOW_PRIVATE": "10.0.0.0/99"}))
    p = EgressPolicy.from_settings(load(SandboxSettings, {"GROUNDLOOP_EGRESS_ALLOW": "pypi.org, *.example.org:8080"}))
    assert p.enabled and p.refusal("a.example.org", 8080) is None
