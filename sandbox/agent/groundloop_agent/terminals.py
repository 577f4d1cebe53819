"""Terminals: a program on a pseudo-terminal, its raw output streamed, its input and size set by requests.

A terminal lives as long as its ``open_terminal`` request: the op's handler
forks the program (a login shell by default) as the leader of a new session
whose controlling terminal is the pty's slave, streams every read of the
master as a ``tout`` event (the bytes base64-encoded: a terminal's output is
bytes, often not UTF-8, and must reach the client unchanged), and answers its
``done`` when the leader exits. Then the rest of the leader's session is
killed: a terminal's processes die with it.

``terminal_input``, ``resize_terminal`` and ``close_terminal`` name the
terminal by the key the server chose (``terminal``). Input is written to the
master without blocking; what the program has not read yet waits in a buffer
bounded by INPUT_MAX. Close hangs the session up (SIGHUP), and kills what is
left after INTERRUPT_GRACE.

Flow control: a terminal is in ``agent.pipes`` like a pipe, so a full frame
stream stops its reads; the program then blocks in its write.

Why a fork by hand: the child must call setsid and TIOCSCTTY before exec,
which subprocess cannot do without ``preexec_fn`` (no safer: both run Python
in the child). The child runs only setsid, ioctl, dup2, signal resets, chdir
and execve, and leaves with ``os._exit``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import fcntl
import os
import shutil
import signal
import struct
import termios
import threading
from typing import TYPE_CHECKING

from .common import INTERRUPT_GRACE, WORKDIR, RequestError, oom_first, shell_argv
from .pipes import Reader
from .procs import descendants

if TYPE_CHECKING:
    from .agent import Agent

READ_MAX = 64 * 1024  # bytes of one read, so of one tout frame (before base64)
DRAIN_IDLE = 0.5  # seconds without output, after the leader's exit, that end the terminal anyway (gVisor: no EIO)
INPUT_MAX = 1 << 20  # input the program has not read yet; more is refused (TerminalBusy)
DIM_MAX = 4096  # columns or rows
MAX_TERMINALS = 8  # when the server names no bound
IUTF8 = getattr(termios, "IUTF8", 0o40000)  # Linux's value; Python has the name from 3.12 on
TERM_ENV = {"TERM": "xterm-256color", "COLORTERM": "truecolor"}
# Dispositions the agent changed (Python ignores SIGPIPE) or a shell needs at their default.
RESET_SIGNALS = (
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTSTP,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGPIPE,
    signal.SIGHUP,
    signal.SIGTERM,
    signal.SIGCHLD,
    signal.SIGXFSZ,
)


def _kernel_sends_line_signals() -> bool:
    """False under gVisor (release 20221219 at least): its pty neither turns Ctrl-C, Ctrl-\\ and Ctrl-Z into
    signals nor sends SIGWINCH on a resize, and no process outside the terminal's session can ask it for its
    foreground process group. There the session's leader is a relay (``_relay``) that does both for the
    agent. Its fake kernel version is how gVisor is known: every release says the same."""
    try:
        with open("/proc/version") as f:
            return "#1 SMP Sun Jan 10 15:06:54 PST 2016" not in f.read()
    except OSError:
        return True


LINE_SIGNALS = _kernel_sends_line_signals()
SIGNAL_KEYS = ((termios.VINTR, signal.SIGINT), (termios.VQUIT, signal.SIGQUIT), (termios.VSUSP, signal.SIGTSTP))


def login_shell() -> list[str]:
    shell = shutil.which("bash") or "/bin/sh"
    return [shell, "-l"]


def dimension(req: dict, name: str) -> int:
    value = req.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= DIM_MAX:
        raise RequestError("ValueError", f"`{name}` must be an integer from 1 to {DIM_MAX}")
    return value


def session_members(sid: int) -> list[int]:
    """Every process of session ``sid`` (from /proc), and every descendant of its leader."""
    found = set(descendants(sid))
    try:
        names = os.listdir("/proc")
    except OSError:
        return sorted(found)
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[3]) == sid:  # state, ppid, pgrp, session
                found.add(int(name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(found)


def signal_session(sid: int, sig: int) -> None:
    for pid in session_members(sid):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Terminal(Reader):
    """One program on a pty; registered in ``agent.pipes`` for flow control (``start``/``stop``)."""

    def __init__(self, agent: Agent, key: str, rid: str, argv: list[str], cwd: str, env: dict, cols: int, rows: int):
        self.agent = agent
        self.key = key
        self.rid = rid
        self.pending = bytearray()  # input not written yet
        self.reading = self.writing = self.eof = False
        self.activity = asyncio.Event()  # set by every read (and the end of the output)
        master, slave = os.openpty()
        try:
            attrs = termios.tcgetattr(slave)
            attrs[0] |= IUTF8  # the line editor erases whole UTF-8 characters
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
            self.pid = os.fork()
            if self.pid == 0:
                _child(master, slave, argv, cwd, env)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.fd = master
        os.set_blocking(master, False)
        loop = agent.loop
        self.exited: asyncio.Future[int] = loop.create_future()
        self.ended: asyncio.Future[None] = loop.create_future()  # set once the open request's done is sent
        # A thread per terminal reaps it (as asyncio's ThreadedChildWatcher does): the agent's loop has no
        # child watcher of its own for a pid it forked, and waitpid(-1) would steal asyncio's children.
        threading.Thread(target=self._wait, name=f"terminal-{self.pid}", daemon=True).start()
        agent.pipes.add(self)
        if not agent.out.paused:
            self.start()

    def _wait(self) -> None:
        _, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        try:
            self.agent.loop.call_soon_threadsafe(self._exited, 128 - code if code < 0 else code)
        except RuntimeError:  # the agent's loop closed first (it is shutting down)
            pass

    def _exited(self, code: int) -> None:
        if not self.exited.done():
            self.exited.set_result(code)

    # ---- output

    def more(self) -> bool:
        return not self.eof and self.fd >= 0

    def read_some(self) -> bool:
        """One read of the master into a frame; False when nothing more is there now."""
        try:
            data = os.read(self.fd, READ_MAX)
        except BlockingIOError:
            return False
        except OSError:  # EIO: no process holds the slave any more
            data = b""
        self.activity.set()
        if not data:
            self.eof = True
            self.stop()
            return False
        self.agent.out.send({"ev": "tout", "rid": self.rid, "data": base64.b64encode(data).decode("ascii")})
        return True

    # ---- input

    def write(self, data: bytes) -> None:
        if len(self.pending) + len(data) > INPUT_MAX:
            raise RequestError(
                "TerminalBusy",
                f"the terminal's program has not read {len(self.pending)} bytes of its input; "
                f"at most {INPUT_MAX} bytes may wait",
            )
        if not LINE_SIGNALS:
            data = self.signal_keys(data)
        self.pending += data
        if not self.writing:
            self.on_writable()

    def on_writable(self) -> None:
        while self.pending:
            try:
                n = os.write(self.fd, self.pending)
            except BlockingIOError:
                break
            except OSError:  # the program is gone: its input goes with it
                self.pending.clear()
                break
            del self.pending[:n]
        want = bool(self.pending)
        if want != self.writing:
            if want:
                self.agent.loop.add_writer(self.fd, self.on_writable)
            else:
                self.agent.loop.remove_writer(self.fd)
            self.writing = want

    def signal_keys(self, data: bytes) -> bytes:
        """What a line discipline with ISIG does, for a kernel that does not: each signal key in ``data``
        signals the foreground process group instead of reaching the program (the input before it is
        flushed, unless NOFLSH). Returns the input left."""
        try:
            attrs = termios.tcgetattr(self.fd)  # gVisor: the master and the slave share one line discipline
        except termios.error:
            return data
        if not attrs[3] & termios.ISIG:
            return data
        keys = {attrs[6][index]: sig for index, sig in SIGNAL_KEYS if attrs[6][index] not in (b"\0", 0)}
        out = bytearray()
        for i in range(len(data)):
            key = data[i : i + 1]
            sig = keys.get(key)
            if sig is None:
                out += key
                continue
            if not attrs[3] & termios.NOFLSH:
                out.clear()
                self.pending.clear()
            self.signal_foreground(sig)
        return bytes(out)

    def signal_foreground(self, sig: int) -> None:
        """Through the relay (the leader, under gVisor): it signals the foreground group it can see."""
        try:
            os.kill(self.pid, sig)
        except OSError:
            pass

    def resize(self, cols: int, rows: int) -> None:
        # The kernel sends SIGWINCH to the foreground process group (gVisor does not: the agent does).
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        if not LINE_SIGNALS:
            self.signal_foreground(signal.SIGWINCH)

    # ---- the end

    async def hang_up(self) -> int:
        """SIGHUP to the terminal's session, SIGKILL after INTERRUPT_GRACE; the leader's exit code."""
        if not self.exited.done():
            signal_session(self.pid, signal.SIGHUP)
            signal_session(self.pid, signal.SIGCONT)  # a stopped job must run to see its SIGHUP
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), INTERRUPT_GRACE)
            except TimeoutError:
                signal_session(self.pid, signal.SIGKILL)
        return await asyncio.shield(self.exited)

    async def drain(self) -> None:
        """After the leader's exit and its session's end: read on to the end of the output (EIO, once no
        process holds the slave and the master has nothing left). An empty read (EAGAIN) is no end: the
        pty moves a writer's bytes to the master asynchronously (Linux's flip buffers), so a program's last
        bytes can still be on their way when it has exited. (gVisor never says EIO: there the idle limit ends it.) A process that escaped the session (setsid) and keeps the
        slave open must not hold the terminal forever: DRAIN_IDLE without a byte while reading ends it.
        While the frame stream is paused (a slow client) there is no such limit: the output waits for it."""
        while not self.eof:
            self.activity.clear()
            try:
                await asyncio.wait_for(self.activity.wait(), DRAIN_IDLE)
            except TimeoutError:
                if self.reading:
                    return

    def close(self) -> None:
        """Kill what is left of the terminal's session, stop reading and writing, close the master (once)."""
        if self.fd < 0:
            return
        signal_session(self.pid, signal.SIGKILL)
        self.stop()
        if self.writing:
            self.agent.loop.remove_writer(self.fd)
            self.writing = False
        self.agent.pipes.discard(self)
        os.close(self.fd)
        self.fd = -1


