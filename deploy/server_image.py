"""Build the server image (deploy/server.Dockerfile) with no registry and no network in the build.

    .venv/bin/python deploy/server_image.py --tag groundloop-server:ci

1. The base: a minimal Debian with python3 and python3-venv, made by the
   project's offline path (``debootstrap`` + ``docker import``,
   ``groundloop.sandbox.image.build_offline_base``), cached.
2. The wheels: groundloop and its dependencies, made by this machine's pip
   (so with this machine's index and certificates; a build container has
   neither).
3. The image: this repository's server.Dockerfile on that base, from a build
   context made here (only what the image copies, the wheels in
   deploy/wheels/), with ``network_mode=none``.

The image is labelled with the SHA-256 of what it was built from; a build with
an up-to-date label is skipped (``--force`` builds anyway).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = "deploy/server.Dockerfile"
BASE = "groundloop-server-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
BASE_PYTHON = (3, 11)  # Debian 12's python3: the wheels made here must fit it
SOURCES = (
    "pyproject.toml",
    "README.md",
    "server",
    "sessions",
    "sandbox",
    "static",
    DOCKERFILE,
    "deploy/wheels/README.md",
)
LABEL = "groundloop.server_sha256"

log = logging.getLogger("groundloop.server_image")


def _files() -> list[Path]:
    out = []
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            out.extend(p for p in sorted(path.rglob("*")) if p.is_file() and "__pycache__" not in p.parts)
        else:
            out.append(path)
    return out


def digest() -> str:
    h = hashlib.sha256()
    for path in _files():
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def wheels(dest: Path) -> list[Path]:
    """groundloop and its dependencies as wheels, by this interpreter's pip."""
    if sys.version_info[:2] != BASE_PYTHON:
        raise RuntimeError(
            f"run this with Python {'.'.join(map(str, BASE_PYTHON))} (the base's): its wheels are built for "
            f"this interpreter, which is {sys.version_info[0]}.{sys.version_info[1]}"
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(dest), str(ROOT)],
        check=True,
    )
    return sorted(dest.glob("*.whl"))


def context(wheel_files: list[Path]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in _files():
            tar.add(str(path), arcname=str(path.relative_to(ROOT)), recursive=False)
        for whl in wheel_files:
            tar.add(str(whl), arcname=f"deploy/wheels/{whl.name}")
    return buf.getvalue()


def is_current(client, tag: str) -> bool:
    import docker.errors

    try:
        return (client.images.get(tag).labels or {}).get(LABEL) == digest()
    except docker.errors.ImageNotFound:
        return False


def build(tag: str, *, force: bool = False, client=None) -> bool:
    """Build ``tag``; False when an image of the same sources is already there."""
    import docker
    import docker.errors
    from groundloop.sandbox import image

    client = client or docker.from_env(timeout=900)
    if not force and is_current(client, tag):
        log.info("%s is current", tag)
        return False
    try:
        client.images.get(BASE)
    except docker.errors.ImageNotFound:
        image.build_offline_base(client, packages=BASE_PACKAGES, tag=BASE)
    with tempfile.TemporaryDirectory(prefix="groundloop-wheels-") as tmp:
        found = wheels(Path(tmp))
        log.info("%d wheels; building %s on %s", len(found), tag, BASE)
        ctx = context(found)
    try:
        client.images.build(
            fileobj=io.BytesIO(ctx),
            custom_context=True,
            dockerfile=DOCKERFILE,
            tag=tag,
            rm=True,
            forcerm=True,
            buildargs={"BASE": BASE},
            labels={LABEL: digest()},
            network_mode="none",
        )
    except docker.errors.BuildError as exc:
        lines = "".join(str(c.get("stream", c.get("error", ""))) for c in exc.build_log)
        raise RuntimeError(f"the server image did not build:\n{lines[-4000:]}") from None
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tag", default="groundloop-server:latest")
    p.add_argument("--force", action="store_true", help="build even when the image is current")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(("built " if build(args.tag, force=args.force) else "current ") + args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
