"""Building the sandbox image (``groundloop image build``).

Two paths to one Dockerfile (deploy/sandbox.Dockerfile):

- with a registry: ``FROM debian:bookworm-slim``, used when that base is
  already present locally or when asked for (``--from-registry``);
- offline (the default when no base is present): a minimal Debian made by
  ``debootstrap --variant=minbase`` with python3, nodejs and git, cached as a
  tarball, imported with ``docker import`` as the base, then the same file.

The image carries a label with the SHA-256 of the agent's files, so a server
can tell a stale image from the agent it ships (``image_is_current``).

Both paths also compile deploy/statx_shim.c with the host's C compiler into
the build context: the image preloads it in every process so that coreutils'
``ls`` and ``stat`` work under gVisor (see the file for why).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path

log = logging.getLogger("groundloop.image")

ROOT = Path(__file__).resolve().parent
AGENT_DIR = ROOT / "agent"
AGENT_PACKAGE = AGENT_DIR / "groundloop_agent"  # copied whole into the image
DOCKERFILE = ROOT.parent / "deploy" / "sandbox.Dockerfile"
STATX_SHIM = ROOT.parent / "deploy" / "statx_shim.c"
REGISTRY_BASE = "debian:bookworm-slim"
OFFLINE_BASE = "groundloop-sandbox-base:bookworm"
PACKAGES = "python3,nodejs,git,ca-certificates"
AGENT_LABEL = "groundloop.agent_sha256"


def agent_files() -> list[str]:
    """The agent package's files (relative to the package), sorted: what the image carries."""
    return sorted(
        str(p.relative_to(AGENT_PACKAGE))
        for p in AGENT_PACKAGE.rglob("*")
        if p.is_file() and p.suffix in (".py", ".js") and "__pycache__" not in p.parts
    )


def agent_digest() -> str:
    h = hashlib.sha256()
    for name in agent_files():
        h.update(name.encode() + b"\0" + (AGENT_PACKAGE / name).read_bytes())
    h.update(DOCKERFILE.read_bytes() if DOCKERFILE.exists() else b"")
    h.update(STATX_SHIM.read_bytes() if STATX_SHIM.exists() else b"")
    return h.hexdigest()


def compile_statx_shim(out: Path) -> None:
    """Compile deploy/statx_shim.c into the shared library ``out`` with the host's compiler (``$CC``,
    else ``cc``). The image has no compiler and the offline build no network, so it is built here; the
    library needs only glibc 2.2.5 symbols, so any glibc host builds one the image can load."""
    cc = os.environ.get("CC") or "cc"
    cmd = [cc, "-O2", "-Wall", "-shared", "-fPIC", "-o", str(out), str(STATX_SHIM)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise RuntimeError(
            f"building the sandbox image needs a C compiler ({cc!r} not found): apt-get install gcc libc6-dev"
        ) from None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"compiling {STATX_SHIM.name} failed:\n{exc.stderr}") from None


def _client():
    import docker

    return docker.from_env(timeout=600)


def image_is_current(tag: str, client=None) -> bool:
    import docker.errors

    client = client or _client()
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return (image.labels or {}).get(AGENT_LABEL) == agent_digest()


def _has_image(client, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def cache_dir() -> Path:
    return Path(os.environ.get("GROUNDLOOP_CACHE_DIR") or Path.home() / ".cache" / "groundloop")


def build_offline_base(client, suite: str = "bookworm", *, packages: str = PACKAGES, tag: str = OFFLINE_BASE) -> None:
    """debootstrap a minimal Debian with ``packages`` (cached as a tarball) and docker-import it as ``tag``.

    deploy/server_image.py makes the server's base this way too, with other packages.
    """
    extra = "" if packages == PACKAGES else "-" + hashlib.sha256(packages.encode()).hexdigest()[:12]
    tarball = cache_dir() / f"rootfs-{suite}{extra}.tar"
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="groundloop-rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            log.info("debootstrap %s into %s (about a minute)", suite, rootfs)
            subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={packages}", suite, str(rootfs)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            # Trim what a sandbox never needs.
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
                subprocess.run(["rm", "-rf", str(rootfs / sub)], check=True)
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
            partial.rename(tarball)
    log.info("docker import %s as %s", tarball, tag)
    repository, _, version = tag.rpartition(":")
    with open(tarball, "rb") as f:
        client.api.import_image_from_data(f.read(), repository=repository, tag=version)


def build_context() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(DOCKERFILE), arcname="Dockerfile")
        for name in agent_files():
            tar.add(str(AGENT_PACKAGE / name), arcname=f"groundloop_agent/{name}")
        with tempfile.TemporaryDirectory(prefix="groundloop-shim-") as tmp:
            shim = Path(tmp) / "statx_shim.so"
            compile_statx_shim(shim)
            tar.add(str(shim), arcname=shim.name)
    return buf.getvalue()


def build(tag: str, *, from_registry: bool | None = None, client=None) -> str:
    """Build the sandbox image ``tag``; return the base it was built on."""
    client = client or _client()
    if from_registry is None:
        from_registry = _has_image(client, REGISTRY_BASE)
    if from_registry:
        base = REGISTRY_BASE
    else:
        base = OFFLINE_BASE
        if not _has_image(client, OFFLINE_BASE):
            build_offline_base(client)
    log.info("building %s on %s", tag, base)
    client.images.build(
        fileobj=io.BytesIO(build_context()),
        custom_context=True,
        tag=tag,
        rm=True,
        forcerm=True,
        buildargs={"BASE": base},
        labels={AGENT_LABEL: agent_digest()},
        network_mode="none" if not from_registry else None,
    )
    return base


def ensure(tag: str) -> bool:
    """Build the image when it is missing or older than the agent. True if built."""
    client = _client()
    if image_is_current(tag, client):
        return False
    build(tag, client=client)
    return True
