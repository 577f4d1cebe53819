"""A local package index for the egress tests: a PEP 503 simple index with one wheel, an npm
registry document with one tarball, and a large file; all built here, served on loopback.

    with PackageIndex("127.0.0.2") as index:
        index.url            # http://127.0.0.2:<port>
        index.hits           # paths served, in order

Served from a thread (http.server): the tests' event loop stays free for the server under test.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PY_NAME = "glegress"
PY_MAGIC_NAME = "glegress_magic"  # a second wheel, for `%pip install` in a Python context
PY_VERSION = "1.0"
NPM_NAME = "glegress-js"
NPM_VERSION = "1.0.0"
PY_VALUE = "installed through the egress proxy"
BIG_CHUNK = 1 << 20


def build_wheel(project: str = PY_NAME) -> tuple[str, bytes]:
    """A pure-Python wheel, by hand (a zip with the dist-info files pip checks)."""
    name = f"{project}-{PY_VERSION}-py3-none-any.whl"
    info = f"{project}-{PY_VERSION}.dist-info"
    files = {
        f"{project}/__init__.py": f"VALUE = {PY_VALUE!r}\n".encode(),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {project}\nVersion: {PY_VERSION}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: groundloop-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path, data in files.items():
            z.writestr(path, data)
    return name, buf.getvalue()


def build_npm_tarball() -> bytes:
    files = {
        "package/package.json": json.dumps({"name": NPM_NAME, "version": NPM_VERSION, "main": "index.js"}).encode(),
        "package/index.js": b"module.exports = { value: 'required through the egress proxy' };\n",
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path, data in files.items():
            ti = tarfile.TarInfo(path)
            ti.size = len(data)
            ti.mode = 0o644
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


class PackageIndex:
    def __init__(self, host: str = "127.0.0.2", big_bytes: int = 50 << 20):
        self.host = host
        self.big_bytes = big_bytes
        self.hits: list[str] = []
        self.wheels = dict(build_wheel(p) for p in (PY_NAME, PY_MAGIC_NAME))
        self.tarball = build_npm_tarball()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    def routes(self) -> dict[str, tuple[str, bytes]]:
        tgz = f"{NPM_NAME}-{NPM_VERSION}.tgz"
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(self.tarball).digest()).decode()
        doc = {
            "name": NPM_NAME,
            "dist-tags": {"latest": NPM_VERSION},
            "versions": {
                NPM_VERSION: {
                    "name": NPM_NAME,
                    "version": NPM_VERSION,
                    "main": "index.js",
                    "dist": {
                        "tarball": f"{self.url}/{NPM_NAME}/-/{tgz}",
                        "shasum": hashlib.sha1(self.tarball).hexdigest(),
                        "integrity": integrity,
                    },
                }
            },
        }
        routes: dict[str, tuple[str, bytes]] = {}
        for name, wheel in self.wheels.items():
            project = name.split("-")[0]
            link = f'<a href="/files/{name}#sha256={hashlib.sha256(wheel).hexdigest()}">{name}</a>'
            # PEP 503: the normalised name (pip asks for glegress-magic)
            routes[f"/simple/{project.replace('_', '-')}/"] = (
                "text/html",
                f"<html><body>{link}</body></html>".encode(),
            )
            routes[f"/files/{name}"] = ("application/octet-stream", wheel)
        return {
            **routes,
            f"/{NPM_NAME}": ("application/json", json.dumps(doc).encode()),
            f"/{NPM_NAME}/-/{tgz}": ("application/octet-stream", self.tarball),
            "/hello": ("text/plain", b"hello from the local index\n"),
        }

    def __enter__(self) -> PackageIndex:
        index = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                index.hits.append(path)
                if path == "/big":
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(index.big_bytes))
                    self.end_headers()
                    chunk = b"\0" * BIG_CHUNK
                    left = index.big_bytes
                    while left > 0:
                        self.wfile.write(chunk[: min(left, BIG_CHUNK)])
                        left -= BIG_CHUNK
                    return
                found = index.routes().get(path) or index.routes().get(path.rstrip("/") + "/")
                if found is None:
                    self.send_error(404)
                    return
                ctype, body = found
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="pkgindex", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._httpd is not None
        self._httpd.shutdown()
        self._httpd.server_close()