def _child(master: int, slave: int, argv: list[str], cwd: str, env: dict) -> None:
    """In the forked child: a new session on the slave, then exec (or, under gVisor, the relay). Never returns."""
    try:
        os.close(master)
        os.setsid()
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
        if not LINE_SIGNALS:
            _relay(slave, argv, cwd, env)
        _exec(slave, argv, cwd, env)
    except BaseException as exc:  # the terminal shows why, then ends with the shell's "not found" code
        message = f"groundloop: cannot start {argv[0]}: {exc}\r\n".encode("utf-8", "replace")
        try:
            try:
                os.write(slave, message)
            except OSError:  # _exec closed it: the terminal is on 0, 1 and 2 by then
                os.write(2, message)
        finally:
            os._exit(127)
    os._exit(127)


def _exec(slave: int, argv: list[str], cwd: str, env: dict) -> None:
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    for sig in RESET_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    # The agent's descriptors are not inheritable, but an exec keeps any that is by mistake (recv_fds gives
    # inheritable ones): none reaches the terminal's program. The wake-up fd first: a signal must not write
    # to its number once closed.
    signal.set_wakeup_fd(-1)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    os.chdir(cwd)
    os.execve(argv[0], argv, env)


RELAYED = (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGWINCH)


def _relay(slave: int, argv: list[str], cwd: str, env: dict) -> None:
    """gVisor only: stay the session's leader, run the program in a process group of its own (the
    foreground one), and pass each of RELAYED that the agent sends on to the foreground group, which
    only a process of the session can name. Ends with the program's exit code. Never returns."""
    # It never execs, so it lets go of the agent's files itself (its frame stream, other terminals).
    os.closerange(3, slave)
    os.closerange(slave + 1, os.sysconf("SC_OPEN_MAX"))
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # tcsetpgrp from a group not in the foreground
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        os.tcsetpgrp(slave, os.getpgrp())
        _exec(slave, argv, cwd, env)
        os._exit(127)

    def forward(sig: int, _frame: object) -> None:
        try:
            os.killpg(os.tcgetpgrp(slave), sig)
        except OSError:
            pass

    for sig in RELAYED:
        signal.signal(sig, forward)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # a hang-up ends the relay too
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    try:
        _, status = os.waitpid(pid, 0)  # handlers run while it waits (PEP 475 retries it)
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
    finally:
        os._exit(127)


