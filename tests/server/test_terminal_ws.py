"""Terminals over the real WebSocket, under runc and runsc (gVisor): a pty in the sandbox, raw bytes out.

Each test opens terminals with ``open_terminal``, types with ``terminal_input``
and reads ``terminal_output`` frames (base64 of the bytes the program wrote).
What is checked is what a terminal user relies on: echo, bytes unchanged
(invalid UTF-8, escape sequences, a megabyte through flow control), the
window size a program sees, Ctrl-C, a full-screen (curses) program, the
processes of a closed terminal gone, the bound on terminals, a resume.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import pytest
import pytest_asyncio
from support.env import sandbox_settings, server_settings
from support.servers import run_server
from support.wsclient import WSClient

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]
WAIT = 120.0  # bound on any one wait (a loaded, shared machine)
MAX_TERMINALS = 2


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def srv(request):
    sb = sandbox_settings(runtime=request.param, pool_size=1, start_timeout_s=60.0, max_terminals=MAX_TERMINALS)
    # Every test's session waits out its resume grace after the test: room for all of them.
    settings = server_settings(
        sandbox=sb, resume_grace_s=30.0, rate_per_s=1000.0, rate_burst=1000, max_sessions_per_user=64
    )
    async with run_server(settings) as s:
        yield s


class Term:
    """One terminal of a client: its id, and its output so far (bytes)."""

    def __init__(self, c: WSClient, tid: Any):
        self.c = c
        self.id = tid

    @classmethod
    async def open(cls, c: WSClient, cols: int = 80, rows: int = 24, **fields: Any) -> Term:
        tid = await c.send("open_terminal", cols=cols, rows=rows, **fields)
        return cls(c, tid)

    @property
    def output(self) -> bytes:
        return b"".join(base64.b64decode(f["data"]) for f in self.c.of(self.id, "terminal_output"))

    @property
    def done(self) -> dict | None:
        return next((f for f in self.c.of(self.id, "done")), None)

    async def until(self, marker: bytes, count: int = 1) -> bytes:
        """Read frames until the output holds ``marker`` ``count`` times; the output."""
        async with asyncio.timeout(WAIT):
            while self.output.count(marker) < count:
                assert self.done is None, (self.done, self.output[-2000:])
                await self.c.recv()
        return self.output

    async def type(self, text: str) -> dict:
        done = await self.c.call("terminal_input", terminal=self.id, data=text)
        assert done["ok"], str(done)
        return done

    async def run(self, line: str, marker: bytes) -> bytes:
        """Type a command line (Enter included) and wait for ``marker`` in its output."""
        await self.type(line + "\r")
        return await self.until(marker)

    async def close(self) -> dict:
        done = await self.c.call("close_terminal", terminal=self.id)
        assert done["ok"], str(done)
        await self.c.until_done(self.id)
        return done

    async def ended(self) -> dict:
        frames = await self.c.until_done(self.id, WAIT)
        return frames[-1]


async def connect(srv) -> WSClient:
    return await WSClient.connect(srv.url, token="tok1")


async def test_echo_and_lossless_bytes_both_ways(srv):
    async with await connect(srv) as c:
        assert c.ready["limits"]["max_terminals"] == MAX_TERMINALS
        t = await Term.open(c)
        await t.run("echo hi-$((40 + 2))", b"hi-42")
        assert b"echo hi-$((40 + 2))" in t.output  # the shell echoed the keystrokes

        # Every byte value out, unchanged (raw mode: the tty translates nothing), then the pty's own
        # output processing again.
        before = len(t.output)
        await t.run(
            'stty raw -echo; python3 -c \'import sys; sys.stdout.buffer.write(bytes(range(256)) + b"<e" + b"nd>")\''
            "; stty sane",
            b"<end>",
        )
        assert bytes(range(256)) + b"<end>" in t.output[before:]
        await t.close()

        # Input: bytes that are not UTF-8 reach the program as sent (base64), and text as UTF-8.
        od = await Term.open(c, command="stty raw -echo; head -c 9 | od -An -tx1")
        await c.call(
            "terminal_input", terminal=od.id, data=base64.b64encode(b"\xff\xc3(\x00").decode(), encoding="base64"
        )
        await od.type("é\x1b[A")
        assert (await od.ended())["exit_code"] == 0
        assert b" ff c3 28 00 c3 a9 1b 5b 41" in od.output


async def test_a_megabyte_of_escape_sequences_arrives_intact(srv):
    """More than the pty, the agent's pipe and one frame hold: every byte, in order, through flow control."""
    program = (
        "import os\n"
        "chunk = bytes(range(256)) + b'\\x1b[1;31m\\xe2\\x82\\xac\\xc3\\x1b[0m\\r\\n'\n"
        "view = memoryview(chunk * 4000)\n"
        "while view:  # a terminal may take less than asked (gVisor's takes 128 KiB at most)\n"
        "    view = view[os.write(1, view) :]\n"
    )
    chunk = bytes(range(256)) + b"\x1b[1;31m\xe2\x82\xac\xc3\x1b[0m\r\n"
    async with await connect(srv) as c:
        assert (await c.call("write_file", path="blob.py", content=program))["ok"]
        t = await Term.open(c, command="stty raw -echo; exec python3 blob.py")
        done = await t.ended()
        assert done["ok"] and done["exit_code"] == 0, done
        assert len(c.of(t.id, "terminal_output")) > 4  # many frames
        assert hashlib.sha256(t.output).hexdigest() == hashlib.sha256(chunk * 4000).hexdigest()


