"""Reading children's output from pipes as they write it, into line frames of a request or process."""

from __future__ import annotations

import asyncio
import codecs
import os
import re
from typing import TYPE_CHECKING

from .common import LINE_MAX, MAX_OUTPUT
from .wire import Out

if TYPE_CHECKING:
    from .agent import Agent

READ_CHUNK = 256 * 1024
DISPLAY_ID_MAX = 256  # characters of a display's id that the server gets (IPython's are 32)
LINES = re.compile(r"[^\n]*\n")
JSON_SPECIAL = bytes(c for c in range(0x20) if c != 0x0A) + b'"\\'  # bytes JSON must escape, but newline

# --------------------------------------------------------------------------
# Reading children's output.


class Target:
    """Where the lines of a pipe go: a request (run, exec) or a process."""

    def __init__(
        self, agent: Agent, rid: str | None = None, proc: str | None = None, cap: int = MAX_OUTPUT, frame_max: int = 0
    ):
        self.agent = agent
        self.rid = rid
        self.proc = proc
        self.cap = cap
        self.frame_max = frame_max  # the server's bound on one frame (0: none given)
        self.sent = 0
        self.truncated = False

    def emit_ascii(self, stream: str, region: bytes) -> bool:
        """Send whole lines given as bytes, when that needs no JSON escaping but their newlines
        (printable ASCII, the bulk of most output) and they fit the cap: the frame is made with
        two byte-string operations instead of a JSON encoder. False: use ``emit``."""
        if self.truncated or self.sent + len(region) > self.cap or not region.isascii():
            return False
        if len(region.translate(None, JSON_SPECIAL)) != len(region):
            return False
        self.sent += len(region)
        head = Out.encode(self.frame(stream, []))[:-3] + b'"'  # the frame up to its first line: ...,"lines":["
        self.agent.out.send_raw(head + region.replace(b"\n", b'\\n","')[:-2] + b"]}\n")
        return True

    def frame(self, stream: str, lines: list[str]) -> dict:
        """The ``out`` (of a request) or ``pout`` (of a process) frame of ``lines``."""
        if self.rid is not None:
            return {"ev": "out", "rid": self.rid, "s": stream, "lines": lines}
        return {"ev": "pout", "proc": self.proc, "s": stream, "lines": lines}

    def emit_result(self, data, main: bool, display_id=None, update=False) -> None:
        """Send a MIME bundle of a run (with ``display_id``: a display, which one with ``update`` replaces);
        its frame counts against the output cap like lines do."""
        if self.truncated:
            return
        ev = {"ev": "result", "rid": self.rid, "data": data, "main": bool(main)}
        if isinstance(display_id, str) and display_id:
            ev["display_id"] = display_id[:DISPLAY_ID_MAX]
            if update:
                ev["update"] = True
        try:
            frame = Out.encode(ev)
        except (TypeError, ValueError, RecursionError):
            # Not strict JSON (a NaN from a worker, a value nested past any parser's depth): the text forms
            # alone, rather than a frame the server refuses (which would lose the whole sandbox).
            ev["data"] = {k: v for k, v in (data or {}).items() if isinstance(v, str)} if isinstance(data, dict) else {}
            frame = Out.encode(ev)
        self.send_counted(frame)

    def emit_clear(self, wait: bool) -> None:
        """The run's ``clear_output(wait)``: what it showed so far is to be cleared (at its next output)."""
        if not self.truncated:
            self.send_counted(Out.encode({"ev": "clear", "rid": self.rid, "wait": wait}))

    def send_counted(self, frame: bytes) -> None:
        if self.sent + len(frame) > self.cap:
            self.truncated = True
            return
        self.sent += len(frame)
        self.agent.out.send_raw(frame)

    def emit(self, stream: str, lines: list[str], sizes: list[int] | None = None) -> None:
        """Send lines on; ``sizes`` are their lengths in bytes as read (counted against the cap)."""
        if self.truncated:
            return
        if sizes is None:
            sizes = [len(line.encode("utf-8", "surrogatepass")) for line in lines]
        total = sum(sizes)
        if self.sent + total <= self.cap:
            self.sent += total
            keep = lines
        else:
            keep = []
            for line, n in zip(lines, sizes, strict=True):
                if self.sent + n > self.cap:
                    self.truncated = True
                    break
                self.sent += n
                keep.append(line)
        if keep:
            self.agent.out.send(self.frame(stream, keep))


class Reader:
    """An fd that the agent's loop reads while the output to the server is not paused: every reader is in
    ``agent.pipes``, which ``Agent.pause_pipes``/``resume_pipes`` stop and start together."""

    agent: Agent
    fd: int
    reading: bool

    def more(self) -> bool:
        """Whether there may be more to read (not at its end)."""
        raise NotImplementedError

    def read_some(self) -> bool:
        """Read what is there; False when nothing more is there now."""
        raise NotImplementedError

    def start(self) -> None:
        if not self.reading and self.more():
            self.agent.loop.add_reader(self.fd, self.on_readable)
            self.reading = True

    def stop(self) -> None:
        if self.reading:
            self.agent.loop.remove_reader(self.fd)
            self.reading = False

    def on_readable(self) -> None:
        with self.agent.out:
            self.read_some()


