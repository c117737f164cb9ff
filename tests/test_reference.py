"""A refactor changes no number: every built-in strategy, run with the recorded settings and seed, reproduces the
round metrics and per-device values recorded in `tests/reference/strategies.json` (1e-5)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_aucs_within_one_pair

sys.path.insert(0, str(Path(__file__).parent / "reference"))
from record import REFERENCE, STRATEGIES, reference_run

RECORDED = json.loads(REFERENCE.read_text())
# a deliberate change of the plug-in redesign: CoDA's per-round columns (0 for every other strategy before) are now
# recorded by CoDA alone, as columns a strategy owns
CODA_ONLY = {"candidates_per_device", "kept_per_device", "candidate_bytes_per_device"}


def _array(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_reproduces_its_reference_run(strategy: str, tmp_path: Path) -> None:
    expected = RECORDED["runs"][strategy]
    actual = reference_run(strategy, tmp_path)
    dropped = set() if strategy == "coda" else CODA_ONLY
    assert set(actual["rounds"]) >= set(expected["rounds"]) - dropped, "round columns went missing"
    assert not set(actual["rounds"]) & dropped
    negatives = int(next(s for s in RECORDED["settings"] if s.startswith("data.eval_negatives=")).split("=")[1])
    for name in ("start_auc", "device_auc", "cloud_auc"):
        got, want = _array(actual["devices"][name]), _array(expected["devices"][name])
        n_test = expected["devices"]["n_test"]
        assert_aucs_within_one_pair(got, want, n_test, negatives, f"{strategy} {name}", slack=1e-6)
    for kind in ("rounds", "devices"):
        for name, values in expected[kind].items():
            if name in dropped or name in ("start_auc", "device_auc", "cloud_auc"):
                continue
            np.testing.assert_allclose(
                _array(actual[kind][name]), _array(values), atol=1e-5, rtol=0, err_msg=f"{strategy} {kind}.{name}"
            )


def test_reference_runs_differ_between_strategies() -> None:
    """The reference would catch a strategy silently running another's steps: their device results differ."""
    device_auc = {s: _array(RECORDED["runs"][s]["devices"]["device_auc"]) for s in STRATEGIES}
    for a in STRATEGIES:
        for b in STRATEGIES:
            if a < b:
                assert not np.allclose(device_auc[a], device_auc[b], equal_nan=True), (a, b)
