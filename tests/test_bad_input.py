"""Zero tracebacks for bad input, property-based (hypothesis): arbitrary settings and command lines, and damaged run
directories, give a one-line message naming the thing and exit code 2 (or succeed), never a traceback.

The command-line properties replace the simulation itself (`session.run`) with a fake that only records that a run
would have started: what is under test is everything before it (parsing, validation, directories, resume checks).
Generated cases per property: EXAMPLES below."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import TINY_RUN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dccl_sim.cli import main
from dccl_sim.config import ConfigError, Section, SimConfig, load_config

SMALL = [*TINY_RUN, "runtime.backend=local", "rounds=2"]
# generated cases per property: settings (fast), command lines, damaged run directories (each writes a report)
EXAMPLES = {"settings": 300, "command lines": 150, "damaged runs": 50}


def _keys(model: type, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            keys += _keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


KEYS = _keys(SimConfig)
values = st.one_of(
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=12),
    st.sampled_from(["", "[1,2]", "{a: 1}", "null", "true", "-1", "0", "1e309", "[", "'x", "auto", "din", "dccl"]),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=20), st.sampled_from(["", ".", "data.", "a.b.c", "seed.x"]))
overrides = st.lists(st.tuples(keys, values).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=4)


def _one_line_error(printed: str) -> None:
    assert "Traceback" not in printed, printed
    errors = [line for line in printed.splitlines() if line.startswith("error")]
    assert len(errors) == 1, printed


def _succeeds_or_fails_in_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`dccl-sim ARGV` exits 0, or 2 with one error line (argparse: its usage and exit 2), never a traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        assert exit_.code == 2
        assert "Traceback" not in capsys.readouterr().err
        return
    printed = capsys.readouterr().out
    assert code in (0, 2), printed
    if code == 2:
        _one_line_error(printed)


@settings(max_examples=EXAMPLES["settings"], deadline=None)
@given(given_overrides=overrides)
def test_any_settings_validate_or_fail_with_a_config_error(given_overrides: list[str]) -> None:
    try:
        load_config(None, given_overrides)
    except ConfigError as error:
        message = str(error)
        assert "Traceback" not in message and message.strip()


@pytest.fixture
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replace the simulation by a fake that records the runs that would have started."""
    from dccl_sim.runtime import session

    started = []

    def fake_run(config, state=None, runtime=None, extra_observers=None):
        started.append(config)
        return state or session.RunState(out_dir=config.output.out_dir)

    monkeypatch.setattr(session, "run", fake_run)
    return started


tokens = st.one_of(
    st.sampled_from(["--set", "--out", "--resume", "--branch", "--overwrite", "--config", "--address", "-x", "--"]),
    st.text(max_size=15),
    overrides.map(lambda o: o[0] if o else "rounds=1"),
)


@settings(
    max_examples=EXAMPLES["command lines"], deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(argv=st.lists(tokens, max_size=6))
def test_any_run_command_line_starts_a_run_or_fails_in_one_line(
    argv: list[str], no_simulation: list, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _succeeds_or_fails_in_one_line(["run", *argv], capsys)


sweep_tokens = st.one_of(
    st.sampled_from(
        ["--devices", "--set", "--out", "--overwrite", "--isolate", "--config", "10,100", "0", "x,1", ",", "1e3"]
    ),
    st.text(max_size=12),
    overrides.map(lambda o: o[0] if o else "device.local_epochs=1,2"),
)


@settings(
    max_examples=EXAMPLES["command lines"], deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(argv=st.lists(sweep_tokens, max_size=6))
def test_any_sweep_command_line_starts_a_sweep_or_fails_in_one_line(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every grid point is validated before a sweep runs; the sweep itself is replaced by a fake returning rows."""
    from dccl_sim import sweep

    def fake_sweep(points, out_dir, isolate=False, on_row=None):
        return [{"strategy": p.config.strategy, "run_dir": str(p.config.output.out_dir)} for p in points]

    monkeypatch.setattr(sweep, "run_sweep", fake_sweep)
    monkeypatch.setattr(sweep, "table_columns", lambda swept: [])
    monkeypatch.setattr(sweep, "summary_line", lambda rows: "")
    monkeypatch.chdir(tmp_path)
    _succeeds_or_fails_in_one_line(["sweep", *argv], capsys)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "--out", str(out), *(x for s in SMALL for x in ("--set", s))]) == 0
    return out


DAMAGE = ("truncate", "delete", "garbage", "foreign file", "empty")
TARGETS = ("config.json", "rounds.parquet", "devices.parquet", "checkpoints/round-0001.pt", "checkpoints/round-0000.pt")


def _damage(run_dir: Path, target: str, how: str, cut: float) -> None:
    path = run_dir / target
    if how == "truncate" and path.exists():
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * cut)])
    elif how == "delete":
        path.unlink(missing_ok=True)
    elif how == "garbage":
        path.write_bytes(b"\x00garbage" * int(1 + 50 * cut))
    elif how == "foreign file":
        (run_dir / "checkpoints" / "round-x.pt").write_text("not a checkpoint")
    elif how == "empty":
        path.write_bytes(b"")


@settings(
    max_examples=EXAMPLES["damaged runs"], deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    damage=st.lists(
        st.tuples(st.sampled_from(TARGETS), st.sampled_from(DAMAGE), st.floats(0, 1)), min_size=1, max_size=3
    ),
    command=st.sampled_from(["report", "resume", "resume and extend"]),
)
def test_damaged_run_directories_give_one_line(
    damage, command: str, finished_run: Path, no_simulation: list, tmp_path: Path, capsys
) -> None:
    run_dir = tmp_path / f"damaged-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(finished_run, run_dir)
    for target, how, cut in damage:
        _damage(run_dir, target, how, cut)
    argv = {
        "report": ["report", str(run_dir)],
        "resume": ["run", "--resume", str(run_dir)],
        "resume and extend": ["run", "--resume", str(run_dir), "--set", "rounds=3"],
    }[command]
    code = main(argv)
    printed = capsys.readouterr().out
    assert code in (0, 2), printed
    if code == 2:
        _one_line_error(printed)


def test_the_fake_simulation_is_reached_by_a_good_command_line(no_simulation: list, tmp_path: Path) -> None:
    """The command-line property means something only if valid command lines do reach the (fake) simulation."""
    assert main(["run", "--out", str(tmp_path / "r"), "--set", "rounds=3"]) == 0
    assert len(no_simulation) == 1 and no_simulation[0].rounds == 3
    config_file = tmp_path / "c.yaml"
    config_file.write_text(json.dumps({"rounds": 2}))  # JSON is YAML
    assert main(["run", "--config", str(config_file), "--out", str(tmp_path / "s")]) == 0
    assert no_simulation[-1].rounds == 2
