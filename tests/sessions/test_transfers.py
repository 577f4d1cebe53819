"""watch_files and the chunked transfers without I/O: the agent's events as the server checks them
(sandbox/framing.py) and the client frames made of them (sessions/transfers.py), with literal frames."""

from __future__ import annotations

import pytest
from groundloop.sandbox.framing import FramingError, check_event, decode
from groundloop.sandbox.settings import SandboxSettings
from groundloop.sessions.inflight import RequestTable
from groundloop.sessions.protocol import parse_request
from groundloop.sessions.transfers import RequestFailed, frames_of, prepare


def test_file_events_pass_with_their_known_fields_only():
    line = (
        b'{"ev":"fev","rid":"w-1","events":[{"kind":"moved","path":"/w/b","from":"/w/a","seq":99,"type":"x"},'
        b'{"kind":"modified","path":"/w/c","count":7},{"kind":"overflow","path":"/w","message":"lost"}]}'
    )
    ev = check_event(decode(line))
    assert frames_of(ev, "r1") == [
        {"type": "file_event", "id": "r1", "kind": "moved", "path": "/w/b", "from": "/w/a"},
        {"type": "file_event", "id": "r1", "kind": "modified", "path": "/w/c", "count": 7},
        {"type": "file_event", "id": "r1", "kind": "overflow", "path": "/w", "message": "lost"},
    ]


@pytest.mark.parametrize(
    "line",
    [
        b'{"ev":"fev","rid":"w","events":[{"kind":"exploded","path":"/w"}]}',
        b'{"ev":"fev","rid":"w","events":[{"kind":"created"}]}',
        b'{"ev":"fev","rid":"w","events":[{"kind":"created","path":"/w","count":true}]}',
        b'{"ev":"fev","rid":"w","events":"many"}',
        b'{"ev":"fev","events":[]}',
        b'{"ev":"chunk","rid":"d","offset":-1,"size":3,"content":"AAA"}',
        b'{"ev":"chunk","rid":"d","offset":0,"size":3}',
        b'{"ev":"progress","rid":"u","bytes":"1","total":2}',
        b'{"ev":"watching","rid":"w","path":"/w"}',
    ],
)
def test_malformed_file_events_lose_the_sandbox(line):
    with pytest.raises(FramingError):
        check_event(decode(line))


def test_chunk_progress_and_watching_frames():
    chunk = check_event(decode(b'{"ev":"chunk","rid":"d","offset":4,"size":9,"content":"QUJD","x":1}'))
    assert frames_of(chunk, 7) == [{"type": "file_chunk", "id": 7, "offset": 4, "size": 9, "content": "QUJD"}]
    prog = check_event(decode(b'{"ev":"progress","rid":"u","bytes":3,"total":9}'))
    assert frames_of(prog, "u1") == [{"type": "progress", "id": "u1", "bytes": 3, "total": 9}]
    w = check_event(decode(b'{"ev":"watching","rid":"w","path":"/workspace","watches":3}'))
    assert frames_of(w, "w1") == [{"type": "watching", "id": "w1", "path": "/workspace", "watches": 3}]
    done = check_event(decode(b'{"ev":"done","rid":"u","ok":true,"sha256":"ab","received":3,"events":2,"z":1}'))
    assert done == {"ev": "done", "rid": "u", "ok": True, "sha256": "ab", "received": 3, "events": 2}


def test_prepare_sets_limits_and_deadlines():
    sb = SandboxSettings(max_file_bytes=1000, watch_coalesce_ms=20.0, watch_max_dirs=5, upload_idle_s=3.0)
    table = RequestTable()
    params: dict = {}
    assert prepare(parse_request(b'{"type":"watch_files","id":"w"}'), params, sb, table, 40.0) is None
    assert params == {"path": ".", "coalesce_ms": 20.0, "max_watch_dirs": 5}
    params = {"path": "a", "size": 3}
    assert prepare(parse_request(b'{"type":"upload_file","id":"u","path":"a","size":3}'), params, sb, table, 40) is None
    assert params["max_file_bytes"] == 1000 and params["idle_s"] == 3.0
    params = {"path": "a"}
    assert prepare(parse_request(b'{"type":"download_file","id":"d","path":"a"}'), params, sb, table, 40.0) == 40.0
    assert params["chunk_bytes"] == sb.transfer_chunk_bytes


def test_a_chunk_names_its_upload_by_the_clients_id():
    sb = SandboxSettings()
    table = RequestTable()
    chunk = parse_request(b'{"type":"upload_chunk","id":"c","upload":"u1","offset":0,"content":""}')
    with pytest.raises(RequestFailed) as info:
        prepare(chunk, dict(chunk.params), sb, table, 40.0)
    assert info.value.name == "UploadNotFound"
    up = table.add(parse_request(b'{"type":"upload_file","id":"u1","path":"a","size":1}'))
    up.agent_rid = "upload_file-9"
    params = dict(chunk.params)
    assert prepare(chunk, params, sb, table, 40.0) == 40.0
    assert params["upload"] == "upload_file-9"
    other = table.add(parse_request(b'{"type":"ping","id":"p"}'))
    other.agent_rid = "ping-1"
    wrong = parse_request(b'{"type":"upload_chunk","id":"c2","upload":"p","offset":0,"content":""}')
    with pytest.raises(RequestFailed):
        prepare(wrong, dict(wrong.params), sb, table, 40.0)