async def test_stty_size_follows_a_resize(srv):
    async with await connect(srv) as c:
        t = await Term.open(c, cols=91, rows=27)
        await t.run("stty size; echo size-shown", b"27 91\r\n")
        done = await c.call("resize_terminal", terminal=t.id, cols=132, rows=43)
        assert done["ok"] and (done["cols"], done["rows"]) == (132, 43), done
        await t.run("stty size", b"43 132\r\n")
        # A program in the foreground is told (SIGWINCH) while it runs.
        program = (
            "import os, signal; signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGWINCH]); "
            'print("wait" + "ing", flush=True); signal.sigwait([signal.SIGWINCH]); '
            'print("now", *os.get_terminal_size())'
        )
        await t.run(f"python3 -c '{program}'", b"waiting")
        await c.call("resize_terminal", terminal=t.id, cols=70, rows=20)
        await t.until(b"now 70 20")

        bad = await c.call("resize_terminal", terminal=t.id, cols=0, rows=20)
        assert not bad["ok"] and bad["error"]["name"] == "ValueError", bad
        await t.close()


# Processes whose command line is exactly `sleep 100` (the shell's fork has become sleep: after its tcsetpgrp).
SLEEPING = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c '^sleep 100 $'"


async def test_ctrl_c_stops_sleep_and_the_shell_goes_on(srv):
    async with await connect(srv) as c:
        t = await Term.open(c)
        await t.run("echo started; sleep 100", b"started\r\n")
        # A Ctrl-C before sleep is the foreground job would reach the shell instead (a user sees sleep run first).
        async with asyncio.timeout(WAIT):
            while WSClient.text(await c.request("exec", command=SLEEPING)).strip() != "1":
                pass
        await t.type("\x03")
        await t.run("echo code=$?", b"code=130")
        assert t.done is None  # the shell itself lives on
        await t.close()


CURSES = """import curses

def main(scr):
    scr.clear()
    scr.addstr(5, 10, "groundloop-curses")
    scr.addstr(6, 10, "size %dx%d" % (curses.COLS, curses.LINES))
    scr.refresh()

curses.wrapper(main)
"""


async def test_a_full_screen_program(srv):
    """A curses program: the alternate screen, cursor addressing and its text, as written."""
    async with await connect(srv) as c:
        assert (await c.call("write_file", path="screen.py", content=CURSES))["ok"]
        t = await Term.open(c, cols=100, rows=30, command="python3 screen.py")
        done = await t.ended()
        assert done["ok"] and done["exit_code"] == 0, (done, t.output)
        out = t.output
        enter, leave = out.find(b"\x1b[?1049h"), out.rfind(b"\x1b[?1049l")  # xterm-256color's smcup, rmcup
        assert 0 <= enter < out.find(b"groundloop-curses") < leave, out
        assert b"size 100x30" in out
        assert b"\x1b[6;11H" in out  # row 5, column 10 (counted from 1 on the wire)


async def test_top_and_less_on_the_terminal(srv):
    """The standard image's own full-screen tools: `top -b -n 1` lists the shell's processes, and `less` on a
    file shows its first screen on the alternate screen, then leaves on `q`."""
    async with await connect(srv) as c:
        lines = "".join(f"line-{i:03d}\n" for i in range(200))
        assert (await c.call("write_file", path="long.txt", content=lines))["ok"]
        t = await Term.open(c, cols=80, rows=24)
        await t.run("top -b -n 1 | head -20; echo top-$((6 * 7))", b"top-42")
        assert b"PID" in t.output and b"%Cpu" in t.output, t.output
        mark = len(t.output)
        await t.type("less long.txt\r")
        screen = (await t.until(b"line-022"))[mark:]
        assert b"\x1b[?1049h" in screen or b"\x1b[?47h" in screen, screen  # the alternate screen
        assert b"line-000" in screen and b"line-100" not in screen  # one screenful, from the top
        await t.type("q")
        await t.run("echo after-less-$((1 + 2))", b"after-less-3")
        await t.close()


