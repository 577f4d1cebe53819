"""A host directory per sandbox, bind-mounted read-only at ``/run/groundloop`` in its container.

It holds the Unix sockets the server offers that one sandbox (``agent.sock``, the data channel: see
``sandbox/channel.py``; ``egress.sock``, the egress proxy's host side when the operator allows egress:
``sandbox/egress.py``) and nothing else. The directory is mode 0700 and owned by the sandbox's uid
(1000), so the agent can reach a socket in it; the root that holds every such directory is the server's
own (0700), so no other host user can reach any of them. The mount is read-only: the code in the sandbox
runs as the same uid, and a writable host directory would let it fill the host's disk (connecting to a
socket needs no write access to the file system, only to the socket file).

Names are ``<namespace>.<instance>.<random>``: a server removes its own at close, and at start those of
its namespace that another instance left behind (a killed server), as ``DockerBackend.reap_orphans``
does for their containers.

Several servers may share a namespace on one host (replicas behind a router, the tests' in-process
servers): "left behind" must mean "its server is gone", not "another server's". Each instance holds an
exclusive ``flock`` on ``.instances/<namespace>.<instance>`` under the root for as long as it runs
(``InstanceLock``); the kernel drops it when the process dies, even on SIGKILL. A reaper skips every
instance whose lock it cannot take. Replicas sharing a namespace must share the root
(``GROUNDLOOP_RUN_DIR``): a lock under another root is not seen.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable

log = logging.getLogger("groundloop.sandbox")

MOUNT = "/run/groundloop"  # where the container sees its directory
AGENT_SOCKET = "agent.sock"
EGRESS_SOCK = "egress.sock"
SANDBOX_UID = 1000
SANDBOX_GID = 1000
SUN_PATH_MAX = 108  # sockaddr_un.sun_path, with its terminating zero
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def default_root() -> str:
    """``/run/groundloop`` for root (a tmpfs, emptied at boot); otherwise a directory of this user in the temp dir."""
    if os.geteuid() == 0:
        return "/run/groundloop"
    return os.path.join(tempfile.gettempdir(), f"groundloop-{os.geteuid()}")


def root_of(configured: str) -> str:
    return configured or default_root()


def _prefix(namespace: str, instance: str = "") -> str:
    ns = _UNSAFE.sub("_", namespace)
    return f"{ns}.{instance}." if instance else f"{ns}."


def make_root(root: str) -> None:
    """Make the root (0700) or check the one that is there: a directory, not a link, of this server's user, whom
    alone it admits (0700, made so when it is ours and wider). A root made by anyone else (say
    ``/tmp/groundloop-<uid>`` made in advance by another user of the host, who could then swap a sandbox's
    directory or socket) is refused with OSError: the caller falls back to the attach stream."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"{root} is not a directory of this server's user (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        os.chmod(root, 0o700)


