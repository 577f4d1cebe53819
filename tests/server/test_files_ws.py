"""Live files over the real WebSocket, under runc and runsc: watch_files, chunked upload and download.

One server per runtime (module-scoped), with a frame limit of 256 KiB so that
a 1 MiB file is several frames' worth, and a file size limit of 2 MiB. Every
test opens its own session. What is checked is what a client sees: the
``watching`` frame, then ``file_event`` frames in the order things happened,
coalesced; uploads and downloads byte-exact with their progress; each request
ending with exactly one ``done``.
"""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
import pytest_asyncio
from support.env import sandbox_settings, server_settings
from support.servers import run_server
from support.wsclient import WSClient

pytestmark = [pytest.mark.docker, pytest.mark.asyncio(loop_scope="module")]

RUNTIMES = [pytest.param("runc"), pytest.param("runsc", marks=pytest.mark.runsc)]
FRAME_MAX = 256 << 10
FILE_MAX = 2 << 20
W = "/workspace"


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=RUNTIMES)
async def srv(request):
    sb = sandbox_settings(runtime=request.param, pool_size=1, max_file_bytes=FILE_MAX, upload_idle_s=2.0)
    settings = server_settings(
        sandbox=sb,
        max_message_bytes=FRAME_MAX,
        rate_per_s=1000.0,
        rate_burst=1000,
        resume_grace_s=1.0,
        max_sessions_per_user=32,
    )
    async with run_server(settings) as s:
        s.runtime = request.param
        yield s


async def connect(srv) -> WSClient:
    c = await WSClient.connect(srv.url, token="tok1")
    assert c.ready["sandbox"]["runtime"] == srv.runtime
    assert c.ready["limits"]["transfer_chunk_bytes"] == 1 << 20
    return c


async def watch(c: WSClient, **fields) -> str:
    """Start a watch_files; returns its id once its ``watching`` frame came (events are live from then)."""
    wid = await c.send("watch_files", **fields)
    while True:
        f = await c.recv()
        if f.get("id") == wid:
            assert f["type"] == "watching", repr(f)
            return wid


async def events_until(c: WSClient, wid: str, last) -> list[dict]:
    """The file events of watch ``wid`` up to and including the first one for which ``last(event)``."""
    seen = 0
    while True:
        evs = [f for f in c.of(wid) if f["type"] == "file_event"]
        for e in evs[seen:]:
            if last(e):
                return evs
        seen = len(evs)
        f = await c.recv()
        assert not (f.get("id") == wid and f["type"] == "done"), f"the watch ended: {f}"


async def cancel(c: WSClient, wid: str) -> dict:
    done = await c.call("cancel", target=wid)
    assert done["ok"] and done["found"]
    frames = await c.until_done(wid)
    assert [f["type"] for f in frames].count("done") == 1
    return frames[-1]


async def sh(c: WSClient, command: str) -> None:
    done = await c.call("exec", command=command)
    assert done["ok"] and done["exit_code"] == 0, done


def first(evs: list[dict], kind: str, path: str) -> int:
    return next(i for i, e in enumerate(evs) if e["kind"] == kind and e["path"] == path)


# ---- watch_files


async def test_watch_reports_create_modify_move_delete_in_order_and_cancel_ends_it(srv):
    async with await connect(srv) as c:
        wid = await watch(c)
        await sh(c, "echo one > f1 && echo two >> f1 && mv f1 f2 && rm f2 && mkdir dir1")
        evs = await events_until(c, wid, lambda e: e["path"] == f"{W}/dir1")
        created, moved, deleted = first(evs, "created", f"{W}/f1"), first(evs, "moved", f"{W}/f2"), None
        deleted = first(evs, "deleted", f"{W}/f2")
        assert created < moved < deleted, evs
        assert evs[moved]["from"] == f"{W}/f1" and "is_dir" not in evs[moved]
        mods = [i for i, e in enumerate(evs) if e["kind"] == "modified" and e["path"] == f"{W}/f1"]
        assert mods and all(created < i < moved for i in mods), evs  # the writes, before the move
        assert evs[-1] == {
            "type": "file_event",
            "id": wid,
            "seq": evs[-1]["seq"],
            "kind": "created",
            "path": f"{W}/dir1",
            "is_dir": True,
        }
        done = await cancel(c, wid)
        assert not done["ok"] and done["error"]["name"] == "Cancelled"


