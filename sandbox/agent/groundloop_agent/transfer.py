"""Chunked transfers: upload_file / upload_chunk and download_file, never a whole file in memory.

An upload is one long request (``upload_file``): it creates a temporary file
next to its target (``.<name>.upload-<rid>``, the same file system, so the
last step is an atomic rename), then waits. Its chunks come as requests of
their own (``upload_chunk``, naming the upload by its rid), each written at
its offset (pwrite) in a worker thread and released; each written chunk sends
a ``progress`` event on the upload's rid. When ``size`` bytes are written the
file is renamed into place and the upload ends with its size and sha256. An
upload cancelled, failed (a bad chunk, a full disk) or abandoned (no chunk
for ``idle_s``) removes its temporary file.

A download (``download_file``) reads the file ``chunk_bytes`` at a time and
sends each chunk as a ``chunk`` event (base64), waiting while the agent's
stdout is paused: at most about two chunks are ever held, whatever the size.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import os
import stat

from .common import MAX_FILE, RequestError, os_error
from .files import _not_regular, _open_regular

CHUNK_DEFAULT = 1 << 20
CHUNK_MIN = 1 << 10
CHUNK_MAX = 8 << 20
IDLE_DEFAULT_S = 60.0


class Upload:
    __slots__ = (
        "rid",
        "path",
        "tmp",
        "fd",
        "size",
        "reserved",
        "written",
        "sha",
        "activity",
        "opened",
        "finished",
        "error",
        "writes",
        "quiet",
    )

    def __init__(self, rid: str, path: str, tmp: str, fd: int, size: int):
        self.rid = rid
        self.path = path
        self.tmp = tmp
        self.fd = fd
        self.size = size
        self.reserved = 0  # bytes promised to chunks accepted so far (the next chunk's offset)
        self.written = 0
        self.sha = hashlib.sha256()
        self.activity = asyncio.Event()
        self.opened = asyncio.Event()
        self.writes = 0  # chunks being written in a thread: the descriptor stays open until they are done
        self.quiet = asyncio.Event()
        self.quiet.set()
        self.finished = asyncio.Event()
        self.error: RequestError | None = None


class Writable:
    """Set while the agent's stdout takes frames; registered with the pipes so the agent's flow control reaches it."""

    def __init__(self, agent):
        self.event = asyncio.Event()
        if not agent.out.paused:
            self.event.set()

    def start(self) -> None:
        self.event.set()

    def stop(self) -> None:
        self.event.clear()


def _check_target(path: str) -> None:
    """The upload's directory exists (parents are created, as write_file does); its target, if any, is a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class TransferOps:
    """upload_file, upload_chunk, download_file (a mixin of the Agent)."""

    uploads: dict[str, Upload]

    async def op_upload_file(self, req, target, cancel):
        path = self.path(req.get("path"))
        size = req.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RequestError("ValueError", "size must be a non-negative integer")
        cap = int(req.get("max_file_bytes") or MAX_FILE)
        if size > cap:
            raise RequestError("FileTooLarge", f"{size} bytes is over the file size limit of {cap} bytes")
        idle = float(req.get("idle_s") or IDLE_DEFAULT_S)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.upload-{target.rid}")
        # Registered before the first await: a chunk sent right behind its upload_file finds it (and waits for
        # ``opened``).
        up = self.uploads[target.rid] = Upload(target.rid, path, tmp, -1, size)
        try:
            await asyncio.to_thread(_check_target, path)
            up.fd = await asyncio.to_thread(
                os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644
            )
        except BaseException as exc:
            up.error = exc if isinstance(exc, RequestError) else os_error(exc) if isinstance(exc, OSError) else None
            up.finished.set()
            self.uploads.pop(target.rid, None)
            if up.error is not None:
                raise up.error from None
            raise
        finally:
            up.opened.set()
        committed = False
        stop = asyncio.ensure_future(cancel.wait())
        try:
            while not up.finished.is_set() and size:
                activity = asyncio.ensure_future(up.activity.wait())
                finished = asyncio.ensure_future(up.finished.wait())
                try:
                    done, _ = await asyncio.wait(
                        {stop, activity, finished}, timeout=idle, return_when="FIRST_COMPLETED"
                    )
                finally:
                    activity.cancel()
                    finished.cancel()
                if stop in done:
                    raise RequestError("Cancelled", "the upload was cancelled; nothing was written to " + path)
                if not done:
                    raise RequestError("UploadAbandoned", f"no chunk came for {idle:g} s; the upload was dropped")
                up.activity.clear()
            if up.error is not None:
                raise up.error
            try:
                await asyncio.to_thread(os.rename, tmp, path)
            except OSError as exc:
                raise os_error(exc)
            committed = True
            return {"path": path, "size": size, "sha256": up.sha.hexdigest()}
        finally:
            stop.cancel()
            self.uploads.pop(target.rid, None)
            up.finished.set()
            await up.quiet.wait()  # a write still in its thread must not meet a closed (or reused) descriptor
            os.close(up.fd)
            if not committed:
                await asyncio.to_thread(_unlink, tmp)

    async def op_upload_chunk(self, req, target, cancel):
        up = self.uploads.get(req.get("upload"))
        if up is None or up.finished.is_set():
            raise RequestError("UploadNotFound", "no upload in progress with that id")
        content = req.get("content")
        offset = req.get("offset")
        if not isinstance(content, str):
            raise RequestError("ValueError", "content must be a string (base64)")
        try:
            data = base64.b64decode(content, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise RequestError("ValueError", f"content is not valid base64: {exc}")
        if offset != up.reserved:
            raise RequestError("BadOffset", f"expected the chunk at offset {up.reserved}, got {offset!r}")
        if up.reserved + len(data) > up.size:
            up.error = RequestError("TooMuchData", f"the chunks are over the declared size of {up.size} bytes")
            up.finished.set()
            raise up.error
        # Reserved and hashed now, in arrival order; written in any order (pwrite at the offset).
        up.reserved += len(data)
        up.sha.update(data)
        up.activity.set()
        await up.opened.wait()
        if up.error is not None:
            raise up.error
        up.writes += 1
        up.quiet.clear()
        try:
            await asyncio.to_thread(_pwrite_all, up.fd, data, offset)
        except OSError as exc:
            up.error = os_error(exc)
            up.finished.set()
            raise up.error
        finally:
            up.writes -= 1
            if not up.writes:
                up.quiet.set()
        up.written += len(data)
        self.out.send({"ev": "progress", "rid": up.rid, "bytes": up.written, "total": up.size})
        if up.written == up.size:
            up.finished.set()
        return {"received": up.written}

    async def op_download_file(self, req, target, cancel):
        path = self.path(req.get("path"))
        cap = int(req.get("max_file_bytes") or MAX_FILE)
        chunk = min(CHUNK_MAX, max(CHUNK_MIN, int(req.get("chunk_bytes") or CHUNK_DEFAULT)))
        try:
            fd = await asyncio.to_thread(_open_regular, path, os.O_RDONLY)
        except IsADirectoryError:
            raise RequestError("IsADirectoryError", f"{path} is a directory")
        except OSError as exc:
            raise os_error(exc)
        writable = Writable(self)
        self.pipes.add(writable)
        try:
            size = os.fstat(fd).st_size
            if size > cap:
                raise RequestError("FileTooLarge", f"{path} is {size} bytes, over the limit of {cap} bytes")
            sha, offset = hashlib.sha256(), 0
            while True:
                if cancel.is_set:
                    raise RequestError("Cancelled", "the download was cancelled")
                await writable.event.wait()
                try:
                    data = await asyncio.to_thread(os.pread, fd, chunk, offset)
                except OSError as exc:
                    raise os_error(exc)
                if not data:
                    break
                if offset + len(data) > cap:
                    raise RequestError("FileTooLarge", f"{path} grew over the limit of {cap} bytes while being read")
                sha.update(data)
                content = base64.b64encode(data).decode()
                self.out.send({"ev": "chunk", "rid": target.rid, "offset": offset, "content": content, "size": size})
                offset += len(data)
            return {"path": path, "size": offset, "sha256": sha.hexdigest()}
        finally:
            self.pipes.discard(writable)
            os.close(fd)
