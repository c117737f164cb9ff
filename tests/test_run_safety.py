"""A run is never lost or silently changed: no run writes over another's rounds unless asked, a resume keeps what the
finished rounds mean (or branches into a new directory), and a process killed at any point resumes."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TINY_RUN, PhaseRecorder

from dccl_sim.cli import main
from dccl_sim.config import ConfigError, load_config
from dccl_sim.runtime.session import resume_state, run

SMALL = [*TINY_RUN, "runtime.backend=local"]


def _config(out: Path | None, *overrides: str):
    where = [f"output.out_dir={out}"] if out is not None else []
    return load_config(None, [*SMALL, *where, *overrides])


def _rounds(out: Path) -> dict[str, list]:
    """rounds.parquet with NaN as None, so that two reads of one file compare equal (NaN != NaN)."""
    table = pq.read_table(out / "rounds.parquet").to_pydict()
    return {k: [None if isinstance(v, float) and math.isnan(v) else v for v in values] for k, values in table.items()}


def test_a_run_directory_holding_a_run_is_refused_and_overwrite_clears_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(_config(out, "rounds=2"))
    (out / "report.md").write_text("a report of the old run")
    with pytest.raises(ConfigError, match="already holds a run"):
        run(_config(out, "rounds=1"))
    assert len(_rounds(out)["round"]) == 2  # untouched
    run(_config(out, "rounds=1", "output.overwrite=true"))
    assert _rounds(out)["round"] == [0]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0000.pt"]
    assert not (out / "report.md").exists()  # nothing stale beside the new data


def test_folders_that_are_not_a_runs_are_refused_with_one_line(tmp_path: Path, capsys) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("")
    (tmp_path / "file").write_text("")
    for out, message in ((tmp_path / "notes", "not a run's (thesis.tex)"), (tmp_path / "file" / "run", "is a file")):
        for flags in ([], ["--overwrite"]):
            assert main(["run", "--out", str(out), *flags, *(x for s in SMALL for x in ("--set", s))]) == 2
            printed = capsys.readouterr().out
            assert message in printed and "Traceback" not in printed
    assert (tmp_path / "notes" / "thesis.tex").exists()


def test_without_an_output_directory_each_run_gets_its_own_and_latest_points_at_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    first = run(_config(None, "rounds=1"))
    second = run(_config(None, "rounds=1", "strategy=cloud_only"))
    assert first.out_dir != second.out_dir
    assert first.out_dir.parent == second.out_dir.parent == Path("runs")
    assert second.out_dir.name.endswith("-cloud_only") and (first.out_dir / "rounds.parquet").is_file()
    assert (Path("runs") / "latest").resolve() == second.out_dir.resolve()


def test_resume_refuses_changes_of_meaning_and_allows_extending(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    run(_config(out, "rounds=2", "strategy=dccl"))
    with pytest.raises(ConfigError) as refused:
        resume_state(out, ["rounds=3", "strategy=cloud_only", "seed=5"])
    assert "strategy: 'dccl' → 'cloud_only'" in str(refused.value) and "seed: 0 → 5" in str(refused.value)
    assert "--branch" in str(refused.value)
    with pytest.raises(ConfigError, match="finished 2 rounds; rounds=1 would drop"):
        resume_state(out, ["rounds=1"])
    # a finished run says so at once (no Ray, no data), and leaves its files as they were
    before = (out / "config.json").read_text()
    tic = time.perf_counter()
    assert main(["run", "--resume", str(out)]) == 0
    assert "has finished all 2 rounds" in capsys.readouterr().out
    assert time.perf_counter() - tic < 5 and (out / "config.json").read_text() == before
    config, state = resume_state(out, ["rounds=3", "output.progress=false", "runtime.num_actors=2"])
    run(config, state)
    assert _rounds(out)["round"] == [0, 1, 2]


def test_branch_continues_under_new_settings_in_a_new_directory(tmp_path: Path) -> None:
    out, branch = tmp_path / "run", tmp_path / "branch"
    run(_config(out, "rounds=2"))
    original = _rounds(out)
    config, state = resume_state(out, ["rounds=3", "cloud.lr=0.01"], branch_to=branch)
    run(config, state)
    assert _rounds(out) == original  # the original run is untouched
    branched = _rounds(branch)
    assert branched["round"] == [0, 1, 2]
    assert branched["cloud_gauc"][:2] == original["cloud_gauc"]
    assert load_config(branch / "config.json").cloud.lr == 0.01
    assert "after_round" in (branch / "branch.json").read_text()


def _kill_when(out: Path, ready, sig: int = signal.SIGKILL) -> subprocess.Popen:
    """Start `dccl-sim run` into `out` (3 rounds) and kill it once `ready(out)` holds."""
    command = [sys.executable, "-m", "dccl_sim.cli", "run", "--out", str(out), "--set", "rounds=3"]
    for setting in SMALL:
        command += ["--set", setting]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 300
    while process.poll() is None and not ready(out) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(sig)
    process.wait(timeout=60)
    return process


@pytest.mark.parametrize(
    "point",
    ["before any round", "after the first checkpoint", "inside round 1"],
)
def test_a_run_killed_at_any_point_resumes_to_the_uninterrupted_result(tmp_path: Path, point: str) -> None:
    """SIGKILL (no clean-up) at several points: whatever was written is whole (atomic writes), and resuming gives
    the rounds an uninterrupted run gives."""
    straight = tmp_path / "straight"
    run(_config(straight, "rounds=3"))
    out = tmp_path / "killed"
    ready = {
        "before any round": lambda d: (d / "config.json").exists(),
        "after the first checkpoint": lambda d: (d / "checkpoints" / "round-0000.pt").exists(),
        "inside round 1": lambda d: (d / "rounds.parquet").exists(),
    }[point]
    process = _kill_when(out, ready)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    if (out / "rounds.parquet").exists():
        pq.read_table(out / "rounds.parquet")  # whole, never half-written
    assert main(["run", "--resume", str(out), "--set", "output.progress=false"]) == 0
    got, want = _rounds(out), _rounds(straight)
    assert got["round"] == [0, 1, 2]
    for name in ("cloud_gauc", "device_gauc", "start_gauc", "cloud_hr@10"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, err_msg=name)


def test_the_final_message_counts_rounds_without_device_results(tmp_path: Path, capsys) -> None:
    settings = [x for s in [*SMALL, "rounds=2", "runtime.deadline_s=0.000001"] for x in ("--set", s)]
    assert main(["run", "--out", str(tmp_path / "late"), *settings]) == 0
    assert "2 of them had no device results" in capsys.readouterr().out


def test_the_pretraining_cache_is_keyed_by_what_pretraining_uses(tmp_path: Path) -> None:
    """Evaluation settings (metrics.*, the evaluation negatives) reuse the pretrained cloud; a change of what
    pretraining learns from or how (its learning rate, the data) pretrains again."""
    from dccl_sim.data.prepare import prepare_run_dataset
    from dccl_sim.hosts.cloud import CloudHost

    cache = str(tmp_path / "cache")

    def cached(*overrides: str) -> float:
        config = _config(tmp_path / "unused", *overrides)
        return CloudHost(config, prepare_run_dataset(config)).pretrain(cache)["pretrain_cached"]

    assert cached() == 0.0
    assert cached("metrics.eval_devices=4", "metrics.split=valid", "metrics.ranking=both") == 1.0
    assert cached("cloud.lr=0.002") == 0.0
    assert cached("data.history_len=10") == 0.0
    # another thread count sums floats in another order: another pretrained model, so another entry
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert cached() == 0.0
    finally:
        torch.set_num_threads(threads)
    assert cached() == 1.0


def test_set_up_steps_show_their_progress_with_an_eta(tmp_path: Path) -> None:
    """Long set-up steps are not one static line: generating the data, drawing negatives, writing the shards,
    pretraining and bootstrapping each report counts that grow to their total, with elapsed time and an ETA."""
    phases = PhaseRecorder()
    run(
        _config(
            tmp_path / "run",
            "rounds=1",
            "data.source=synthetic",  # generated, so the data step reports too
            "cloud.pretrain_epochs=3",
            "data.cache_dir=" + str(tmp_path / "c"),
        ),
        extra_observers=[phases],
    )
    stages = (
        "generating data: user",
        "building samples: negative",
        "writing the dataset: shard",
        "pretraining: minibatch",
        "bootstrapping the patch generator: minibatch",
    )
    pattern = re.compile(r"(.+) ([\d,]+) of ([\d,]+) \(\d+ s, ETA (\d+ s|unknown)\)")
    reports = [m.groups() for m in map(pattern.fullmatch, phases.seen) if m]
    assert [stage for stage, *_ in reports if stage in stages] == [stage for stage, *_ in reports]  # no others
    for stage in stages:
        counts = [
            (int(done.replace(",", "")), int(total.replace(",", ""))) for s, done, total, _ in reports if s == stage
        ]
        assert counts, f"no progress from {stage!r} in {phases.seen}"
        assert counts == sorted(counts) and counts[-1][0] == counts[-1][1] > 0  # grows to the whole step
    order = [phases.seen.index(next(p for p in phases.seen if p.startswith(stage))) for stage in stages]
    assert order == sorted(order)


def test_a_changed_plugin_source_refuses_the_resume(tmp_path: Path, monkeypatch) -> None:
    """A run made with a user's plug-in records a digest of its source; editing the plug-in afterwards makes a
    resume refuse (the finished rounds came from the old code) and --branch continue under the new one."""
    plugin = tmp_path / "safety_fedprox.py"
    plugin.write_text((Path(__file__).parents[1] / "examples" / "fedprox.py").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    run(_config(out, "rounds=1", "strategy=safety_fedprox:FedProx"))
    assert "safety_fedprox:FedProx" in (out / "plugins.json").read_text()
    resume_state(out, ["rounds=2"])  # unchanged plug-in: fine
    plugin.write_text(plugin.read_text() + "\n# an edit\n")
    with pytest.raises(ConfigError, match="plug-in source of strategy changed"):
        resume_state(out, ["rounds=2"])
    config, state = resume_state(out, ["rounds=2"], branch_to=tmp_path / "branch")
    assert state.next_round == 1 and config.output.out_dir == tmp_path / "branch"