class TerminalOps:
    """The terminal ops of the agent (a mixin of Agent, as FileOps is)."""

    terminals: dict[str, Terminal]

    def terminal(self: Agent, req: dict) -> Terminal:
        key = req.get("terminal")
        term = self.terminals.get(key) if isinstance(key, str) else None
        if term is None:
            raise RequestError("TerminalNotFound", "no such terminal: it was closed, or never opened")
        return term

    async def op_open_terminal(self: Agent, req, target, cancel):
        key = req.get("terminal")
        if not isinstance(key, str) or not key:
            raise RequestError("ValueError", "terminal must be a non-empty string")
        if key in self.terminals:
            raise RequestError("ValueError", "a terminal of that name is open")
        limit = req.get("max_terminals") or MAX_TERMINALS
        if len(self.terminals) >= limit:
            raise RequestError("TooManyTerminals", f"this session has {len(self.terminals)} terminals open, the most")
        cols, rows = dimension(req, "cols"), dimension(req, "rows")
        command = req.get("command")
        if command is not None and not isinstance(command, str):
            raise RequestError("ValueError", "command must be a string")
        argv = shell_argv(command) if command else oom_first(login_shell())
        cwd = self.path(req.get("cwd") or WORKDIR)
        if not os.path.isdir(cwd):
            raise RequestError("FileNotFoundError", f"no directory {cwd}")
        env = self.env_for({**TERM_ENV, **(req.get("env") or {})})
        try:
            term = Terminal(self, key, req["rid"], argv, cwd, env, cols, rows)
        except OSError as exc:
            raise RequestError("TerminalUnavailable", f"no pseudo-terminal: {exc}") from None
        self.terminals[key] = term
        hangup: asyncio.Future | None = None

        def on_cancel() -> None:
            nonlocal hangup
            hangup = asyncio.ensure_future(term.hang_up())

        cancel.on(on_cancel)
        try:
            code = await asyncio.shield(term.exited)
            signal_session(term.pid, signal.SIGKILL)  # the terminal's processes end with it
            await term.drain()
        finally:
            if self.terminals.get(key) is term:
                del self.terminals[key]
            term.close()
            # The close that waits for this terminal answers after this request's done (it is sent on
            # return, before the loop runs the close's next step).
            self.loop.call_soon(lambda: term.ended.done() or term.ended.set_result(None))
        if cancel.is_set:
            raise RequestError("Cancelled", "the request was cancelled and the terminal closed", exit_code=code)
        return {"exit_code": code}

    async def op_terminal_input(self: Agent, req, target, cancel):
        term = self.terminal(req)
        data = req.get("data")
        if not isinstance(data, str):
            raise RequestError("ValueError", "data must be a string")
        if req.get("encoding") == "base64":
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError("ValueError", "data is not valid base64") from None
        else:
            raw = data.encode("utf-8", "surrogatepass")
        term.write(raw)
        return {"bytes": len(raw)}

    async def op_resize_terminal(self: Agent, req, target, cancel):
        term = self.terminal(req)
        cols, rows = dimension(req, "cols"), dimension(req, "rows")
        term.resize(cols, rows)
        return {"cols": cols, "rows": rows}

    async def op_close_terminal(self: Agent, req, target, cancel):
        term = self.terminal(req)
        code = await term.hang_up()
        await asyncio.shield(term.ended)
        return {"exit_code": code}
