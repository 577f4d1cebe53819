"""The pure protocol module, fed literal JSON."""

from __future__ import annotations

import orjson
import pytest
from groundloop.sessions.errors import ProtocolError
from groundloop.sessions.protocol import (
    REQUEST_TYPES,
    done_frame,
    encode,
    error_frame,
    gap_frame,
    output_frame,
    output_frame_parts,
    parse_request,
    ready_frame,
    with_seq,
)


def test_run_code_parses():
    req = parse_request(b'{"type":"run_code","id":"a1","code":"1+1","language":"python","timeout_s":5}')
    assert req.type == "run_code" and req.id == "a1"
    assert req.params == {"code": "1+1", "language": "python", "timeout_s": 5}


def test_integer_ids_and_unknown_fields():
    req = parse_request('{"type":"ping","id":7,"whatever":null}')  # null is absent, known field or not
    assert req.id == 7 and req.params == {}
    with pytest.raises(ProtocolError) as info:
        parse_request('{"type":"ping","id":7,"whatever":1}')
    assert info.value.id == 7 and "`whatever`" in info.value.message


@pytest.mark.parametrize(
    "frame, code, has_id",
    [
        (b'{"type":"run_code","id":"x"', "bad_request", False),
        (b"[1,2]", "bad_request", False),
        (b'{"type":"run_code","code":"1"}', "bad_request", False),
        (b'{"type":"run_code","id":true,"code":"1"}', "bad_request", False),
        (b'{"type":"run_code","id":""}', "bad_request", False),
        (b'{"type":"nope","id":"a"}', "bad_request", True),
        (b'{"type":"run_code","id":"a"}', "bad_request", True),
        (b'{"type":"run_code","id":"a","code":5}', "bad_request", True),
        (b'{"type":"run_code","id":"a","code":"1","language":"cobol"}', "bad_request", True),
        (b'{"type":"run_code","id":"a","code":"1","timeout_s":-1}', "bad_request", True),
        (b'{"type":"exec","id":"a","command":"ls","env":{"A":1}}', "bad_request", True),
        (b'{"type":"write_file","id":"a","path":"x","content":"y","encoding":"rot13"}', "bad_request", True),
        (b'{"type":"cancel","id":"a"}', "bad_request", True),
        (b'{"type":"assist","id":"a","prompt":"x","max_iterations":0}', "bad_request", True),
        (b'{"type":"delete_file","id":"a","path":"x","recursive":"yes"}', "bad_request", True),
    ],
)
def test_refusals(frame, code, has_id):
    with pytest.raises(ProtocolError) as info:
        parse_request(frame)
    assert info.value.code == code
    assert (info.value.id is not None) == has_id


def test_too_large_is_checked_first():
    with pytest.raises(ProtocolError) as info:
        parse_request(b'{"type":"ping","id":"a","pad":"' + b"x" * 100 + b'"}', max_bytes=64)
    assert info.value.code == "too_large"


def test_every_type_with_its_required_fields():
    required = {
        "run_code": {"code": "1"},
        "exec": {"command": "ls"},
        "create_context": {},
        "delete_context": {"context": "c"},
        "list_contexts": {},
        "write_file": {"path": "p", "content": ""},
        "read_file": {"path": "p"},
        "list_files": {},
        "delete_file": {"path": "p"},
        "mkdir": {"path": "p"},
        "start_process": {"command": "x"},
        "kill_process": {"process_id": "p"},
        "list_processes": {},
        "cancel": {"target": "r1"},
        "assist": {"prompt": "hi"},
        "ping": {},
        "watch_files": {},
        "upload_file": {"path": "p", "size": 3},
        "upload_chunk": {"upload": "u1", "offset": 0, "content": ""},
        "download_file": {"path": "p"},
        "open_terminal": {"cols": 80, "rows": 24},
        "terminal_input": {"terminal": "t1", "data": "ls\r"},
        "resize_terminal": {"terminal": 7, "cols": 100, "rows": 30},
        "close_terminal": {"terminal": "t1"},
        "snapshot": {},
        "restore": {"snapshot": "s"},
        "list_snapshots": {},
        "restart_context": {"context": "c"},
        "set_env": {"env": {"A": "1"}},
        "close_session": {},
    }
    assert set(required) == REQUEST_TYPES
    for kind, fields in required.items():
        req = parse_request(orjson.dumps({"type": kind, "id": "x", **fields}))
        assert req.type == kind and req.params == fields


def test_null_optional_fields_are_absent():
    req = parse_request(b'{"type":"run_code","id":"a","code":"1","context":null}')
    assert "context" not in req.params


def test_frames_and_seq_splice():
    body = encode(done_frame("a", False, 1.23456, {"name": "Cancelled", "message": "m"}, exit_code=1))
    frame = orjson.loads(with_seq(42, body))
    assert frame == {
        "seq": 42,
        "type": "done",
        "id": "a",
        "ok": False,
        "duration_ms": 1.235,
        "error": {"name": "Cancelled", "message": "m"},
        "exit_code": 1,
    }
    assert list(orjson.loads(with_seq(1, encode(error_frame("busy", "m"))))) == ["seq", "type", "code", "message"]
    ready = ready_frame("s", False, {"backend": "docker"}, {"max_message_bytes": 1})
    assert ready["protocol"] == "groundloop.v1" and ready["type"] == "ready"
    gap = gap_frame(3, 5, 7)
    assert gap["type"] == "gap" and gap["missed"] == 3


@pytest.mark.parametrize(
    "stream,id,extra,line",
    [
        ("stdout", "a1", {}, "hello"),
        ("stderr", 7, {"iteration": 2}, 'quote " and \\ and \x00 and \u00e9'),
        ("stdout", '"text":"\x00"', {"iteration": 1}, ""),  # an id that looks like the cut
    ],
)
def test_output_frame_parts_rebuild_the_frame_of_any_line(stream, id, extra, line):
    before, after = output_frame_parts(stream, id, **extra)
    rest = before + orjson.dumps(line) + after
    assert rest == encode(output_frame(stream, id, line, **extra))[1:]
    assert orjson.loads(with_seq(3, b"{" + rest)) == {"seq": 3, "type": stream, "id": id, "text": line, **extra}
