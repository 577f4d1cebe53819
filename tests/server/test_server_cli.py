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
    from groundloop.server.auth import Authenticator
    from support.env import server_settings

    path = tmp_path / "tokens"
    path.write_text("# comment\nsecret-a:ann\n\nsecret-b:ben\n")
    auth = Authenticator(server_settings(tokens=[], tokens_file=str(path), host="0.0.0.0"))
    assert auth.user_for("secret-b") == "ben" and not auth.anonymous


def test_anthropic_key_from_a_file(tmp_path, monkeypatch):
    """Issue 20: the model key is a mounted file (a Kubernetes secret), not an environment variable."""
    import pytest
    from groundloop.server.app import create_app
    from groundloop.server.settings import SettingsError
    from support.env import server_settings

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    key = tmp_path / "anthropic-api-key"
    key.write_text("sk-test-from-file\n")
    app = create_app(server_settings(anthropic_api_key_file=str(key)))
    assist = app.state.groundloop.assist
    assert assist.available and assist.client().api_key == "sk-test-from-file"
    assert not create_app(server_settings()).state.groundloop.assist.available
    with pytest.raises(SettingsError, match="cannot read"):
        create_app(server_settings(anthropic_api_key_file=str(tmp_path / "missing")))
    key.write_text("\n")
    with pytest.raises(SettingsError, match="empty"):
        create_app(server_settings(anthropic_api_key_file=str(key)))


def test_server_id_is_checked():
    import pytest
    from groundloop.sandbox.engine import new_session_id
    from groundloop.server.app import create_app
    from groundloop.server.settings import SettingsError
    from support.env import sandbox_settings, server_settings

    for bad in ("a.b", "-x", "x" * 64, "a b"):
        with pytest.raises(SettingsError, match="GROUNDLOOP_SERVER_ID"):
            create_app(server_settings(sandbox=sandbox_settings(server_id=bad)))
    sid = new_session_id("node-7")
    assert sid.startswith("node-7.") and "." not in sid[len("node-7.") :]
    assert "." not in new_session_id()
