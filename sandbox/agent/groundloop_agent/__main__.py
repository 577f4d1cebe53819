import os
import sys

# The agent speaks no TLS (its egress proxy passes TLS through untouched). Without this, `import asyncio`
# loads ssl and libssl: about 10 ms of every sandbox's start on this machine (measured, in an image where
# asyncio's whole import is 55-90 ms). asyncio is written to work without ssl. Only this process: the
# workers are interpreters of their own.
sys.modules["ssl"] = None  # type: ignore[assignment]

from .agent import main  # noqa: E402
from .init import make_undumpable, run_as_init  # noqa: E402

if os.getpid() == 1:  # the container's init (no docker-init: see init.py)
    run_as_init(main)
else:
    make_undumpable()
    main()
