"""Part 5, Flower's simulation engine side by side with dccl-sim's packed device step.

`flwr[simulation]` pins ray 2.55.1 and dccl-sim pins ray 2.60.0, so Flower cannot be installed next to dccl-sim:
it gets its own environment, `.venv-flower` in the repository root (`make bench-flower-env`: torch, Flower, dccl-sim
without its Ray pin). Where that environment exists, this part runs `bench/flower_sim.py` in it as a subprocess
(Flower and dccl-sim measured in that one process, see its docstring) and returns the JSON it writes; otherwise
the result says that Flower is not installed and how to install it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FLOWER_PYTHON = ROOT / ".venv-flower" / "bin" / "python"
BUILD = "make bench-flower-env"

# what `pip install --dry-run "flwr[simulation]"` said on 2026-11-21 (flwr 1.41.0, the newest release)
CONFLICT = (
    "flwr[simulation] 1.41.0 pins ray==2.55.1 (and protobuf<7, rich<15), while dccl-sim pins ray==2.60.0, so Flower "
    "runs in its own environment, .venv-flower"
)
# client_resources num_cpus: an actor per core, torch on 1 thread in each; Flower's own default, 2, gives one actor
# whose two torch threads contend with Flower's engine process for the 2 cores (NOTES.md, 2026-12-04, afternoon)
CLIENT_CPUS = 1.0
LOG_TAIL = 2000  # characters of the subprocess's output kept in a failure's reason


def measure(
    devices: Sequence[int],
    overrides: Sequence[str],
    repeats: int,
    client_cpus: float,
    log_path: Path,
    python: Path | None = None,
) -> dict[str, Any]:
    """Run the side-by-side in `python`'s environment (default `FLOWER_PYTHON`); its output goes to `log_path`."""
    python = python or FLOWER_PYTHON
    if not python.is_file():
        return {"status": "not installed", "reason": f"{CONFLICT}, which is not built here: run `{BUILD}`"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "flower.json"
        command = [str(python), "-m", "bench.flower_sim", "--devices", *map(str, devices), "--repeats", str(repeats)]
        command += ["--client-cpus", str(client_cpus), "--out", str(out)]
        command += [arg for override in overrides for arg in ("--set", override)]
        # this checkout's dccl_sim and bench, whichever checkout the environment's editable install points to
        path = os.pathsep.join([str(ROOT), str(ROOT / "experiments"), *filter(None, [os.environ.get("PYTHONPATH")])])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as log:
            done = subprocess.run(
                command, cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, stdout=log, stderr=subprocess.STDOUT
            )
        if done.returncode != 0 or not out.is_file():
            tail = log_path.read_text(errors="replace")[-LOG_TAIL:]
            return {
                "status": "failed",
                "reason": f"{python} -m bench.flower_sim exited with {done.returncode}; its output is in {log_path}",
                "log_tail": tail,
            }
        return json.loads(out.read_text())
