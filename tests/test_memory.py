"""The memory monitor counts the processes a run starts, not only the driver."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from dccl_sim.runtime.memory import MemoryMonitor, tree_memory_mb

CHILD = """
import sys, time
block = bytearray(200 * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1  # touch every page so it is resident
print("ready", flush=True)
time.sleep(30)
"""


def test_peak_includes_a_child_process_and_resets_after_it_exits() -> None:
    with MemoryMonitor(interval_s=0.05) as memory:
        baseline = memory.take_peak()
        child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(0.3)
            with_child = memory.take_peak()
        finally:
            child.kill()
            child.wait()
        after = memory.take_peak()  # the interval since the last call began with the child still alive
        settled = memory.take_peak()
    assert with_child - baseline > 150
    assert after >= settled
    assert settled - baseline < 50
    assert abs(tree_memory_mb(psutil.Process()) - settled) < 50