async def test_watch_recursive_follows_new_subdirectories_and_plain_watch_does_not(srv):
    async with await connect(srv) as c:
        deep = await watch(c, path=W, recursive=True)
        flat = await watch(c, path=".")
        await sh(c, "mkdir -p sub/deeper && echo x > sub/deeper/early")
        # A file made after the subdirectory's watch surely exists: an inotify event, not the scan.
        await sh(c, "echo y > sub/deeper/late && echo z > marker")
        evs = await events_until(c, deep, lambda e: e["path"] == f"{W}/marker")
        paths = {(e["kind"], e["path"]) for e in evs}
        for p in ("sub", "sub/deeper", "sub/deeper/early", "sub/deeper/late"):
            assert ("created", f"{W}/{p}") in paths, (p, evs)
        flat_evs = await events_until(c, flat, lambda e: e["path"] == f"{W}/marker")
        assert ("created", f"{W}/sub") in {(e["kind"], e["path"]) for e in flat_evs}
        assert not [e for e in flat_evs if e["path"].startswith(f"{W}/sub/")], flat_evs
        # A directory moved inside the tree is still watched under its new name.
        await sh(c, "mv sub moved && echo w > moved/deeper/after")
        evs = await events_until(c, deep, lambda e: e["path"] == f"{W}/moved/deeper/after")
        assert any(e["kind"] == "moved" and e["path"] == f"{W}/moved" and e["from"] == f"{W}/sub" for e in evs)
        for wid in (deep, flat):
            await cancel(c, wid)


async def test_a_thousand_writes_are_coalesced(srv):
    async with await connect(srv) as c:
        wid = await watch(c)
        code = (
            "for i in range(1000):\n"
            "    with open('busy.txt', 'w') as f:\n"
            "        f.write(str(i))\n"
            "with open('after.txt', 'w') as f:\n"
            "    f.write('end')\n"
        )
        done = await c.call("run_code", code=code)
        assert done["ok"], done
        # The changes held in a window go out when it closes: after the events of other paths that came
        # meanwhile (order is kept per path only).
        evs = await events_until(c, wid, lambda e: e["path"] == f"{W}/busy.txt" and e.get("count", 1) > 1)
        evs = await events_until(c, wid, lambda e: e["path"] == f"{W}/after.txt")
        busy = [e for e in evs if e["path"] == f"{W}/busy.txt"]
        assert busy[0]["kind"] == "created"
        assert all(e["kind"] == "modified" for e in busy[1:])
        # Without coalescing: at least 2000 events (a modify and a close per write). With it: a few, each
        # saying how many changes it stands for.
        assert 2 <= len(busy) <= 100, len(busy)
        await cancel(c, wid)


async def test_watch_of_a_missing_directory_fails_at_once(srv):
    async with await connect(srv) as c:
        done = await c.call("watch_files", path="no/such/dir")
        assert not done["ok"] and done["error"]["name"] == "FileNotFoundError"


async def test_deleting_the_watched_directory_ends_the_watch(srv):
    async with await connect(srv) as c:
        await sh(c, "mkdir gone")
        wid = await watch(c, path="gone")
        await sh(c, "rmdir gone")
        frames = await c.until_done(wid)
        assert frames[-1]["ok"], frames[-1]
        assert any(f.get("kind") == "deleted" and f["path"] == f"{W}/gone" for f in frames)


# ---- chunked transfers


async def upload(c: WSClient, path: str, data: bytes, chunk: int) -> tuple[dict, list[dict]]:
    uid = await c.send("upload_file", path=path, size=len(data))
    for off in range(0, len(data), chunk):
        part = base64.b64encode(data[off : off + chunk]).decode()
        d = await c.call("upload_chunk", upload=uid, offset=off, content=part)
        assert d["ok"] and d["received"] == min(off + chunk, len(data)), d
    frames = await c.until_done(uid)
    return frames[-1], [f for f in frames if f["type"] == "progress"]


