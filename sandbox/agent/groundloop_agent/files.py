"""File operations (write_file, read_file, list_files, delete_file, mkdir)."""

from __future__ import annotations

import base64
import os
import shutil
import stat

from .common import MAX_FILE, RequestError, os_error


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
        try:
            if req.get("parents", True):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise os_error(exc)
        return {"path": path, "size": len(data)}

    async def op_read_file(self, req, target, cancel):
        path = self.path(req.get("path"))
        cap = int(req.get("max_file_bytes") or MAX_FILE)
        try:
            st = os.stat(path)
            if stat.S_ISDIR(st.st_mode):
                raise RequestError("IsADirectoryError", f"{path} is a directory")
            if st.st_size > cap:
                raise RequestError("FileTooLarge", f"{path} is {st.st_size} bytes, over the limit of {cap} bytes")
            with open(path, "rb") as f:
                data = f.read(cap + 1)
        except OSError as exc:
            raise os_error(exc)
        if len(data) > cap:
            raise RequestError("FileTooLarge", f"{path} is over the limit of {cap} bytes")
        enc = req.get("encoding")
        if enc not in (None, "utf-8", "utf8", "base64"):
            raise RequestError("ValueError", f"unknown encoding {enc!r} (utf-8 or base64)")
        if enc != "base64":
            try:
                return {"content": data.decode("utf-8"), "encoding": "utf-8", "size": len(data)}
            except UnicodeDecodeError:
                if enc:  # asked for text explicitly
                    raise RequestError("UnicodeDecodeError", f"{path} is not valid UTF-8; ask for base64")
        return {"content": base64.b64encode(data).decode(), "encoding": "base64", "size": len(data)}

    async def op_list_files(self, req, target, cancel):
        path = self.path(req.get("path") or ".")
        entries = []
        try:
            with os.scandir(path) as it:
                for e in it:
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    kind = (
                        "symlink"
                        if stat.S_ISLNK(st.st_mode)
                        else "directory"
                        if stat.S_ISDIR(st.st_mode)
                        else "file"
                        if stat.S_ISREG(st.st_mode)
                        else "other"
                    )
                    entries.append({"name": e.name, "type": kind, "size": st.st_size, "mtime": st.st_mtime})
        except OSError as exc:
            raise os_error(exc)
        entries.sort(key=lambda e: e["name"])
        return {"path": path, "entries": entries}

    async def op_delete_file(self, req, target, cancel):
        path = self.path(req.get("path"))
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                if req.get("recursive"):
                    shutil.rmtree(path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as exc:
            raise os_error(exc)
        return {"path": path}

    async def op_mkdir(self, req, target, cancel):
        path = self.path(req.get("path"))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise os_error(exc)
        return {"path": path}
