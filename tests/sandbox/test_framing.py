"""The agent framing, with literal bytes: no I/O."""

import pytest
from groundloop.sandbox import framing


def test_demux_single_and_split_frames():
    d = framing.DockerDemux()
    assert d.feed(b"\x01\x00\x00\x00\x00\x00\x00\x03abc") == [(1, b"abc")]
    # A header split across reads, then two frames in one read.
    assert d.feed(b"\x02\x00\x00") == []
    assert d.feed(b"\x00\x00\x00\x00\x02e") == []
    assert d.feed(b"r\x01\x00\x00\x00\x00\x00\x00\x01x") == [(2, b"er"), (1, b"x")]
    assert d.pending == 0


def test_demux_byte_at_a_time():
    raw = (
        b"\x01\x00\x00\x00\x00\x00\x00\x05hello"
        + b"\x02\x00\x00\x00\x00\x00\x00\x00"
        + b"\x01\x00\x00\x00\x00\x00\x00\x01!"
    )
    d = framing.DockerDemux()
    out = []
    for i in range(len(raw)):
        out += d.feed(raw[i : i + 1])
    assert out == [(1, b"hello"), (2, b""), (1, b"!")]


def test_demux_rejects_garbage_header():
    with pytest.raises(framing.FramingError, match="expected a stream id"):
        framing.DockerDemux().feed(b"\x07\x00\x00\x00\x00\x00\x00\x01x")


def test_line_splitter():
    s = framing.LineSplitter()
    assert s.feed(b'{"a":1}\n{"b"') == [b'{"a":1}']
    assert s.feed(b":2}\n\n") == [b'{"b":2}', b""]
    assert s.feed(b"tail") == []
    assert s.pending == 4


def test_line_splitter_bounds_a_line():
    s = framing.LineSplitter(max_line=8)
    s.feed(b"12345678")
    with pytest.raises(framing.FramingError, match="newline within 8 bytes"):
        s.feed(b"9")


def test_encode_decode_round_trip():
    frame = {"op": "run_code", "rid": "r1", "code": "print('é\\n')\n"}
    line = framing.encode(frame)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert framing.decode(line[:-1]) == frame


@pytest.mark.parametrize("line", [b"not json", b"[1, 2]", b'"str"', b"\xff\xfe"])
def test_decode_rejects_non_objects(line):
    with pytest.raises(framing.FramingError, match="expected a JSON object"):
        framing.decode(line)


def test_display_results_and_clear_events():
    for ev in (
        {"ev": "result", "rid": "r", "data": {"text/plain": "1"}, "main": False, "display_id": "p", "update": True},
        {"ev": "clear", "rid": "r", "wait": True},
    ):
        assert framing.check_event(dict(ev)) == ev
    for bad in (
        {"ev": "result", "rid": "r", "data": {}, "display_id": 5},
        {"ev": "result", "rid": "r", "data": {}, "display_id": "x" * 257},
        {"ev": "result", "rid": "r", "data": {}, "display_id": "p", "update": "yes"},
        {"ev": "clear", "rid": "r"},
        {"ev": "clear", "wait": False},
    ):
        with pytest.raises(framing.FramingError):
            framing.check_event(bad)


def test_terminal_output_events_carry_base64_only():
    ev = {"ev": "tout", "rid": "open_terminal-1", "data": "aGkNCv8="}
    assert framing.check_event(dict(ev)) == ev
    for bad in (
        {"ev": "tout", "rid": "r", "data": "not base64!"},
        {"ev": "tout", "rid": "r", "data": 5},
        {"ev": "tout", "data": "aGk="},
        {"ev": "tout", "rid": "r", "data": '", "type": "done'},
    ):
        with pytest.raises(framing.FramingError):
            framing.check_event(bad)
    done = framing.check_event({"ev": "done", "rid": "r", "ok": True, "cols": 80, "rows": 24, "bytes": 3})
    assert (done["cols"], done["rows"], done["bytes"]) == (80, 24, 3)
