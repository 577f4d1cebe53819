"""The per-sandbox host directory, bind-mounted at ``/run/groundloop`` in the container.

It carries the Unix sockets between the server and its sandbox (``egress.sock``, the egress
proxy's host side; ``agent.sock``, the data channel), so the sandbox keeps no network
interface: a socket file in a bind mount is reached through the filesystem, and under gVisor
through ``--host-uds=open``. The directory is 0700 and owned by the sandbox's uid (1000), so no
other local user reaches the sockets, and each sandbox sees only its own directory.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile

MOUNT = "/run/groundloop"
SANDBOX_UID = 1000
SANDBOX_GID = 1000
EGRESS_SOCK = "egress.sock"
AGENT_SOCK = "agent.sock"


def base_dir(configured: str = "") -> str:
    """Where the per-sandbox directories live (``GROUNDLOOP_RUN_DIR``, else under $TMPDIR). The Docker
    engine binds them by path, so a server in a container needs the same path on the host."""
    return configured or os.path.join(tempfile.gettempdir(), f"groundloop-run-{os.getuid()}")


def create(name: str, configured: str = "") -> str:
    """A fresh directory for one sandbox (``name`` unique per sandbox); returns its host path."""
    base = base_dir(configured)
    os.makedirs(base, mode=0o711, exist_ok=True)
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        # Another user made it first (or a link in its place) in the shared temporary directory.
        raise PermissionError(f"{base} is not a directory of this user's, writable by it alone")
    path = tempfile.mkdtemp(prefix=f"{name[:24]}-", dir=base)
    os.chmod(path, 0o700)
    try:
        os.chown(path, SANDBOX_UID, SANDBOX_GID)
    except PermissionError:
        # A server that is not root (the server image runs as 10001) cannot give the directory away:
        # the sandbox may then pass through it, not list it, and its random name is the secret.
        os.chmod(path, 0o711)
    return path


def hand_over(path: str) -> None:
    """Give a socket the server created in the directory to the sandbox's uid (the directory's
    mode already keeps everyone else out)."""
    try:
        os.chown(path, SANDBOX_UID, SANDBOX_GID)
    except PermissionError:
        os.chmod(path, 0o666)


def mount(path: str) -> dict[str, dict[str, str]]:
    """The ``binds`` entry of the container's host config."""
    return {path: {"bind": MOUNT, "mode": "rw"}}


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
