"""Is Docker usable, with the sandbox image and the gVisor runtime? Asked once, and only when a
Docker-marked test is selected (conftest.py), so the unit tier never touches a Docker engine.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import warnings

from .env import IMAGE


@functools.cache
def docker_state() -> str | None:
    """None when Docker and the sandbox image are usable, else the reason."""
    # A failed connect leaves docker-py's socket unclosed; the probe runs during collection now, where
    # filterwarnings=error would turn its ResourceWarning into the error of whichever test the GC hits.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        reason = _probe()
        gc.collect()
    return reason


def _probe() -> str | None:
    try:
        import docker

        client = docker.from_env(timeout=10)
    except Exception as exc:
        return f"Docker is not reachable: {exc}"
    with contextlib.closing(client):
        try:
            client.ping()
        except Exception as exc:
            return f"Docker is not reachable: {exc}"
        try:
            client.images.get(IMAGE)
        except Exception:
            return f"the sandbox image {IMAGE} is missing (run: groundloop image build)"
    return None


@functools.cache
def runsc_available() -> bool:
    if docker_state():
        return False
    import docker

    with contextlib.closing(docker.from_env()) as client:
        return "runsc" in (client.info().get("Runtimes") or {})
