"""Does every published strategies table still reproduce? Re-run one cell of each (`make results-check`).

For each `experiments/results/strategies_*.json` (what `experiments/strategies.py` wrote; the README quotes them),
run one strategy with the table's first seed and settings for one round on the current code, and compare its
round-0 metrics with the file's. Prints what moved (field: file → now) and exits 1 if anything did:

    PYTHONPATH=experiments .venv/bin/python experiments/results_check.py [--files strategies_test ...]
    [--tolerance 1e-4]

The cell is `dccl` where the table has it (it depends on the most code: the device step, distillation, the
patch-space update), else the table's last strategy. Round 0 depends on nothing later (windows and schedules are
per round), so one round suffices. The tolerance allows for float sums in another order (another thread count or
CPU), not for a change of method.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from strategies import RESULTS, run_one

# what a cell is compared on: the quality figures a table shows (the older files' names included)
COMPARED = (
    "broadcast_gauc",
    "start_gauc",
    "device_gauc",
    "cloud_gauc",
    "tail_device_gauc",
    "tail_cloud_gauc",
    "device_hr10",
    "cloud_hr10",
    "device_ndcg10",
    "cloud_ndcg10",
    "device_full_hr@10",
    "cloud_full_ndcg@10",
)


def check(path: Path, tolerance: float, work_dir: Path) -> dict[str, Any]:
    """One cell of one table: {"file", "strategy", "seed", "moved": {field: (file, now)}, "compared", "seconds"}."""
    results = json.loads(path.read_text())
    strategy = "dccl" if "dccl" in results["runs"] else list(results["runs"])[-1]
    run = results["runs"][strategy][0]
    recorded = run["rounds"][0]
    args = argparse.Namespace(split=results["split"], overrides=list(results["overrides"]), rounds=1)
    torch.set_num_threads(int(results.get("threads", 1)))  # the table's own thread count
    tic = time.perf_counter()
    now = run_one(strategy, run["seed"], args, work_dir)[0]
    moved, compared = {}, []
    for name in COMPARED:
        old, new = recorded.get(name), now.get(name)
        if old is None or new is None or (isinstance(old, float) and math.isnan(old)):
            continue
        compared.append(name)
        if not abs(old - new) <= tolerance:
            moved[name] = (old, new)
    return {
        "file": path.name,
        "strategy": strategy,
        "seed": run["seed"],
        "moved": moved,
        "compared": compared,
        "seconds": time.perf_counter() - tic,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="+", help="result names (default: every strategies_*.json)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest difference that is not a move")
    args = parser.parse_args(argv)
    names = args.files or sorted(p.stem for p in RESULTS.glob("strategies_*.json"))
    paths = [RESULTS / f"{name}.json" for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such results file: {', '.join(missing)}")
    moved_any = False
    with tempfile.TemporaryDirectory(prefix="dccl-results-check-") as tmp:
        for path in paths:
            outcome = check(path, args.tolerance, Path(tmp) / path.stem)
            cell = f"{outcome['file']}: {outcome['strategy']} seed {outcome['seed']} round 0"
            if outcome["moved"]:
                moved_any = True
                changes = ", ".join(f"{k} {old:.4f} → {new:.4f}" for k, (old, new) in outcome["moved"].items())
                print(f"MOVED  {cell}: {changes}", flush=True)
            else:
                print(f"same   {cell}: {len(outcome['compared'])} figures within {args.tolerance:g}", flush=True)
    return 1 if moved_any else 0


if __name__ == "__main__":
    sys.exit(main())
