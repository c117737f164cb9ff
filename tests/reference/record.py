"""Record the seeded reference runs that `tests/test_reference.py` holds every built-in strategy to.

Run only when a change of numbers is deliberate (and say so in the commit):
    .venv/bin/python tests/reference/record.py
It writes `tests/reference/strategies.json`: per strategy, the deterministic round metrics and per-device values of
a small seeded run on ML-100K (in-process runtime).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).parent
REFERENCE = HERE / "strategies.json"
STRATEGIES = ("cloud_only", "metapatch", "dccl", "fedavg", "local_finetune", "coda")
SETTINGS = [
    "data.num_devices=40",
    "data.eval_negatives=9",
    "rounds=2",
    "cloud.pretrain_epochs=2",
    "cloud.finetune_epochs=1",
    "patch.bootstrap_epochs=1",
    "device.local_epochs=1",
    "runtime.backend=local",
    "runtime.participation=0.75",
    "coda.neighbours=4",
    "coda.candidates=16",
    "output.progress=false",
]
# wall-clock columns differ from run to run; everything else is a function of the config and the seed
_TIMED = ("t_", "device_compute_", "peak_memory", "compute_s", "classifier_s")
DEVICE_COLUMNS = ("round", "device_id", "n_train", "n_test", "start_auc", "device_auc", "cloud_auc", "gate_passed")
DEVICE_COLUMNS += ("straggler", "flops", "sim_time_s")


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def reference_run(strategy: str, out_dir: Path) -> dict:
    """The deterministic outputs of one strategy's reference run."""
    from dccl_sim.config import load_config
    from dccl_sim.runtime.session import run

    config = load_config(None, [*SETTINGS, f"strategy={strategy}", f"output.out_dir={out_dir}"])
    run(config)
    rounds = pq.read_table(out_dir / "rounds.parquet").to_pydict()
    devices = pq.read_table(out_dir / "devices.parquet").to_pydict()
    round_metrics = {
        name: [_clean(v) for v in values]
        for name, values in rounds.items()
        if not name.startswith(_TIMED) and name != "strategy"
    }
    device_values = {name: [_clean(v) for v in devices[name]] for name in DEVICE_COLUMNS}
    return {"rounds": round_metrics, "devices": device_values}


def main() -> int:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in STRATEGIES:
            results[strategy] = reference_run(strategy, Path(tmp) / strategy)
            print(f"{strategy}: {results[strategy]['rounds']['device_gauc']}", file=sys.stderr)
    REFERENCE.write_text(json.dumps({"settings": SETTINGS, "runs": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
