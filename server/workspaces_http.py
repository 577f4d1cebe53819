"""HTTP routes of named workspaces (docs/workspaces.md), with the bearer token as everywhere:

- ``GET /v1/workspaces``: the caller's workspaces, their sizes and snapshots, and the quota;
- ``DELETE /v1/workspaces/{name}``: a workspace and its snapshots (``409 in_use`` while a
  session has it open);
- ``DELETE /v1/workspaces/{name}/snapshots/{snapshot}``: one snapshot.

A user only ever names their own workspaces: the store's paths start from a hash of the
authenticated user id, so another user's name is simply not found.
"""

from __future__ import annotations

from typing import Any

from groundloop.sandbox.workspaces import WorkspaceError
from groundloop.sessions.errors import AuthError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .http import _error, _gl

STATUS = {"bad_request": 400, "not_found": 404, "in_use": 409, "quota_exceeded": 507, "internal": 500}


async def _user(request: Request) -> tuple[Any, str] | Response:
    gl = _gl(request)
    try:
        user = gl.auth.http(request.headers, request.url.scheme)
    except AuthError as exc:
        gl.metrics.error(exc.code)
        return _error(exc.status, exc.code, exc.message)
    if gl.manager is None:
        return _error(503, "busy", "the server is starting")
    if not gl.manager.take_token(user):  # a listing walks the user's files: held to the same rate as requests
        gl.metrics.error("rate_limited")
        s = gl.settings
        return _error(429, "rate_limited", f"over {s.rate_per_s:g} requests/s (burst {s.rate_burst})")
    if not gl.manager.workspaces.enabled:
        return _error(404, "not_found", "this server has no named workspaces (GROUNDLOOP_WORKSPACE_DIR is not set)")
    return gl, user


def _refused(exc: WorkspaceError) -> Response:
    return _error(STATUS.get(exc.code, 400), exc.code, exc.message)


async def list_workspaces(request: Request) -> Response:
    who = await _user(request)
    if isinstance(who, Response):
        return who
    gl, user = who
    return JSONResponse(await gl.manager.workspaces.listing(user))


async def delete_workspace(request: Request) -> Response:
    who = await _user(request)
    if isinstance(who, Response):
        return who
    gl, user = who
    name = request.path_params["name"]
    try:
        await gl.manager.workspaces.delete(user, name)
    except WorkspaceError as exc:
        return _refused(exc)
    return JSONResponse({"deleted": name})


async def delete_snapshot(request: Request) -> Response:
    who = await _user(request)
    if isinstance(who, Response):
        return who
    gl, user = who
    name, snapshot = request.path_params["name"], request.path_params["snapshot"]
    try:
        await gl.manager.workspaces.delete_snapshot(user, name, snapshot)
    except WorkspaceError as exc:
        return _refused(exc)
    return JSONResponse({"deleted": snapshot, "workspace": name})
