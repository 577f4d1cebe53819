"""Typed settings of the sandbox layer, read from ``GROUNDLOOP_*`` variables.

The server's ``Settings`` (server/settings.py) holds one of these as
``settings.sandbox``; both are built by the same ``from_env`` machinery: a
dataclass field's metadata names its variable, and its type says how to parse.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class SettingsError(ValueError):
    """A GROUNDLOOP_* variable has a value that cannot be used."""


def env(name: str, default: Any, doc: str = "") -> Any:
    """A settings field read from the environment variable ``name``."""
    kw: dict[str, Any] = {"metadata": {"env": name, "doc": doc}}
    if isinstance(default, (list, dict, set)):
        kw["default_factory"] = lambda: type(default)(default)
    else:
        kw["default"] = default
    return field(**kw)


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean (1/0, true/false), got {raw!r}")


def parse_size(raw: str) -> int:
    """Bytes from '512', '64k', '512m', '1g'."""
    value = raw.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(value[-1:], 1)
    if mult != 1:
        value = value[:-1]
    return int(float(value) * mult)


def _parse(tp: Any, raw: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        return parse_bool(raw)
    if tp is int:
        return int(raw)
    if tp is float:
        return float(raw)
    if origin in (list, tuple) or tp in (list, tuple):
        items = [x.strip() for x in raw.split(",") if x.strip()]
        return items if origin is list or tp is list else tuple(items)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if raw.strip() == "" else _parse(args[0], raw)
    return raw


def load(cls: type, environ: Mapping[str, str] | None = None, **overrides: Any) -> Any:
    """Build the settings dataclass ``cls`` from ``environ`` plus overrides."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = f.metadata.get("env")
        if f.name in overrides:
            values[f.name] = overrides.pop(f.name)
        elif name and name in environ:
            try:
                values[f.name] = _parse(hints[f.name], environ[name])
            except ValueError as exc:
                raise SettingsError(f"{name}: {exc}") from None
        elif dataclasses.is_dataclass(hints[f.name]):
            values[f.name] = load(hints[f.name], environ)
    if overrides:
        raise TypeError(f"unknown settings: {', '.join(overrides)}")
    return cls(**values)


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(variable, default, doc) rows for the README's configuration table."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name]))
        elif f.metadata.get("env"):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[operator]
            rows.append((f.metadata["env"], default, f.metadata.get("doc", "")))
    return rows


