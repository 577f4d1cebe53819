"""Programs that several tests run in a sandbox."""

from __future__ import annotations

# Prints 100 lines, waits for /workspace/go, prints 200 more: a stream a test can cut in the middle.
GATED = """\
import os, time
for i in range(100):
    print(i, flush=True)
while not os.path.exists('/workspace/go'):
    time.sleep(0.02)
for i in range(100, 300):
    print(i, flush=True)
"""