class RunDir:
    """One sandbox's directory. ``create`` raises OSError when it cannot be made as it must be
    (for example a server that is neither root nor uid 1000 cannot give it to the sandbox's uid)."""

    def __init__(self, root: str, namespace: str, instance: str):
        self.root = root
        self.path = os.path.join(root, _prefix(namespace, instance) + secrets.token_hex(8))

    def create(self) -> None:
        make_root(self.root)
        os.mkdir(self.path, 0o700)
        try:
            if os.geteuid() != SANDBOX_UID:
                os.chown(self.path, SANDBOX_UID, SANDBOX_GID)
            os.chmod(self.path, 0o700)  # whatever the umask
        except OSError:
            self.remove()
            raise

    def socket_path(self, name: str) -> str:
        return os.path.join(self.path, name)

    def listen(self, name: str, backlog: int = 1) -> socket.socket:
        """A non-blocking listening Unix socket ``name`` in the directory that only the sandbox's uid may
        connect to; a backlog of one for the data channel, whose server accepts one connection."""
        path = self.socket_path(name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dfd = -1
        try:
            if len(os.fsencode(path)) < SUN_PATH_MAX:
                sock.bind(path)
            else:  # a socket's address holds 107 bytes: a longer root is reached through the directory's fd
                dfd = os.open(self.path, os.O_PATH | os.O_DIRECTORY)
                sock.bind(f"/proc/self/fd/{dfd}/{name}")
            if os.geteuid() != SANDBOX_UID:
                os.chown(path, SANDBOX_UID, SANDBOX_GID)
            os.chmod(path, 0o600)
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        finally:
            if dfd >= 0:
                os.close(dfd)
        return sock

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


LOCKS = ".instances"  # under the root: one lock file per running instance


def _lock_path(root: str, namespace: str, instance: str) -> str:
    return os.path.join(root, LOCKS, _prefix(namespace, instance).rstrip("."))


class InstanceLock:
    """This server instance's claim to be alive: an exclusive flock held until ``release`` (or death)."""

    def __init__(self, root: str, namespace: str, instance: str):
        self.path = _lock_path(root, namespace, instance)
        self.fd = -1

    def acquire(self) -> None:
        """Take the lock (OSError when the root cannot hold it: then other servers may take this one for gone)."""
        if self.fd >= 0:
            return
        make_root(os.path.dirname(os.path.dirname(self.path)))
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)  # kept: never removed, so no race
        for _ in range(10):
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A reaper that found this path unlocked a moment ago unlinks it: the lock must be on the
                # file that the path names now, or another server would find no lock and take us for gone.
                if os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino:
                    self.fd = fd
                    return
            except FileNotFoundError:
                pass
            except BlockingIOError:
                # Held: another server's sweep is looking at the file we just made (it takes the lock to tell
                # a dead instance, then unlinks the file). The id is ours alone: look again.
                time.sleep(0.01)
            except OSError:
                os.close(fd)
                raise
            os.close(fd)
        raise OSError(errno.EAGAIN, f"could not hold {self.path}: it kept being replaced")

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = -1


def instance_alive(root: str, namespace: str, instance: str) -> bool:
    """Whether the server instance ``instance`` of ``namespace`` still runs on this host: its lock is held.
    An instance without a lock file is gone (or never had one: a server of an older version, a fake). Any
    other failure to tell (no permission, out of descriptors) counts as alive: "gone" removes its sandboxes."""
    path = _lock_path(root, namespace, instance)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError as exc:
        _unknown(namespace, instance, exc)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            _unknown(namespace, instance, exc)
        return True
    else:  # nobody holds it: a dead instance's file, gone with it
        try:
            os.unlink(path)
        except OSError:
            pass
        return False
    finally:
        os.close(fd)


def _unknown(namespace: str, instance: str, exc: OSError) -> None:
    log.warning(
        "cannot tell whether instance %s of %s runs (%s): its sandboxes are left alone", instance, namespace, exc
    )


def liveness(root: str, namespace: str) -> Callable[[str], bool]:
    """``instance_alive`` of ``namespace``, each instance asked once: one sweep of containers and directories
    shares it (the first look at a dead instance's lock removes the file, so a second would ask in vain)."""
    return functools.cache(functools.partial(instance_alive, root, namespace))


def reap(root: str, namespace: str, keep_instance: str, alive: Callable[[str], bool] | None = None) -> int:
    """Remove the directories of ``namespace`` that belong to another instance whose server is gone
    (``alive``: a ``liveness`` to share with the sweep of containers)."""
    prefix = _prefix(namespace)
    mine = _prefix(namespace, keep_instance)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
    n = 0
    alive = alive or liveness(root, namespace)
    for name in names:
        if name.startswith(prefix) and not name.startswith(mine) and name.count(".") == prefix.count(".") + 1:
            if alive(name[len(prefix) :].split(".", 1)[0]):
                continue
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            n += 1
    # The lock files of killed instances that left no directory: asking removes a dead one's file.
    try:
        locks = os.listdir(os.path.join(root, LOCKS))
    except OSError:
        locks = []
    for name in locks:
        if name.startswith(prefix) and name.count(".") == prefix.count(".") and name != mine.rstrip("."):
            alive(name[len(prefix) :])
    return n


def reap_instance(root: str, namespace: str, instance: str) -> int:
    """Remove every directory of this instance (at close, after its containers)."""
    mine = _prefix(namespace, instance)
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(mine):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return sum(1 for name in names if name.startswith(mine))
