"""Named workspaces that outlive a session: host storage, one quota per user.

Layout under ``GROUNDLOOP_WORKSPACE_DIR`` (the root)::

    <root>/<user key>/user          the user's name, for an operator reading the tree
    <root>/<user key>/fs.img        loop mode: a sparse ext4 image of ``workspace_quota`` bytes
    <root>/<user key>/data/         loop mode: the image's mount point; measured mode: a plain directory
        workspaces/<name>/          bind-mounted at /workspace (owned by the sandbox uid)
        snapshots/<name>/<id>.tar   ``snapshot`` requests (tars made by a helper container)

The user key is a SHA-256 of the user id: no user id, however it is spelled, names a path
outside its own directory, and two users never share one. Workspace and snapshot names are
checked against ``NAME`` (no ``/``, no leading dot): a name is a path component and nothing else.

Quota modes (``GROUNDLOOP_WORKSPACE_QUOTA_MODE``):

- ``loop``: every user's data lives on an ext4 filesystem of its own, a loop-mounted image
  file of the quota's size. The kernel enforces the limit: a ``dd`` in the sandbox ends with
  ENOSPC, and workspaces and snapshots share it. Needs root (mount, a loop device).
- ``measured``: plain directories; the usage is measured (a walk) and a new workspace or a
  snapshot is refused once it is at the quota. A sandbox can write past it within a session.
- ``auto`` (default): loop when this process can mount loop devices, else measured.

Every method blocks (file system walks, mount): the async wrappers are the caller's
(``asyncio.to_thread``). A server owns its root alone: two servers must not share one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("groundloop.sandbox")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
SANDBOX_UID = 1000
MODES = ("auto", "loop", "measured")


class WorkspaceError(Exception):
    """A workspace request that cannot be served; ``code`` is the protocol error code."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.message = message
        self.code = code


def check_name(name: object, what: str = "workspace") -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise WorkspaceError(
            f"a {what} name is 1-64 characters of letters, digits, `_`, `.`, `-`, starting with a letter or digit"
        )
    return name


def user_key(user: str) -> str:
    return hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def tree_size(path: Path) -> int:
    """Bytes allocated under ``path``, never following a symbolic link (the tree is the sandbox's)."""
    total = 0
    stack = [str(path)]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    total += st.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue
    return total