@dataclass(frozen=True)
class SandboxSettings:
    backend: str = env(
        "GROUNDLOOP_SANDBOX_BACKEND", "docker", "`docker` (default) or `local` (development only: no isolation)"
    )
    image: str = env("GROUNDLOOP_SANDBOX_IMAGE", "groundloop-sandbox:latest", "sandbox image tag")
    runtime: str = env("GROUNDLOOP_SANDBOX_RUNTIME", "runc", "OCI runtime: `runc`, or `runsc` for gVisor")
    pool_size: int = env("GROUNDLOOP_POOL_SIZE", 2, "warm containers kept ready ahead of demand")
    memory: str = env("GROUNDLOOP_SANDBOX_MEMORY", "512m", "memory limit per sandbox (swap is the same: none extra)")
    cpus: float = env("GROUNDLOOP_SANDBOX_CPUS", 1.0, "CPU quota per sandbox, in cores")
    pids_limit: int = env("GROUNDLOOP_SANDBOX_PIDS", 256, "processes and threads per sandbox")
    nofile: int = env("GROUNDLOOP_SANDBOX_NOFILE", 1024, "open files per process")
    tmp_size: str = env("GROUNDLOOP_SANDBOX_TMP_SIZE", "64m", "size of the /tmp tmpfs")
    workspace_size: str = env("GROUNDLOOP_SANDBOX_WORKSPACE_SIZE", "256m", "size of the /workspace tmpfs")
    exec_timeout_s: float = env("GROUNDLOOP_EXEC_TIMEOUT_S", 30.0, "default timeout of run_code and exec")
    max_exec_timeout_s: float = env("GROUNDLOOP_MAX_EXEC_TIMEOUT_S", 300.0, "largest timeout_s a client may ask for")
    max_output_bytes: int = env(
        "GROUNDLOOP_MAX_OUTPUT_BYTES", 8 << 20, "output kept per request; the rest is dropped with `truncated`"
    )
    max_file_bytes: int = env(
        "GROUNDLOOP_MAX_FILE_BYTES", 16 << 20, "largest file written or read, and the fsize ulimit"
    )
    line_max_bytes: int = env("GROUNDLOOP_LINE_MAX_BYTES", 16 << 10, "longer output lines are split")
    start_timeout_s: float = env(
        "GROUNDLOOP_SANDBOX_START_TIMEOUT_S", 30.0, "a container that does not say hello by then is removed"
    )
    namespace: str = env(
        "GROUNDLOOP_NAMESPACE",
        "default",
        "label value grouping one deployment's containers (orphans of the same namespace are reaped at start-up)",
    )
    server_id: str = env(
        "GROUNDLOOP_SERVER_ID",
        "",
        "this server's id in a fleet (letters, digits, `-`): session ids start with `<id>.` so a proxy can "
        "route a resume to its owner (docs/deploy.md)",
    )

    @property
    def max_frame_bytes(self) -> int:
        """The longest frame the server reads from the agent (a longer one loses the sandbox): the largest
        answer, a file read (base64) or a request's output, twice over for JSON escaping, plus room for one
        batch of output lines."""
        return 2 * max(self.max_output_bytes, self.max_file_bytes) + (4 << 20)

    allow_local: bool = env(
        "GROUNDLOOP_ALLOW_LOCAL_BACKEND",
        False,
        "fall back to the local backend when Docker is unreachable (loopback only)",
    )
    egress_allow: list[str] = env(
        "GROUNDLOOP_EGRESS_ALLOW",
        [],
        "hosts sandboxes may reach through the egress proxy: `pypi.org`, `*.example.org`, `host:8080`, "
        "`host:*` (no port: 80 and 443); empty (default): no egress (docs/security.md)",
    )
    egress_allow_private: list[str] = env(
        "GROUNDLOOP_EGRESS_ALLOW_PRIVATE",
        [],
        "the override that admits non-public addresses (loopback, private, link-local) for egress: CIDRs "
        "(`10.1.0.0/16`) or host names (`index.internal`); empty (default): never",
    )
    egress_max_connections: int = env(
        "GROUNDLOOP_EGRESS_MAX_CONNECTIONS", 16, "egress connections a session may hold open at once"
    )
    egress_max_bytes: int = env(
        "GROUNDLOOP_EGRESS_MAX_BYTES", 1 << 30, "egress bytes (both ways) a session may move in its lifetime"
    )
    channel: str = env(
        "GROUNDLOOP_SANDBOX_CHANNEL",
        "auto",
        "`auto` (default): the agent's frames take a Unix socket per sandbox when Docker runs on this host, "
        "past dockerd and the shim (the attach stream where the agent cannot connect: a remote engine, gVisor "
        "without `--host-uds=open`); `attach`: always Docker's attach stream (docs/architecture.md)",
    )
    run_dir: str = env(
        "GROUNDLOOP_RUN_DIR",
        "",
        "host directory holding one directory per sandbox (its sockets), mounted at /run/groundloop; empty: "
        "`/run/groundloop` as root, else `<tmp>/groundloop-<uid>`",
    )
    watch_coalesce_ms: float = env(
        "GROUNDLOOP_WATCH_COALESCE_MS",
        50.0,
        "watch_files: repeated changes of one path within this window are sent as one `modified` event",
    )
    watch_max_dirs: int = env(
        "GROUNDLOOP_WATCH_MAX_DIRS", 1024, "watch_files: directories one recursive watch may watch (then `overflow`)"
    )
    transfer_chunk_bytes: int = env(
        "GROUNDLOOP_TRANSFER_CHUNK_BYTES",
        1 << 20,
        "download_file's chunk size (bytes before base64), and the upload chunk size the `ready` limits suggest",
    )
    upload_idle_s: float = env(
        "GROUNDLOOP_UPLOAD_IDLE_S",
        60.0,
        "an upload_file with no chunk for this long is dropped (its temporary file too)",
    )
    max_terminals: int = env("GROUNDLOOP_MAX_TERMINALS", 4, "terminals open at once per session (open_terminal)")
    workspace_dir: str = env(
        "GROUNDLOOP_WORKSPACE_DIR",
        "",
        "host directory of the named workspaces (`?workspace=` at connect; docs/workspaces.md); empty: none",
    )
    workspace_quota: str = env(
        "GROUNDLOOP_WORKSPACE_QUOTA", "1g", "disk per user for all of their workspaces and snapshots"
    )
    workspace_quota_mode: str = env(
        "GROUNDLOOP_WORKSPACE_QUOTA_MODE",
        "auto",
        "`loop` (a loop-mounted ext4 image per user: a hard limit; needs root), `measured` (usage checked "
        "before a new workspace or snapshot), `auto` (loop when possible)",
    )