class Pipe(Reader):
    """One output pipe of a child: bytes in, decoded lines out to a target."""

    def __init__(self, agent: Agent, fd: int, stream: str, target: Target | None, line_max: int = LINE_MAX):
        self.agent = agent
        self.fd = fd
        self.stream = stream
        self.target = target
        self.line_max = line_max
        self.buf = bytearray()
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.eof = agent.loop.create_future()
        self.reading = False
        os.set_blocking(fd, False)
        agent.pipes.add(self)
        if not agent.out.paused:
            self.start()

    def more(self) -> bool:
        return not self.eof.done()

    def read_some(self) -> bool:
        """Read what is there (up to READ_CHUNK bytes). Return False at EOF/empty."""
        scratch = self.agent.scratch
        try:
            n = os.readv(self.fd, [scratch])  # into a buffer kept for it: no allocation per read
        except BlockingIOError:
            return False
        except OSError:
            n = 0
        if not n:
            self.close()
            return False
        self.feed(scratch[:n])
        return True

    def drain(self) -> None:
        """Synchronously read everything already written to the pipe."""
        while not self.eof.done() and self.read_some():
            pass

    def feed(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        line_max = self.line_max
        cuts: list[int] = []  # where each piece ends: after a newline, or line_max bytes into a long line
        start = 0
        split_long = False
        while True:
            nl = buf.find(b"\n", start)
            end = len(buf) if nl < 0 else nl + 1
            if end - start > line_max:
                end = start + line_max
                split_long = True
            elif nl < 0:
                break
            cuts.append(end)
            start = end
        if not cuts:
            return
        if split_long:
            # Piece by piece: the decoder carries a character cut at line_max to the next piece.
            lines, sizes, prev = [], [], 0
            for end in cuts:
                text = self.decoder.decode(bytes(buf[prev:end]))
                if text:
                    lines.append(text)
                    sizes.append(end - prev)
                prev = end
        else:
            # Whole lines only (the common case): one decode and one split, or neither for plain ASCII.
            with memoryview(buf) as view:
                region = bytes(view[:start])
            del buf[:start]
            target = self.target
            if target is None:
                return
            if not self.decoder.getstate()[0] and target.emit_ascii(self.stream, region):
                return
            lines = LINES.findall(self.decoder.decode(region))
            sizes = [b - a for a, b in zip([0, *cuts], cuts, strict=False)]
            target.emit(self.stream, lines, sizes)
            return
        del buf[:start]
        if lines and self.target is not None:
            self.target.emit(self.stream, lines, sizes)

    def flush_partial(self) -> None:
        """Send what is left without a newline (the end of a run, or of the pipe)."""
        if self.buf:
            size = len(self.buf)
            text = self.decoder.decode(bytes(self.buf), final=True)
            self.buf.clear()
            self.decoder.reset()
            if text and self.target is not None:
                self.target.emit(self.stream, [text], [size])

    def close(self) -> None:
        """Stop reading and close the fd, once. A pipe closes itself at its end (read_some), and its owner
        closes it again when it is done with it (Context.stop, finish_pipes): a second os.close of the number
        would close whatever took that number in between (a spare's socket, a new context's pipe)."""
        if self.fd < 0:
            return
        self.stop()
        self.flush_partial()
        self.agent.pipes.discard(self)
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)
        except OSError:
            pass
        if not self.eof.done():
            self.eof.set_result(None)


async def spawn(
    agent: Agent,
    argv: list[str],
    cwd: str,
    env: dict,
    target: Target | None,
    extra_fds: tuple = (),
    line_max: int = LINE_MAX,
):
    """Start a child in its own session with stdout and stderr on pipes."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            cwd=cwd,
            env=env,
            start_new_session=True,
            pass_fds=extra_fds,
            close_fds=True,
        )
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        # Once each: the agent has threads (the memory guard, file transfers) that may open a descriptor at any
        # moment, and a second close of a number would close theirs.
        os.close(out_w)
        os.close(err_w)
    pipes = (Pipe(agent, out_r, "stdout", target, line_max), Pipe(agent, err_r, "stderr", target, line_max))
    return proc, pipes


async def finish_pipes(pipes) -> None:
    """After a child exited: read what its pipes still hold, then close them.

    The pipes end when their last writer closes; a grandchild left in the
    background must not hold the request open, so the wait is short.
    """
    await asyncio.wait([p.eof for p in pipes], timeout=0.2)
    for p in pipes:
        p.drain()
        p.close()
