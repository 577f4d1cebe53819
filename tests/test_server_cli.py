"""The groundloop command line (no server is started here)."""

from __future__ import annotations

from groundloop.server.cli import main


def test_config_prints_the_table(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| Variable | Default | Meaning |")
    for name in ("GROUNDLOOP_TOKENS", "GROUNDLOOP_RESUME_GRACE_S", "GROUNDLOOP_POOL_SIZE"):
        assert f"`{name}`" in out


def test_serve_refuses_a_public_bind_without_tokens(monkeypatch, capsys):
    monkeypatch.delenv("GROUNDLOOP_TOKENS", raising=False)
    monkeypatch.delenv("GROUNDLOOP_TOKENS_FILE", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "without tokens" in capsys.readouterr().err


def test_tokens_file(tmp_path):
    from conftest import server_settings
    from groundloop.server.auth import Authenticator

    path = tmp_path / "tokens"
    path.write_text("# comment\nsecret-a:ann\n\nsecret-b:ben\n")
    auth = Authenticator(server_settings(tokens=[], tokens_file=str(path), host="0.0.0.0"))
    assert auth.user_for("secret-b") == "ben" and not auth.anonymous
