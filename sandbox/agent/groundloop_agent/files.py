"""File operations (write_file, read_file, list_files, delete_file, mkdir).

Every file system call runs in a worker thread: the agent's loop carries every
request of the session, and one slow or blocking call (a FIFO, a device, a
full disk) must not stall them. Reads and writes only touch regular files: the
file is opened non-blocking (an open of a FIFO would otherwise wait for a
writer) and checked with fstat on the descriptor itself, so a path swapped
between check and use cannot get a FIFO or a device past the check.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import stat

from .common import MAX_FILE, RequestError, os_error


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def _not_regular(path: str, mode: int) -> RequestError:
    if stat.S_ISDIR(mode):
        return RequestError("IsADirectoryError", f"{path} is a directory")
    what = {
        stat.S_IFIFO: "a FIFO or pipe",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFSOCK: "a socket",
    }.get(stat.S_IFMT(mode), "not a regular file")
    return RequestError("NotARegularFile", f"{path} is {what}: only regular files can be read or written")


def _open_regular(path: str, flags: int, mode: int = 0o666) -> int:
    """A descriptor of the regular file at ``path``, or RequestError (never blocks on a FIFO)."""
    try:
        st = os.stat(path)  # a FIFO or device is refused before it is even opened
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str, cap: int) -> bytes:
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except IsADirectoryError:
        raise RequestError("IsADirectoryError", f"{path} is a directory")
    except OSError as exc:
        raise os_error(exc)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise RequestError("FileTooLarge", f"{path} is {size} bytes, over the limit of {cap} bytes")
        chunks, n = [], 0
        while n <= cap:
            chunk = os.read(fd, min(1 << 20, cap + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
    except OSError as exc:
        raise os_error(exc)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > cap:
        raise RequestError("FileTooLarge", f"{path} is over the limit of {cap} bytes")
    return data


def write_regular(path: str, data: bytes, parents: bool) -> None:
    try:
        if parents:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        # O_TRUNC only after the check: truncating is harmless on a FIFO, but the check must come first.
        fd = _open_regular(path, os.O_WRONLY | os.O_CREAT)
    except IsADirectoryError:
        raise RequestError("IsADirectoryError", f"{path} is a directory")
    except OSError as exc:
        raise os_error(exc)
    try:
        os.ftruncate(fd, 0)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise os_error(exc)
    finally:
        os.close(fd)


def list_dir(path: str) -> list[dict]:
    entries = []
    try:
        with os.scandir(path) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                entries.append({"name": e.name, "type": _kind(st.st_mode), "size": st.st_size, "mtime": st.st_mtime})
    except OSError as exc:
        raise os_error(exc)
    entries.sort(key=lambda e: e["name"])
    return entries


def delete(path: str, recursive: bool) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            if recursive:
                shutil.rmtree(path)
            else:
                os.rmdir(path)
        else:
            os.unlink(path)
    except OSError as exc:
        raise os_error(exc)


def mkdir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise os_error(exc)


class FileOps:
    """The file ops of the agent (a mixin: ``path`` resolves a request's path)."""

    def path(self, p) -> str:  # pragma: no cover - the Agent's
        raise NotImplementedError

    async def op_write_file(self, req, target, cancel):
        path = self.path(req.get("path"))
        content = req.get("content")
        if not isinstance(content, str):
            raise RequestError("ValueError", "content must be a string")
        enc = req.get("encoding") or "utf-8"
        if enc == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except ValueError as exc:
                raise RequestError("ValueError", f"content is not valid base64: {exc}")
        elif enc in ("utf-8", "utf8"):
            data = content.encode("utf-8", "surrogatepass")
        else:
            raise RequestError("ValueError", f"unknown encoding {enc!r} (utf-8 or base64)")
        cap = int(req.get("max_file_bytes") or MAX_FILE)
        if len(data) > cap:
            raise RequestError("FileTooLarge", f"{len(data)} bytes is over the file size limit of {cap} bytes")
        await asyncio.to_thread(write_regular, path, data, bool(req.get("parents", True)))
        return {"path": path, "size": len(data)}

    async def op_read_file(self, req, target, cancel):
        path = self.path(req.get("path"))
        cap = int(req.get("max_file_bytes") or MAX_FILE)
        enc = req.get("encoding")
        if enc not in (None, "utf-8", "utf8", "base64"):
            raise RequestError("ValueError", f"unknown encoding {enc!r} (utf-8 or base64)")
        data = await asyncio.to_thread(read_regular, path, cap)
        if enc != "base64":
            try:
                return {"content": data.decode("utf-8"), "encoding": "utf-8", "size": len(data)}
            except UnicodeDecodeError:
                if enc:  # asked for text explicitly
                    raise RequestError("UnicodeDecodeError", f"{path} is not valid UTF-8; ask for base64")
        return {"content": base64.b64encode(data).decode(), "encoding": "base64", "size": len(data)}

    async def op_list_files(self, req, target, cancel):
        path = self.path(req.get("path") or ".")
        return {"path": path, "entries": await asyncio.to_thread(list_dir, path)}

    async def op_delete_file(self, req, target, cancel):
        path = self.path(req.get("path"))
        await asyncio.to_thread(delete, path, bool(req.get("recursive")))
        return {"path": path}

    async def op_mkdir(self, req, target, cancel):
        path = self.path(req.get("path"))
        await asyncio.to_thread(mkdir, path)
        return {"path": path}
