"""Issue 16, the pure part: strict fields, the new requests and fields, ready.features, error kinds, and the
agent's done fields the server lets through. Literal frames, no I/O."""

from __future__ import annotations

import orjson
import pytest
from groundloop.sandbox import framing
from groundloop.sessions.errors import ProtocolError
from groundloop.sessions.protocol import REQUEST_TYPES, failure, features, parse_request


def refused(frame: dict) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse_request(orjson.dumps(frame))
    return info.value


def test_an_unknown_field_of_a_known_request_is_refused_by_name():
    err = refused({"type": "run_code", "id": "a", "code": "1", "enviroment": {"A": "1"}})
    assert err.code == "bad_request" and err.id == "a"
    assert err.message == "run_code has no field `enviroment`"
    # several: a few are named, the count of the rest is given
    err = refused({"type": "ping", "id": 1, **{f"f{i}": i for i in range(6)}})
    assert "`f0`, `f1`, `f2`, `f3` and 2 more" in err.message
    # a huge field name is cut in the message
    err = refused({"type": "ping", "id": 1, "x" * 10_000: 1})
    assert len(err.message) < 300


def test_null_is_absent_for_unknown_fields_too():
    req = parse_request(b'{"type":"run_code","id":"a","code":"1","context":null,"future":null}')
    assert req.params == {"code": "1"}


def test_the_new_requests_and_fields():
    req = parse_request(b'{"type":"run_code","id":"a","code":"echo $A","language":"bash","env":{"A":"1"}}')
    assert req.params == {"code": "echo $A", "language": "bash", "env": {"A": "1"}}
    assert parse_request(b'{"type":"run_code","id":"a","code":"1","language":"typescript"}').params["language"]
    assert parse_request(b'{"type":"restart_context","id":"a","context":"c"}').params == {"context": "c"}
    assert parse_request(b'{"type":"close_session","id":"a"}').params == {}
    req = parse_request(b'{"type":"set_env","id":"a","env":{"K":"v"},"replace":true}')
    assert req.params == {"env": {"K": "v"}, "replace": True}
    assert refused({"type": "restart_context", "id": "a"}).message.startswith("restart_context needs `context`")
    assert refused({"type": "set_env", "id": "a"}).id == "a"


@pytest.mark.parametrize("env", [{"": "v"}, {"A=B": "v"}, {"A\0": "v"}, {"A": "v\0"}, {"A": 1}, ["A"]])
def test_an_environment_is_what_an_environment_can_hold(env):
    for kind, fields in (("run_code", {"code": "1"}), ("exec", {"command": "x"}), ("set_env", {})):
        err = refused({"type": kind, "id": "a", **fields, "env": env})
        assert "`env`" in err.message and "v\0" not in err.message


def test_an_environment_value_is_never_echoed():
    err = refused({"type": "set_env", "id": "a", "env": {"TOKEN": "secret-value", "BAD": 5}})
    assert "secret-value" not in err.message


def test_languages():
    assert "nope" in refused({"type": "run_code", "id": "a", "code": "1", "language": "nope"}).message
    # assist writes Python or JavaScript only
    err = refused({"type": "assist", "id": "a", "prompt": "p", "language": "bash"})
    assert "assist runs python or javascript" in err.message


def test_features_list_requests_capabilities_and_the_sandbox_languages():
    listed = features(["python", "bash"])
    assert set(REQUEST_TYPES) <= set(listed)
    assert {
        "run_code.env",
        "session_env",
        "done.execution_count",
        "error.kind",
        "strict_fields",
        "display_updates",
        "run_code.fresh",
    } <= set(listed)
    assert [f for f in listed if f.startswith("language:")] == ["language:python", "language:bash"]
    assert "language:typescript" in features(None)  # a sandbox that did not say: every language


def test_a_failure_is_the_request_s_unless_said_otherwise():
    assert failure("Cancelled", "x")["kind"] == "request"
    assert failure("SyntaxError", "x", kind="user")["kind"] == "user"


def test_the_server_passes_the_agent_s_execution_count_and_error_kind():
    done = framing.check_event(
        {
            "ev": "done",
            "rid": "r1",
            "ok": False,
            "execution_count": 3,
            "error": {"name": "NameError", "message": "x", "kind": "user"},
        }
    )
    assert done["execution_count"] == 3 and done["error"]["kind"] == "user"
    # a kind that is neither is dropped (the session then says "request"); a count must be an integer
    done = framing.check_event({"ev": "done", "rid": "r1", "ok": False, "error": {"name": "E", "kind": "forged"}})
    assert "kind" not in done["error"]
    with pytest.raises(framing.FramingError):
        framing.check_event({"ev": "done", "rid": "r1", "ok": True, "execution_count": "3"})


def test_fresh_takes_no_context():
    assert parse_request(b'{"type":"run_code","id":"a","code":"1","fresh":true}').params["fresh"] is True
    with pytest.raises(ProtocolError, match="fresh"):
        parse_request(b'{"type":"run_code","id":"a","code":"1","fresh":true,"context":"c"}')
    with pytest.raises(ProtocolError, match="fresh"):
        parse_request(b'{"type":"run_code","id":"a","code":"1","fresh":"yes"}')
