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
PROFILE_LABEL = "groundloop.profile"

# What each profile adds to the minimal base. Debian's own packages, so that the offline build
# (debootstrap, no PyPI) can make them and a registry build gets the same versions.
PROFILES: dict[str, tuple[str, ...]] = {
    "minimal": (),
    "standard": (
        "python3-numpy",
        "python3-pandas",
        "python3-matplotlib",
        "python3-scipy",
        "python3-pil",
        "python3-ipython",
        "python3-pip",
        "node-typescript",
        "npm",
        "procps",
        "less",
        "bash-completion",
    ),
}
DEFAULT_PROFILE = "standard"


def profile_packages(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown image profile {profile!r} (one of {', '.join(PROFILES)})")
    return ",".join((PACKAGES, *PROFILES[profile]))


def offline_base(profile: str) -> str:
    """The offline base's tag: named by the profile and its packages, so that a changed package list
    makes a new base instead of reusing the old one."""
    if profile == "minimal":
        return OFFLINE_BASE
    digest = hashlib.sha256(profile_packages(profile).encode()).hexdigest()[:12]
    return f"{OFFLINE_BASE}-{profile}-{digest}"


def agent_files() -> list[str]:
    """The agent package's files (relative to the package), sorted: what the image carries."""
    return sorted(
        str(p.relative_to(AGENT_PACKAGE))
        for p in AGENT_PACKAGE.rglob("*")
        if p.is_file() and p.suffix in (".py", ".js") and "__pycache__" not in p.parts
    )


def agent_digest(profile: str = DEFAULT_PROFILE) -> str:
    h = hashlib.sha256(profile_packages(profile).encode() + b"\0")
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


def image_is_current(tag: str, client=None, profile: str | None = None) -> bool:
    """True when ``tag`` exists, carries this agent and was built with ``profile`` (default: the one
    it was built with, so that a minimal image stays current for a server that did not ask)."""
    import docker.errors

    client = client or _client()
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    labels = image.labels or {}
    built = labels.get(PROFILE_LABEL)
    if built not in PROFILES or (profile is not None and built != profile):
        return False
    return labels.get(AGENT_LABEL) == agent_digest(built)


def _has_image(client, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def size_of(tag: str, client=None) -> int:
    """The image's size in bytes."""
    client = client or _client()
    return int(client.images.get(tag).attrs.get("Size") or 0)


def cache_dir() -> Path:
    return Path(os.environ.get("GROUNDLOOP_CACHE_DIR") or Path.home() / ".cache" / "groundloop")


def _rootfs_tarball(suite: str, packages: str, extra: tuple[str, ...] = ()) -> Path:
    key = packages + ("+" + ",".join(extra) if extra else "")
    suffix = "" if key == PACKAGES else "-" + hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_dir() / f"rootfs-{suite}{suffix}.tar"


def _debootstrap(suite: str, packages: str, rootfs: Path) -> None:
    cached = _rootfs_tarball(suite, packages)
    if cached.exists():
        subprocess.run(["tar", "-C", str(rootfs), "-xf", str(cached)], check=True)
        return
    log.info("debootstrap %s into %s (about a minute)", suite, rootfs)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={packages}", suite, str(rootfs)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _apt_install(rootfs: Path, packages: tuple[str, ...]) -> None:
    """apt-get install ``packages`` inside ``rootfs`` (chroot). debootstrap's own resolver fails on the
    data-science and npm dependency trees (virtual packages, alternatives); apt resolves them."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = rootfs / "proc"
    proc.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "proc", "proc", str(proc)], check=True)
    try:
        log.info("apt-get install %d packages into %s (several minutes)", len(packages), rootfs)
        for cmd in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages],
            ["apt-get", "clean"],
        ):
            done = subprocess.run(["chroot", str(rootfs), *cmd], env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed in the image's root:\n{done.stdout[-2000:]}{done.stderr}")
    finally:
        subprocess.run(["umount", str(proc)], check=False)


def build_offline_base(
    client,
    suite: str = "bookworm",
    *,
    packages: str = PACKAGES,
    extra: tuple[str, ...] = (),
    tag: str = OFFLINE_BASE,
) -> None:
    """debootstrap a minimal Debian with ``packages``, apt-get install ``extra`` into it, cache the
    result as a tarball and docker-import it as ``tag``.

    deploy/server_image.py makes the server's base this way too, with other packages.
    """
    tarball = _rootfs_tarball(suite, packages, extra)
    if not tarball.exists():
        tarball.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="groundloop-rootfs-") as tmp:
            rootfs = Path(tmp) / "rootfs"
            rootfs.mkdir()
            _debootstrap(suite, packages, rootfs)
            if extra:
                _apt_install(rootfs, extra)
            # Trim what a sandbox never needs.
            for sub in ("var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
                subprocess.run(["rm", "-rf", str(rootfs / sub)], check=True)
            partial = tarball.with_suffix(".partial")
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
            partial.rename(tarball)
    log.info("docker import %s as %s", tarball, tag)
    repository, _, version = tag.rpartition(":")
    client.api.import_image_from_file(str(tarball), repository=repository, tag=version)


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


def build(tag: str, *, from_registry: bool | None = None, client=None, profile: str = DEFAULT_PROFILE) -> str:
    """Build the sandbox image ``tag`` with ``profile``'s packages; return the base it was built on."""
    packages = profile_packages(profile)
    client = client or _client()
    if from_registry is None:
        from_registry = _has_image(client, REGISTRY_BASE)
    if from_registry:
        base = REGISTRY_BASE
    else:
        base = offline_base(profile)
        if not _has_image(client, base):
            build_offline_base(client, packages=PACKAGES, extra=PROFILES[profile], tag=base)
    log.info("building %s (profile %s) on %s", tag, profile, base)
    client.images.build(
        fileobj=io.BytesIO(build_context()),
        custom_context=True,
        tag=tag,
        rm=True,
        forcerm=True,
        buildargs={"BASE": base, "PACKAGES": packages.replace(",", " ")},
        labels={AGENT_LABEL: agent_digest(profile), PROFILE_LABEL: profile},
        network_mode="none" if not from_registry else None,
    )
    return base


def ensure(tag: str, profile: str | None = None) -> bool:
    """Build the image when it is missing, older than the agent or (when ``profile`` is given) of
    another profile; a new image gets ``profile``, else the default. True if built."""
    client = _client()
    if image_is_current(tag, client, profile):
        return False
    build(tag, client=client, profile=profile or DEFAULT_PROFILE)
    return True