async def test_upload_and_download_of_a_file_several_frames_long_are_byte_exact(srv):
    data = os.urandom((1 << 20) + 4321)  # four times the frame limit, and a ragged end
    digest = hashlib.sha256(data).hexdigest()
    async with await connect(srv) as c:
        assert len(base64.b64encode(data)) > 4 * FRAME_MAX  # far from fitting one frame
        done, progress = await upload(c, "in/big.bin", data, chunk=96 << 10)
        assert done["ok"] and done["size"] == len(data) and done["sha256"] == digest, done
        assert done["path"] == f"{W}/in/big.bin"
        assert [p["bytes"] for p in progress] == sorted(p["bytes"] for p in progress)
        assert progress[-1]["bytes"] == progress[-1]["total"] == len(data) and len(progress) == 11
        check = await c.request(
            "run_code",
            code="import hashlib, os\nprint(hashlib.sha256(open('in/big.bin','rb').read()).hexdigest())\n"
            "print(sorted(os.listdir('in')))",
        )
        assert WSClient.text(check) == f"{digest}\n['big.bin']\n"  # no temporary file left

        frames = await c.request("download_file", path="in/big.bin", chunk_bytes=64 << 10)
        chunks = [f for f in frames if f["type"] == "file_chunk"]
        assert all(f["size"] == len(data) for f in chunks) and len(chunks) == 17
        assert [f["offset"] for f in chunks] == list(range(0, len(data), 64 << 10))
        got = b"".join(base64.b64decode(f["content"]) for f in chunks)
        assert got == data
        assert frames[-1]["ok"] and frames[-1]["sha256"] == digest and frames[-1]["size"] == len(data)


async def test_upload_over_the_size_limit_is_refused_clearly(srv):
    async with await connect(srv) as c:
        done = await c.call("upload_file", path="huge.bin", size=FILE_MAX + 1)
        assert not done["ok"] and done["error"]["name"] == "FileTooLarge"
        assert str(FILE_MAX) in done["error"]["message"]
        done = await c.call("upload_file", path="neg.bin", size=-1)
        assert not done["ok"] and done["error"]["name"] == "ValueError"


async def test_upload_chunk_errors_and_cleanup(srv):
    async with await connect(srv) as c:
        d = await c.call("upload_chunk", upload="nope", offset=0, content="")
        assert not d["ok"] and d["error"]["name"] == "UploadNotFound"

        # A chunk at the wrong offset is refused; the upload goes on.
        uid = await c.send("upload_file", path="x.txt", size=6)
        d = await c.call("upload_chunk", upload=uid, offset=3, content=base64.b64encode(b"def").decode())
        assert not d["ok"] and d["error"]["name"] == "BadOffset" and "offset 0" in d["error"]["message"]
        assert (await c.call("upload_chunk", upload=uid, offset=0, content=base64.b64encode(b"abc").decode()))["ok"]
        # Cancelled half way: nothing lands, no temporary file is left.
        assert (await c.call("cancel", target=uid))["found"]
        frames = await c.until_done(uid)
        assert frames[-1]["error"]["name"] == "Cancelled"
        listing = await c.call("list_files", path=".")
        assert [e["name"] for e in listing["entries"] if "x.txt" in e["name"]] == []

        # More bytes than declared: the chunk and the upload fail.
        uid = await c.send("upload_file", path="y.txt", size=2)
        d = await c.call("upload_chunk", upload=uid, offset=0, content=base64.b64encode(b"abc").decode())
        assert not d["ok"] and d["error"]["name"] == "TooMuchData"
        assert (await c.until_done(uid))[-1]["error"]["name"] == "TooMuchData"

        # Abandoned (no chunk within upload_idle_s = 2 s): dropped, with its temporary file.
        uid = await c.send("upload_file", path="z.txt", size=10)
        frames = await c.until_done(uid)
        assert frames[-1]["error"]["name"] == "UploadAbandoned"
        listing = await c.call("list_files", path=".")
        assert [e["name"] for e in listing["entries"] if "z.txt" in e["name"] or "y.txt" in e["name"]] == []

        # An empty file needs no chunk at all.
        uid = await c.send("upload_file", path="empty.txt", size=0)
        done = (await c.until_done(uid))[-1]
        assert done["ok"] and done["size"] == 0 and done["sha256"] == hashlib.sha256(b"").hexdigest()


async def test_download_errors(srv):
    async with await connect(srv) as c:
        d = await c.call("download_file", path="missing.bin")
        assert not d["ok"] and d["error"]["name"] == "FileNotFoundError"
        d = await c.call("download_file", path=".")
        assert not d["ok"] and d["error"]["name"] == "IsADirectoryError"
