"""The workspace store (sandbox/workspaces.py) on a temporary directory, without Docker: names, the
per-user layout, measured mode's quota, deletion; loop mode where this process can mount (root)."""

from __future__ import annotations

import os

import pytest
from groundloop.sandbox.workspaces import WorkspaceError, WorkspaceStore, check_name, loop_available, user_key


@pytest.mark.parametrize("name", ["a", "proj-1", "v1.2_x", "A" * 64])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", ".hidden", "-x", "_x", "A" * 65, "a\0", "é", None, 3])
def test_bad_names(name):
    with pytest.raises(WorkspaceError) as info:
        check_name(name)
    assert info.value.code == "bad_request"


def test_users_are_hashed_apart():
    assert user_key("alice") != user_key("bob")
    for user in ("../..", "a/b", "", "\0", "é"):
        key = user_key(user)
        assert len(key) == 32 and key.isalnum()


def test_measured_mode_layout_quota_and_delete(tmp_path):
    store = WorkspaceStore(str(tmp_path), quota=1 << 20, mode="measured")
    path = store.open("alice", "w")
    assert path == str(tmp_path / user_key("alice") / "data" / "workspaces" / "w")
    assert (tmp_path / user_key("alice") / "user").read_text() == "alice\n"
    if os.geteuid() == 0:
        assert os.stat(path).st_uid == 1000
    assert store.open("alice", "w") == path  # opening again is the same directory
    assert store.open("bob", "w") != path
    with open(os.path.join(path, "big"), "wb") as f:
        f.write(b"x" * (2 << 20))
    listing = store.listing("alice")
    assert listing["mode"] == "measured" and listing["used"] >= 2 << 20
    assert [w["name"] for w in listing["workspaces"]] == ["w"]
    with pytest.raises(WorkspaceError) as info:
        store.open("alice", "other")
    assert info.value.code == "quota_exceeded"
    store.open("bob", "other")  # bob's quota is his own
    # a symbolic link the sandbox left is removed, never followed
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    os.symlink(outside, os.path.join(path, "link"))
    store.delete("alice", "w")
    assert outside.read_text() == "keep"
    assert store.listing("alice")["workspaces"] == []
    with pytest.raises(WorkspaceError) as info:
        store.delete("alice", "w")
    assert info.value.code == "not_found"


@pytest.mark.skipif(not loop_available(), reason="loop devices need root and losetup")
def test_loop_mode_mounts_a_filesystem_of_the_quota_and_gives_it_back(tmp_path):
    store = WorkspaceStore(str(tmp_path), quota=16 << 20, mode="auto")
    assert store.mode == "loop"
    path = store.open("alice", "w")
    data = tmp_path / user_key("alice") / "data"
    assert os.path.ismount(data)
    st = os.statvfs(data)
    assert 8 << 20 < st.f_blocks * st.f_frsize <= 16 << 20
    with pytest.raises(OSError) as info, open(os.path.join(path, "fill"), "wb") as f:
        for _ in range(32):
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
    assert info.value.errno == 28  # ENOSPC
    store.delete("alice", "w")
    assert not os.path.ismount(data) and not (tmp_path / user_key("alice") / "fs.img").exists()
    store.close()
