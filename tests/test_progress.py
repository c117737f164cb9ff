"""The progress display: the time left computed from measured rounds (a fake clock), and what a real run on Ray shows
in a terminal: its phases, the devices done, "estimating" during the first round and a time after it, in sentences,
with no source-file columns and none of Ray's own lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN, PhaseRecorder
from ray.experimental import internal_kv

from dccl_sim.config import load_config
from dccl_sim.progress import RoundEta
from dccl_sim.runtime.session import run

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
CLOCK = re.compile(r"ETA \d+:\d\d:\d\d")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_eta_is_rounds_left_times_the_mean_round_less_the_current_rounds_time() -> None:
    clock = FakeClock()
    eta = RoundEta(clock)
    eta.start(rounds_left=4)
    clock.now += 7
    assert eta.seconds_left() is None  # no round measured yet: nothing to go on
    clock.now += 3
    eta.round_finished()  # round 1: 10 s
    assert eta.seconds_left() == pytest.approx(3 * 10)
    clock.now += 4
    assert eta.seconds_left() == pytest.approx(3 * 10 - 4)
    clock.now += 16  # round 2 runs past the mean: counted as nearly done, never as time given back
    assert eta.seconds_left() == pytest.approx(2 * 10)
    eta.round_finished()  # round 2: 20 s, mean 15 s
    assert eta.seconds_left() == pytest.approx(2 * 15)
    clock.now += 15
    eta.round_finished()  # round 3: 15 s, mean 15 s
    assert eta.seconds_left() == pytest.approx(15)
    clock.now += 9
    assert eta.seconds_left() == pytest.approx(6)
    eta.round_finished()
    assert eta.seconds_left() == 0.0


def test_a_resumed_run_counts_only_the_rounds_it_has_left() -> None:
    clock = FakeClock()
    eta = RoundEta(clock)
    eta.start(rounds_left=2)  # e.g. rounds 3 and 4 of 5
    clock.now += 8
    eta.round_finished()
    assert eta.seconds_left() == pytest.approx(8)


def _screens(output: str) -> list[str]:
    """Every line the terminal was shown, in order, each redraw of the progress line on its own, repeats dropped."""
    lines = [line.strip() for line in re.split(r"[\r\n]", ANSI.sub("", output)) if line.strip()]
    return [line for i, line in enumerate(lines) if i == 0 or line != lines[i - 1]]


def test_a_ray_run_shows_its_phases_devices_done_and_a_time_left_in_plain_sentences(tmp_path: Path) -> None:
    """The real command line on an embedded Ray, two device packs, shown as a terminal shows it (rich draws the live
    progress line when TTY_COMPATIBLE=1)."""
    command = [sys.executable, "-m", "dccl_sim.cli", "run", "--out", str(tmp_path / "run")]
    settings = [s for s in TINY_RUN if s != "output.progress=false"] + ["rounds=2", "runtime.num_actors=2"]
    for setting in settings:
        command += ["--set", setting]
    env = {**os.environ, "TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "200"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    screens = _screens(done.stdout + done.stderr)
    bars = [line for line in screens if line.startswith("dccl ") and " round " in line]
    first = [line for line in bars if "round 0/2" in line]
    later = [line for line in bars if "round 1/2" in line or "round 2/2" in line]
    assert first and all("ETA estimating" in line for line in first), first
    assert later and all(CLOCK.search(line) for line in later), later
    for round_bars in (first, [line for line in later if "round 1/2" in line]):
        phases = [line.split("ETA ", 1)[1] for line in round_bars]
        for phase in ("broadcast", "device step: 0 of 8 devices done"):
            assert any(phase in line for line in phases), (phase, phases)
        # one pack's devices done before the other's (packs balance work, so not necessarily half of the 8)
        assert any(re.search(r"device step: [1-7] of 8 devices done", line) for line in phases), phases
        assert any("device step: 8 of 8 devices done" in line for line in phases)
        assert any("cloud update" in line for line in phases) and any("evaluation" in line for line in phases)
    # sentences: no `observers.py:180`-style source column, and none of Ray's own lines (its log prefixes, its
    # start-up notice, its C++ warnings)
    shown = "\n".join(screens)
    assert not re.search(r"\b\w+\.py:\d+", shown), shown
    for ray_line in ("(pid=", "(raylet)", "Host pid=", "Started a local Ray instance", " W ", "WARNING", "INFO"):
        assert ray_line not in shown, (ray_line, shown)


def test_a_ray_cloud_reports_its_set_up_progress_while_it_pretrains(tmp_path: Path, ray_session) -> None:
    """The cloud actor runs one call at a time (one thread for torch's OpenMP), so the driver reads pretraining's
    progress from Ray's key-value store, where the actor writes it: both set-up steps are heard of, counting up to
    the whole step, and the key is gone afterwards."""

    phases = PhaseRecorder()
    overrides = ["rounds=1", "runtime.num_actors=1", "cloud.pretrain_epochs=40", "patch.bootstrap_epochs=40"]
    overrides.append(f"data.cache_dir={tmp_path / 'cache'}")  # pretrained here, not found in a cache
    config = load_config(None, [*TINY_RUN, f"output.out_dir={tmp_path / 'run'}", *overrides])
    run(config, extra_observers=[phases])
    pattern = re.compile(r"(pretraining|bootstrapping the patch generator): minibatch ([\d,]+) of ([\d,]+) .*")
    reports = [m.groups() for m in map(pattern.fullmatch, phases.seen) if m]
    for stage in ("pretraining", "bootstrapping the patch generator"):
        counts = [(int(done.replace(",", "")), int(total.replace(",", ""))) for s, done, total in reports if s == stage]
        assert counts and counts == sorted(counts), (stage, phases.seen)
    assert counts[-1][0] == counts[-1][1] > 0  # the last step's end
    assert not internal_kv._internal_kv_list("dccl-sim:progress:")
