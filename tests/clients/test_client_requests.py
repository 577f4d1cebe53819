"""The Python client's side of issue 16 against the real server (real uvicorn, real Docker): env per run,
the session's environment, restart_context, bash contexts, and the error kinds it reads."""

from __future__ import annotations

import pytest
from groundloop.client import RequestError, connect

pytestmark = pytest.mark.docker


async def test_env_restart_and_bash_through_the_client(server):
    async with connect(server.url, "tok1") as s:
        run = await s.run_code("import os\nx = os.environ['ONE']", env={"ONE": "1"})
        assert run.error is None, run.error
        assert await s.set_env({"TWO": "2"}) == ["TWO"]
        run = await s.run_code("print(x, os.environ['TWO'], os.environ.get('ONE'))")
        assert run.stdout == "1 2 None\n"
        await s.restart_context("default-python")
        run = await s.run_code("x")
        assert run.error is not None and run.error.name == "NameError"
        run = await s.run_code("cd /tmp && echo $TWO", language="bash")
        assert run.stdout == "2\n"
        assert (await s.run_code("pwd", language="bash")).stdout == "/tmp\n"
        with pytest.raises(RequestError) as info:
            await s.restart_context("nope")
        assert info.value.name == "ContextNotFound"
