"""examples/walkthrough.py end to end on a tiny synthetic setting, and the README quoting its code exactly."""

from __future__ import annotations

import importlib.util
import re
import struct
from pathlib import Path
from types import ModuleType

import pytest

from dccl_sim import SimConfig, load_run

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "examples" / "walkthrough.py"
TINY = {
    "data": {"source": "synthetic", "num_devices": 30, "eval_negatives": 9},
    "rounds": 2,
    "cloud": {"pretrain_epochs": 1},
    "patch": {"bootstrap_epochs": 1},
    "runtime": {"backend": "local"},
    "output": {"progress": False},
}


@pytest.fixture(scope="module")
def walkthrough() -> ModuleType:
    spec = importlib.util.spec_from_file_location("walkthrough", WALKTHROUGH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_walkthrough_table_has_one_row_per_strategy_from_its_last_round(
    walkthrough: ModuleType, tmp_path: Path
) -> None:
    # Execute: the example's own functions, on a tiny population
    rounds = walkthrough.run_strategies(TINY, walkthrough.STRATEGIES, str(tmp_path))
    table = walkthrough.compare(rounds)
    walkthrough.plot(rounds, str(tmp_path / "gauc.png"))

    # Assert
    assert sorted(table.index) == sorted(walkthrough.STRATEGIES)
    assert list(table.columns) == [*walkthrough.METRICS, "gain"]
    assert table.notna().all().all()
    for strategy in walkthrough.STRATEGIES:
        last = load_run(tmp_path / strategy).rounds.iloc[-1]
        assert last["round"] == 1
        for metric in walkthrough.METRICS:
            assert table.loc[strategy, metric] == last[metric], (strategy, metric)
    assert table.loc["cloud_only", "gain"] == 0  # cloud_only's devices keep the broadcast model
    png = (tmp_path / "gauc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (840, 480)  # a 7 × 4 in figure at 120 dpi


def test_the_walkthrough_settings_are_valid_for_each_strategy(walkthrough: ModuleType) -> None:
    for strategy in walkthrough.STRATEGIES:
        config = SimConfig.model_validate({**walkthrough.SETTINGS, "strategy": strategy})
        assert (config.strategy, config.data.source, config.runtime.backend) == (strategy, "ml100k", "local")


def test_the_readme_quotes_the_walkthrough_code_exactly() -> None:
    code = WALKTHROUGH.read_text().split('"""', 2)[2].lstrip("\n")  # what follows the module docstring
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.DOTALL)
    assert code in blocks
