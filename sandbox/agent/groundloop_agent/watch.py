"""watch_files: inotify (through ctypes: the agent is stdlib only) streamed as ``fev`` events.

One inotify instance per agent (``Hub``), opened at the first watch and closed
with the last: instances are counted per user id by the kernel
(``fs.inotify.max_user_instances``, 128 by default, shared by every runc
sandbox of uid 1000 on the host), watches are cheap. The instance's
descriptor is read from the agent's loop, non-blocking; while the server is
not reading (the agent's stdout is paused) the hub stops reading it, so the
kernel's queue fills instead of the agent's memory, and past
``max_queued_events`` the kernel says ``IN_Q_OVERFLOW``: that reaches the
client as an ``overflow`` event, never as silent loss.

Each watch_files request is a ``Watch``: its directories (all of the tree
with ``recursive``, bounded by ``max_dirs``), the pairing of moves by cookie
into one ``moved`` event, and the coalescing of ``modified``: the first
change of a path is sent at once and opens a window of ``window_s`` for that
path; changes inside the window are counted and sent as one ``modified``
(with ``count``) when it closes, which opens the next. A program that writes
a file a thousand times makes a few events, not a thousand; a single write
is seen without waiting for the window.

Races that remain (docs/protocol.md says so too): a directory created under a
recursive watch is watched only once its creation is read; what happened
inside it before that is rebuilt by a scan, as ``created`` events (a file
created and deleted in that gap is never seen; one created during the scan
can be reported twice). A move out of the tree is a ``moved_from`` without its
pair: it is reported as ``deleted`` after ``MOVE_PAIR_S``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
import time

from .common import RequestError, os_error

IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_UNMOUNT = 0x2000
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_EXCL_UNLINK = 0x04000000
IN_ISDIR = 0x40000000
MASK = (
    IN_MODIFY
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
    | IN_DONT_FOLLOW
    | IN_EXCL_UNLINK
)
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
READ_MAX = 1 << 16  # bytes read per turn of the loop: other requests get their turn between reads
MOVE_PAIR_S = 0.02  # a moved_from whose moved_to did not come by then left the tree
MAX_BATCH = 512  # events per fev frame
MAX_HELD = 4096  # paths with an open coalescing window per watch; past it the oldest windows close early
SCAN_MAX = 4096  # entries a new directory's scan reports


_libc = None


def _lib():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        _libc.inotify_rm_watch.argtypes = (ctypes.c_int, ctypes.c_int)
    return _libc


def _check(ret: int, path: str = "") -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path or None)
    return ret


class Hub:
    """The agent's one inotify instance; routes each event to the watches of its descriptor."""

    def __init__(self, agent):
        self.agent = agent
        self.fd = -1
        self.reading = False
        self.subs: dict[int, set[Watch]] = {}  # watch descriptor -> the watches that use it

    def open(self) -> None:
        if self.fd < 0:
            self.fd = _check(_lib().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
            self.agent.pipes.add(self)  # paused and resumed with the children's pipes
            if not self.agent.out.paused:
                self.start()

    def add(self, watch: Watch, path: str) -> int:
        """Watch directory ``path`` for ``watch``; the descriptor (shared with any watch of that directory)."""
        self.open()
        wd = _check(_lib().inotify_add_watch(self.fd, os.fsencode(path), MASK), path)
        self.subs.setdefault(wd, set()).add(watch)
        return wd

    def drop(self, watch: Watch, wd: int) -> None:
        subs = self.subs.get(wd)
        if subs is None:
            return
        subs.discard(watch)
        if not subs:
            del self.subs[wd]
            if self.fd >= 0:
                _lib().inotify_rm_watch(self.fd, wd)  # EINVAL when the kernel dropped it first: nothing to do

    def release(self) -> None:
        """Close the instance once no watch uses it."""
        if self.subs or self.fd < 0:
            return
        self.stop()
        self.agent.pipes.discard(self)
        os.close(self.fd)
        self.fd = -1

    # flow control (agent.pause_pipes / resume_pipes)
    def start(self) -> None:
        if not self.reading and self.fd >= 0:
            self.agent.loop.add_reader(self.fd, self.readable)
            self.reading = True

    def stop(self) -> None:
        if self.reading:
            self.agent.loop.remove_reader(self.fd)
            self.reading = False

    def readable(self) -> None:
        try:
            data = os.read(self.fd, READ_MAX)
        except BlockingIOError:
            return
        except OSError as exc:
            self.agent.out.send({"ev": "log", "level": "error", "message": f"inotify read failed: {exc}"})
            return
        touched: set[Watch] = set()
        with self.agent.out:
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, cookie, n = _EVENT.unpack_from(data, pos)
                name = data[pos + _EVENT.size : pos + _EVENT.size + n].split(b"\0", 1)[0]
                pos += _EVENT.size + n
                if mask & IN_Q_OVERFLOW:
                    for w in {w for subs in self.subs.values() for w in subs}:
                        w.overflow("the kernel's event queue overflowed: events were lost")
                        touched.add(w)
                    continue
                for w in list(self.subs.get(wd, ())):
                    w.raw(wd, mask, cookie, os.fsdecode(name))
                    touched.add(w)
                if mask & IN_IGNORED:
                    for w in self.subs.pop(wd, ()):
                        w.forget(wd)
            for w in touched:
                w.flush()


class Watch:
    """One watch_files request: its directories, pending moves, coalescing windows and batch."""

    def __init__(self, hub: Hub, rid: str, root: str, recursive: bool, max_dirs: int, window_s: float):
        self.hub = hub
        self.agent = hub.agent
        self.rid = rid
        self.root = root
        self.recursive = recursive
        self.max_dirs = max_dirs
        self.window_s = window_s
        self.dirs: dict[int, str] = {}  # wd -> directory path
        self.windows: dict[str, float] = {}  # path -> when its coalescing window closes (oldest first)
        self.held: dict[str, list] = {}  # path -> [changes held, is_dir]
        self.moves: dict[int, tuple[str, bool, float]] = {}  # cookie -> (from path, is_dir, when)
        self.batch: list[dict] = []
        self.sent = 0
        self.limited = False
        self.timer: asyncio.TimerHandle | None = None
        self.ended: asyncio.Future = self.agent.loop.create_future()
        self.closed = False

    # ---- directories

    def add_dir(self, path: str) -> bool:
        """Watch ``path``; False (and one overflow event) past max_dirs."""
        if len(self.dirs) >= self.max_dirs:
            if not self.limited:
                self.limited = True
                self.overflow(f"over {self.max_dirs} directories: changes in the others are not watched")
            return False
        try:
            wd = self.hub.add(self, path)
        except OSError as exc:
            if path == self.root:
                raise
            if exc.errno not in (2, 20):  # gone or replaced since: its deletion is reported by its parent
                self.overflow(f"{path} could not be watched: {exc.strerror}")
            return False
        self.dirs[wd] = path
        return True

    def add_tree(self, top: str, report: bool) -> None:
        """Watch ``top`` and (recursive) its subdirectories; with ``report``, what is already in them
        is reported as created (a directory that appeared before its watch: the race of the module doc)."""
        stack, seen = [top], 0
        while stack:
            d = stack.pop()
            if not self.add_dir(d) and d == top:
                return
            if not report and not self.recursive:
                continue
            try:
                with os.scandir(d) as it:
                    for e in it:
                        is_dir = e.is_dir(follow_symlinks=False)
                        if report and seen < SCAN_MAX:
                            seen += 1
                            self.emit("created", e.path, is_dir)
                        if is_dir and self.recursive:
                            stack.append(e.path)
            except OSError:
                continue

    def forget(self, wd: int) -> None:
        path = self.dirs.pop(wd, None)
        if path == self.root:
            self.emit("deleted", path, True)
            self.flush()
            self.end("the watched directory was deleted")

    def _rename_dirs(self, old: str, new: str) -> None:
        for wd, path in self.dirs.items():
            if path == old or path.startswith(old + "/"):
                self.dirs[wd] = new + path[len(old) :]

    def _drop_tree(self, top: str) -> None:
        for wd, path in list(self.dirs.items()):
            if path == top or path.startswith(top + "/"):
                del self.dirs[wd]
                self.hub.drop(self, wd)

    # ---- events

    def raw(self, wd: int, mask: int, cookie: int, name: str) -> None:
        base = self.dirs.get(wd)
        if base is None:
            return
        is_dir = bool(mask & IN_ISDIR)
        if not name:  # an event of the directory itself
            if mask & IN_MOVE_SELF and base == self.root:
                self.emit("deleted", base, True)
                self.end("the watched directory was moved away")
            return
        path = os.path.join(base, name)
        if mask & IN_CREATE:
            self.emit("created", path, is_dir)
            if is_dir and self.recursive:
                self.add_tree(path, report=True)
        elif mask & IN_DELETE:
            self.emit("deleted", path, is_dir)
        elif mask & IN_MOVED_FROM:
            self.moves[cookie] = (path, is_dir, time.monotonic())
            self.arm(MOVE_PAIR_S)
        elif mask & IN_MOVED_TO:
            src = self.moves.pop(cookie, None)
            if src is None:  # moved in from outside the tree
                self.emit("created", path, is_dir)
                if is_dir and self.recursive:
                    self.add_tree(path, report=False)
            else:
                self.emit("moved", path, is_dir, src=src[0])
                if is_dir:
                    self._rename_dirs(src[0], path)
        elif mask & (IN_MODIFY | IN_CLOSE_WRITE):
            self.modified(path, is_dir)

    def modified(self, path: str, is_dir: bool) -> None:
        if path in self.windows:
            held = self.held.get(path)
            if held is None:
                self.held[path] = [1, is_dir]
            else:
                held[0] += 1
            return
        self.emit("modified", path, is_dir)

    def emit(self, kind: str, path: str, is_dir: bool, src: str | None = None, count: int = 0) -> None:
        if src is not None:
            self._release(src)
        if is_dir and kind in ("moved", "deleted"):  # what is held under the directory goes out under its old name
            top = (src or path) + "/"
            for held in [p for p in self.held if p.startswith(top)]:
                self._release(held)
        if kind != "modified" or not count:
            self._release(path)  # a held change goes out before what follows it
        ev: dict = {"kind": kind, "path": path}
        if is_dir:
            ev["is_dir"] = True
        if src is not None:
            ev["from"] = src
        if count > 1:
            ev["count"] = count
        self.batch.append(ev)
        if kind == "deleted":
            self.windows.pop(path, None)
            if is_dir:
                self._drop_tree(path)
        else:
            self.windows.pop(path, None)
            self.windows[path] = time.monotonic() + self.window_s
            if len(self.windows) > MAX_HELD:
                self._release(next(iter(self.windows)), close=True)
            self.arm(self.window_s)
        if len(self.batch) >= MAX_BATCH:
            self.flush()

    def _release(self, path: str, close: bool = False) -> None:
        held = self.held.pop(path, None)
        if close:
            self.windows.pop(path, None)
        if held is not None:
            self.batch.append(
                {"kind": "modified", "path": path, **({"is_dir": True} if held[1] else {}), "count": held[0]}
            )

    def overflow(self, message: str) -> None:
        self.batch.append({"kind": "overflow", "path": self.root, "message": message})

    def flush(self) -> None:
        if self.batch and not self.closed:
            self.sent += len(self.batch)
            self.agent.out.send({"ev": "fev", "rid": self.rid, "events": self.batch})
        self.batch = []

    # ---- timers: closing windows, unpaired moves

    def arm(self, delay: float) -> None:
        if self.timer is None and not self.closed:
            self.timer = self.agent.loop.call_later(delay, self.tick)

    def tick(self) -> None:
        self.timer = None
        now = time.monotonic()
        with self.agent.out:
            for cookie, (path, is_dir, at) in list(self.moves.items()):
                if now - at >= MOVE_PAIR_S:
                    del self.moves[cookie]
                    self.emit("deleted", path, is_dir)  # moved out of the tree
            for path, until in list(self.windows.items()):
                if until > now:
                    break
                held = self.held.pop(path, None)
                del self.windows[path]
                if held is not None:  # the next window opens with this event
                    self.emit("modified", path, held[1], count=held[0])
            self.flush()
        if self.moves:
            self.arm(MOVE_PAIR_S)
        elif self.windows:
            self.arm(max(0.001, min(self.windows.values()) - now))

    # ---- life

    def end(self, reason: str) -> None:
        if not self.ended.done():
            self.ended.set_result(reason)

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for wd in list(self.dirs):
            self.hub.drop(self, wd)
        self.dirs.clear()
        self.hub.release()


class WatchOps:
    """The watch_files op (a mixin of the Agent)."""

    hub: Hub | None = None

    async def op_watch_files(self, req, target, cancel):
        root = self.path(req.get("path") or ".")
        if not os.path.isdir(root):
            raise RequestError(
                "NotADirectoryError" if os.path.exists(root) else "FileNotFoundError", f"{root} is not a directory"
            )
        if self.hub is None:
            self.hub = Hub(self)
        max_dirs = max(1, int(req.get("max_watch_dirs") or 1024))
        window = max(0.0, float(req.get("coalesce_ms") or 0) / 1000)
        w = Watch(self.hub, target.rid, root, bool(req.get("recursive")), max_dirs, window)
        try:
            try:
                w.add_tree(root, report=False)
            except OSError as exc:
                raise os_error(exc)
            with self.out:
                self.out.send({"ev": "watching", "rid": target.rid, "path": root, "watches": len(w.dirs)})
                w.flush()  # an overflow of the set-up, after the watching event
            stop = asyncio.ensure_future(cancel.wait())
            try:
                await asyncio.wait([stop, w.ended], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            if cancel.is_set:
                raise RequestError("Cancelled", "the watch was cancelled")
            return {"path": root, "events": w.sent, "reason": w.ended.result()}
        finally:
            w.end("closed")
            w.close()
