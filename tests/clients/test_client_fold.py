"""How the Python client folds a request's frames into its result (clients/python/groundloop_client/results.py):
pure, literal frames, no I/O."""

from __future__ import annotations

from groundloop.client.results import Result, _Fold, execution


def fold(*frames: dict) -> _Fold:
    f = _Fold()
    for frame in frames:
        f.add(frame)
    return f


def result(text: str, **fields) -> dict:
    return {"type": "result", "id": "r1", "data": {"text/plain": text}, "main": False, **fields}


def out(text: str, stream: str = "stdout") -> dict:
    return {"type": stream, "id": "r1", "text": text}


def test_an_update_replaces_every_result_of_its_display_id_in_place():
    f = fold(
        result("a", display_id="x"),
        result("b"),
        result("c", display_id="x"),
        result("d", display_id="x", update=True),
    )
    assert [(r.text, r.display_id, r.update) for r in f.results] == [
        ("d", "x", False),
        ("b", None, False),
        ("d", "x", False),
    ]


def test_an_update_of_a_display_this_request_cleared_shows_nothing():
    f = fold(
        result("a", display_id="x"),
        {"type": "clear_output", "id": "r1", "wait": False},
        result("b", display_id="x", update=True),
    )
    assert f.results == []


def test_in_assist_a_clear_is_its_blocks_and_the_fold_keeps_everything():
    f = fold(out("first try\n"), {"type": "clear_output", "id": "r1", "wait": False, "iteration": 2}, out("second\n"))
    assert f.output.getvalue() == "first try\nsecond\n"


def test_an_update_of_an_earlier_requests_display_is_kept_and_marked():
    f = fold(result("b"), result("new", display_id="elsewhere", update=True))
    assert [(r.text, r.update) for r in f.results] == [("b", False), ("new", True)]


def test_update_without_a_display_id_is_a_plain_result():
    assert fold(result("a", update=True)).results == [Result({"text/plain": "a"})]


def test_clear_output_drops_what_came_before():
    f = fold(
        out("one\n"),
        out("err\n", "stderr"),
        result("r"),
        {"type": "clear_output", "id": "r1", "wait": False},
        out("two\n"),
    )
    run = execution("r1", f, {"type": "done", "id": "r1", "ok": True, "duration_ms": 1.0})
    assert (run.stdout, run.stderr, run.output, run.results) == ("two\n", "", "two\n", [])


def test_clear_output_with_wait_clears_at_the_next_output_only():
    waiting = fold(out("one\n"), {"type": "clear_output", "id": "r1", "wait": True})
    assert waiting.stdout.getvalue() == "one\n"  # nothing came after: nothing cleared
    f = fold(out("one\n"), {"type": "clear_output", "id": "r1", "wait": True}, result("r"), out("two\n"))
    assert f.stdout.getvalue() == "two\n" and [r.text for r in f.results] == ["r"]
    # an update is not new output: it does not set off the clear
    f = fold(
        result("a", display_id="x"),
        {"type": "clear_output", "id": "r1", "wait": True},
        result("b", display_id="x", update=True),
    )
    assert [r.text for r in f.results] == ["b"]


def test_frames_of_other_kinds_change_nothing():
    f = fold(out("one\n"), {"type": "token", "id": "r1", "text": "t", "iteration": 1}, {"type": "pong", "id": "r1"})
    assert f.output.getvalue() == "one\n" and f.results == []