async def test_a_closed_terminal_takes_its_processes_with_it(srv):
    count = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done | grep -c 'sleep 100[0-9]'"
    async with await connect(srv) as c:
        t = await Term.open(c)
        # A background job (its own process group), and one that ignores SIGHUP.
        await t.run("sleep 1001 & nohup sleep 1002 >/dev/null 2>&1 & echo bg-started", b"\r\nbg-started")
        async with asyncio.timeout(WAIT):  # until both forks of the shell have become sleep
            while WSClient.text(await c.request("exec", command=count)).strip() != "2":
                pass
        closed = await t.close()
        assert t.done["ok"] and t.done["exit_code"] == closed["exit_code"], t.done
        assert WSClient.text(await c.request("exec", command=count)).strip() == "0"

        # The shell's own exit ends the terminal, and what it left running goes too.
        t = await Term.open(c)
        await t.run("nohup sleep 1003 >/dev/null 2>&1 & echo again", b"\r\nagain")
        async with asyncio.timeout(WAIT):
            while WSClient.text(await c.request("exec", command=count)).strip() != "1":
                pass
        await t.type("exit 3\r")
        assert (await t.ended())["exit_code"] == 3
        assert WSClient.text(await c.request("exec", command=count)).strip() == "0"

        gone = await c.call("terminal_input", terminal=t.id, data="x")
        assert not gone["ok"] and gone["error"]["name"] == "TerminalNotFound", gone


async def test_terminals_are_bounded_and_named_by_their_request(srv):
    async with await connect(srv) as c:
        a = await Term.open(c)
        b = await Term.open(c)
        third = await Term.open(c)
        refused = await third.ended()
        assert not refused["ok"] and refused["error"]["name"] == "TooManyTerminals", refused
        await a.run("echo a-$((1 + 1))", b"a-2")
        await b.run("echo b-$((2 + 2))", b"b-4")
        assert b"a-2" not in b.output and b"b-4" not in a.output
        await a.close()
        d = await Term.open(c)  # room again
        await d.run("echo d-$((3 + 3))", b"d-6")
        # Cancelling the open request closes its terminal.
        assert (await c.call("cancel", target=d.id))["found"]
        ended = await d.ended()
        assert not ended["ok"] and ended["error"]["name"] == "Cancelled", ended
        await b.close()
        unknown = await c.call("close_terminal", terminal="never-opened")
        assert not unknown["ok"] and unknown["error"]["name"] == "TerminalNotFound", unknown
        missing = await c.call("open_terminal", cols=80)
        assert not missing["ok"] and missing["error"]["name"] == "BadRequest", missing


async def test_input_the_program_does_not_read_is_bounded(srv):
    """A program that reads nothing: its input waits up to 1 MiB in the sandbox, then is refused, never dropped."""
    async with await connect(srv) as c:
        t = await Term.open(c, command="stty raw -echo; echo ready; exec sleep 100")
        await t.until(b"ready")
        chunk = "y" * (512 << 10)
        answers = []
        for _ in range(8):
            answers.append(await c.call("terminal_input", terminal=t.id, data=chunk))
            if not answers[-1]["ok"]:
                break
        assert answers[0]["ok"] and answers[0]["bytes"] == len(chunk), answers[0]
        refused = answers[-1]
        assert not refused["ok"] and refused["error"]["name"] == "TerminalBusy", refused
        await t.close()


async def test_a_resumed_client_gets_the_output_it_missed_once(srv):
    async with await connect(srv) as c:
        t = await Term.open(c)
        await t.run("echo first-$((5 * 5))", b"first-25")
        await t.type("sleep 1; echo while-away-$((6 * 7))\r")
        await c.ws.close()
        session, last_seq, seen = c.session_id, c.last_seq, t.output

    async with await WSClient.connect(srv.url, token="tok1", session=session, last_seq=last_seq) as c2:
        t2 = Term(c2, t.id)
        await t2.until(b"while-away-42")
        whole = seen + t2.output
        assert whole.count(b"first-25") == 1 and whole.count(b"while-away-42") == 1
        await t2.run("echo still-$((7 * 7))", b"still-49")  # the terminal is still this session's
        await t2.close()
