"""Baselines measured in the same run: a local Jupyter kernel (jupyter_client + ipykernel)."""

from __future__ import annotations

import time

from .stats import Table, summary_ms


def jupyter(table: Table, n: int) -> None:
    try:
        from jupyter_client.manager import start_new_kernel
    except ImportError:
        table.add("local Jupyter kernel: 1 + 1 round trip", "not installed (pip install -e '.[bench]')")
        return
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        samples = []
        for i in range(n + 5):
            t0 = time.perf_counter()
            msg_id = kc.execute("1 + 1")
            while True:  # the execute_reply: the kernel has run the cell
                reply = kc.get_shell_msg(timeout=30)
                if reply["parent_header"].get("msg_id") == msg_id:
                    break
            if i >= 5:
                samples.append(time.perf_counter() - t0)
            assert reply["content"]["status"] == "ok"
        s = summary_ms(samples)
        table.add(
            "local Jupyter kernel: 1 + 1 round trip (no isolation)", f"p50 {s['p50']:.3f} ms, p99 {s['p99']:.3f} ms"
        )
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
