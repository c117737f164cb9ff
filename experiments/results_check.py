"""Does every published figure still reproduce? Re-run one cell of each results file (`make results-check`).

For each results file under `experiments/results/` that the README quotes, run one cell on the current code and
compare it with the file. Prints what moved (field: file → now) and exits 1 if anything did:

    PYTHONPATH=experiments .venv/bin/python experiments/results_check.py [--files strategies_test ...]
    [--tolerance 1e-4]

- `strategies_*.json` (`experiments/strategies.py`): one strategy with the table's first seed, one round. The cell is
  `dccl` where the table has it (it depends on the most code: the device step, distillation, the patch-space
  update), else the table's last strategy. Round 0 depends on nothing later (windows and schedules are per round).
- `personalization_map.json`: the first deviation and seed, the frozen-cloud `metapatch` run for one round: the
  personalization gain per activity bucket with the cloud one window stale.
- `central_baseline.json`: the first seed, trained and scored as the file says (DIN and popularity, valid and test).

The tolerance allows for float sums in another order (another thread count or CPU), not for a change of method.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import central_baseline
import personalization_map
import strategies
import torch
from strategies import RESULTS

from dccl_sim import load_config

# what a strategies cell is compared on: the quality figures a table shows (the older files' names included)
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


@dataclass(frozen=True)
class Outcome:
    """One checked cell: which, the figures compared, those that moved ({name: (file, now)}) and its time."""

    file: str
    cell: str
    compared: list[str]
    moved: dict[str, tuple[float, float]]
    seconds: float


def compare(recorded: dict[str, Any], now: dict[str, Any], names: Iterable[str], tolerance: float) -> tuple:
    """(compared, moved) over the `names` both hold and the file has a number for."""
    moved, compared = {}, []
    for name in names:
        old, new = recorded.get(name), now.get(name)
        if old is None or new is None or (isinstance(old, float) and math.isnan(old)):
            continue
        compared.append(name)
        if not abs(old - new) <= tolerance:
            moved[name] = (old, new)
    return compared, moved


def check_strategies(results: dict[str, Any], tolerance: float, work_dir: Path) -> tuple[str, list, dict]:
    strategy = "dccl" if "dccl" in results["runs"] else list(results["runs"])[-1]
    run = results["runs"][strategy][0]
    args = argparse.Namespace(split=results["split"], overrides=list(results["overrides"]), rounds=1)
    torch.set_num_threads(int(results.get("threads", 1)))  # the table's own thread count
    now = strategies.run_one(strategy, run["seed"], args, work_dir)[0]
    return f"{strategy} seed {run['seed']} round 0", *compare(run["rounds"][0], now, COMPARED, tolerance)


def check_personalization_map(results: dict[str, Any], tolerance: float, work_dir: Path) -> tuple[str, list, dict]:
    deviation, per_seed = next(iter(results["cells"].items()))
    seed = results["seeds"][0]
    args = argparse.Namespace(devices=results["devices"], rounds=1, overrides=list(results["overrides"]))
    torch.set_num_threads(1)  # the script's default, which the published map used (its "machine" line says so)
    labels = [*personalization_map.bucket_column_labels(results["bucket_quantiles"])]
    common = personalization_map.cell_overrides(float(deviation), seed, args)
    gains = personalization_map.personalization_gains(common, 1, work_dir, len(labels) - 1)[0]  # labels end with "all"
    names = [f"personalization gain, {label}" for label in labels]
    recorded = dict(zip(names, per_seed[0]["personalization_gain"][0], strict=True))
    cell = f"deviation {float(deviation):g} seed {seed}, cloud 1 window stale"
    return cell, *compare(recorded, dict(zip(names, gains.tolist(), strict=True)), names, tolerance)


def check_central_baseline(results: dict[str, Any], tolerance: float, work_dir: Path) -> tuple[str, list, dict]:
    settings = results["settings"]
    seed = settings["seeds"][0]
    torch.set_num_threads(int(results["environment"]["torch_threads"]))
    config = load_config(None, list(settings["overrides"]))
    now = central_baseline.run_seed(config, seed, settings["epochs"])

    def flat(run: dict[str, Any]) -> dict[str, float]:
        return {
            f"{scorer} {split} {name}": value
            for scorer in central_baseline.SCORERS
            for split, values in run[scorer].items()
            for name, value in values.items()
        }

    recorded = flat(results["per_seed"][0])
    return f"seed {seed}, {settings['epochs']} epochs", *compare(recorded, flat(now), recorded, tolerance)


def check(path: Path, tolerance: float, work_dir: Path) -> Outcome:
    """Re-run one cell of the results file `path` and compare."""
    results = json.loads(path.read_text())
    checker = CHECKS[_kind(path.stem)]
    tic = time.perf_counter()
    cell, compared, moved = checker(results, tolerance, work_dir)
    return Outcome(path.name, cell, compared, moved, time.perf_counter() - tic)


CHECKS = {
    "strategies": check_strategies,
    "personalization_map": check_personalization_map,
    "central_baseline": check_central_baseline,
}


def _kind(stem: str) -> str:
    return "strategies" if stem.startswith("strategies_") else stem


def published() -> list[str]:
    """The results files this script knows how to check, by name."""
    return sorted(p.stem for p in RESULTS.glob("*.json") if _kind(p.stem) in CHECKS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", nargs="+", help=f"result names (default: all of {', '.join(published())})")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest difference that is not a move")
    args = parser.parse_args(argv)
    names = args.files or published()
    paths = [RESULTS / f"{name}.json" for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        parser.error(f"no such results file: {', '.join(missing)}")
    unknown = [p.name for p in paths if _kind(p.stem) not in CHECKS]
    if unknown:
        parser.error(f"no check for {', '.join(unknown)} (known: {', '.join(CHECKS)})")
    moved_any = False
    with tempfile.TemporaryDirectory(prefix="dccl-results-check-") as tmp:
        for path in paths:
            outcome = check(path, args.tolerance, Path(tmp) / path.stem)
            cell = f"{outcome.file}: {outcome.cell} ({outcome.seconds:.0f} s)"
            if outcome.moved:
                moved_any = True
                changes = ", ".join(f"{k} {old:.4f} → {new:.4f}" for k, (old, new) in outcome.moved.items())
                print(f"MOVED  {cell}: {changes}", flush=True)
            elif not outcome.compared:
                moved_any = True
                print(f"EMPTY  {cell}: no figure in common with the file", flush=True)
            else:
                print(f"same   {cell}: {len(outcome.compared)} figures within {args.tolerance:g}", flush=True)
    return 1 if moved_any else 0


if __name__ == "__main__":
    sys.exit(main())