def loop_available() -> bool:
    """Whether this process can attach loop devices (root, a /dev/loop-control, losetup)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None or shutil.which("mkfs.ext4") is None:
        return False
    try:
        return subprocess.run(["losetup", "-f"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@dataclass(frozen=True)
class Snapshot:
    id: str
    size: int
    created: float


class WorkspaceStore:
    def __init__(self, root: str, quota: int, mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"GROUNDLOOP_WORKSPACE_QUOTA_MODE: expected one of {', '.join(MODES)}, got {mode!r}")
        self.root = Path(root).resolve()
        self.quota = quota
        if mode == "auto":
            mode = "loop" if loop_available() else "measured"
        self.mode = mode
        # Mounts, unmounts and the directories made in a mounted filesystem: a user's last workspace
        # deleted (unmount) while another of theirs is being made must not race. Calls come from threads.
        self._lock = threading.RLock()
        self._mounted: set[Path] = set()

    # ---- paths

    def _user_dir(self, user: str) -> Path:
        return self.root / user_key(user)

    def _data(self, user: str) -> Path:
        return self._user_dir(user) / "data"

    def _existing(self, user: str) -> Path:
        """The user's data directory for reading: mounted again when a server before this one made it."""
        if self.mode == "loop" and (self._user_dir(user) / "fs.img").exists():
            return self._ensure_user(user)
        return self._data(user)

    def _ensure_user(self, user: str) -> Path:
        """The user's data directory, mounted (loop mode) and ready; created on first use."""
        with self._lock:
            udir = self._user_dir(user)
            data = udir / "data"
            if self.mode == "loop" and os.path.ismount(data):
                self._mounted.add(data)  # also one a killed server left: this one unmounts it at its close
                return data
            udir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.root, 0o711)
            (udir / "user").write_text(user + "\n", encoding="utf-8")
            data.mkdir(exist_ok=True, mode=0o755)
            if self.mode == "loop":
                self._mount(udir / "fs.img", data)
            for sub in ("workspaces", "snapshots"):
                (data / sub).mkdir(exist_ok=True, mode=0o755)
            return data

    def _mount(self, image: Path, data: Path) -> None:
        if not image.exists():
            with open(image, "wb") as f:
                f.truncate(self.quota)  # sparse: the disk is used as the user writes
            # -m 0: no blocks reserved for root (nobody writes as root there).
            _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=0:0", str(image)])
        _run(["mount", "-o", "loop,nosuid,nodev", str(image), str(data)])
        self._mounted.add(data)
        lost = data / "lost+found"
        if lost.is_dir() and not any(lost.iterdir()):
            lost.rmdir()

    def _unmount_if_empty(self, user: str) -> None:
        """Give back the loop device and the image once the user has nothing left."""
        data = self._data(user)
        if self.mode != "loop" or not os.path.ismount(data):
            return
        if any((data / "workspaces").iterdir()) or any((data / "snapshots").iterdir()):
            return
        try:
            _run(["umount", str(data)])
        except WorkspaceError as exc:
            log.warning("could not unmount %s: %s", data, exc)
            return
        self._mounted.discard(data)
        (self._user_dir(user) / "fs.img").unlink(missing_ok=True)

    # ---- workspaces

    def open(self, user: str, name: str) -> str:
        """The host directory of ``user``'s workspace ``name`` (created when new), for a bind mount."""
        check_name(name)
        with self._lock:
            data = self._ensure_user(user)
            path = data / "workspaces" / name
            if not path.is_dir():
                if self.mode == "measured":
                    self.check_room(user)
                path.mkdir(mode=0o755)
                os.chown(path, SANDBOX_UID, SANDBOX_UID)
            return str(path)

    def exists(self, user: str, name: str) -> bool:
        return (self._existing(user) / "workspaces" / check_name(name)).is_dir()

    def usage(self, user: str) -> int:
        data = self._existing(user)
        if not data.is_dir():
            return 0
        if self.mode == "loop" and os.path.ismount(data):
            st = os.statvfs(data)
            return (st.f_blocks - st.f_bfree) * st.f_frsize
        return tree_size(data)

    def check_room(self, user: str) -> None:
        """Measured mode's limit: refuse what would add to a user at (or over) the quota."""
        used = self.usage(user)
        if used >= self.quota:
            raise WorkspaceError(f"the user's workspaces use {used} bytes, the quota is {self.quota}", "quota_exceeded")

    def listing(self, user: str) -> dict:
        data = self._existing(user)
        names = sorted(p.name for p in (data / "workspaces").iterdir()) if (data / "workspaces").is_dir() else []
        return {
            "mode": self.mode,
            "quota": self.quota,
            "used": self.usage(user),
            "workspaces": [
                {
                    "name": n,
                    "size": tree_size(data / "workspaces" / n),
                    "snapshots": [s.__dict__ for s in self.snapshots(user, n)],
                }
                for n in names
            ],
        }

    def delete(self, user: str, name: str) -> None:
        """Delete a workspace and its snapshots (the caller checked it is not in use)."""
        check_name(name)
        data = self._existing(user)
        path = data / "workspaces" / name
        if not path.is_dir():
            raise WorkspaceError(f"no workspace {name!r}", "not_found")
        # rmtree works on directory descriptors, so a symbolic link the sandbox left is removed, not followed.
        shutil.rmtree(path)
        shutil.rmtree(data / "snapshots" / name, ignore_errors=True)
        with self._lock:
            self._unmount_if_empty(user)

    # ---- snapshots (the tars are made and read by a helper container: see workspace_tools.py)

    def snapshot_dir(self, user: str, name: str) -> str:
        """The host directory of workspace ``name``'s snapshots, created (owned by the sandbox uid)."""
        check_name(name)
        with self._lock:
            path = self._ensure_user(user) / "snapshots" / name
            if not path.is_dir():
                path.mkdir(mode=0o755)
                os.chown(path, SANDBOX_UID, SANDBOX_UID)
            return str(path)

    def snapshots(self, user: str, name: str) -> list[Snapshot]:
        path = self._existing(user) / "snapshots" / check_name(name)
        if not path.is_dir():
            return []
        out = []
        for entry in os.scandir(path):
            if entry.name.endswith(".tar") and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                out.append(Snapshot(entry.name[:-4], st.st_size, round(st.st_mtime, 3)))
        return sorted(out, key=lambda s: (s.created, s.id))

    def has_snapshot(self, user: str, name: str, snapshot: str) -> bool:
        check_name(snapshot, "snapshot")
        return (self._existing(user) / "snapshots" / check_name(name) / f"{snapshot}.tar").is_file()

    def delete_snapshot(self, user: str, name: str, snapshot: str) -> None:
        check_name(snapshot, "snapshot")
        path = self._existing(user) / "snapshots" / check_name(name) / f"{snapshot}.tar"
        try:
            path.unlink()
        except FileNotFoundError:
            raise WorkspaceError(f"no snapshot {snapshot!r} of workspace {name!r}", "not_found") from None

    def close(self) -> None:
        """Unmount what this store mounted (at shutdown; the next server mounts the images again)."""
        with self._lock:
            for data in list(self._mounted):
                try:
                    _run(["umount", str(data)])
                    self._mounted.discard(data)
                except WorkspaceError as exc:
                    log.warning("could not unmount %s: %s", data, exc)


def new_snapshot_id() -> str:
    return time.strftime("snap-%Y%m%d-%H%M%S-", time.gmtime()) + os.urandom(3).hex()


def _run(cmd: list[str]) -> None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise WorkspaceError(f"{cmd[0]} failed: {exc}", "internal") from None
    if proc.returncode != 0:
        raise WorkspaceError(f"{' '.join(cmd[:2])} failed: {proc.stderr.strip()[:300]}", "internal")
