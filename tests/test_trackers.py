"""Experiment trackers (`output.tracker`): real runs mirrored into a real MLflow store (sqlite, MLflow's own default
kind) and real TensorBoard event files, read back with MLflow's client and TensorBoard's own event reader and compared
with the run directory; a missing package, an unusable store and a bad value fail in one line before any work."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY_RUN

from dccl_sim.cli import main
from dccl_sim.config import ConfigError, SimConfig, load_config
from dccl_sim.runtime import session
from dccl_sim.runtime.session import resume_state, run
from dccl_sim.runtime.trackers import mlflow_name

SMALL = [*TINY_RUN, "runtime.backend=local"]


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh sqlite tracking store named by MLFLOW_TRACKING_URI (as a user would), the working directory in
    tmp_path (where MLflow puts artifacts by default); the client that reads it."""
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return MlflowClient()


def _run(out: Path, *overrides: str) -> None:
    run(load_config(None, [*SMALL, f"output.out_dir={out}", *overrides]))


def _expected_params(run_dir: Path) -> dict[str, str]:
    """config.json's settings under dotted keys, each as text: numbers, flags and strings as Python writes them,
    anything else (lists, null) as JSON."""

    def leaves(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            out |= leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {prefix + key: value}
        return out

    settings = leaves(json.loads((run_dir / "config.json").read_text()))
    return {k: str(v) if isinstance(v, bool | int | float | str) else json.dumps(v) for k, v in settings.items()}


def _round_columns(run_dir: Path) -> dict[str, list[float]]:
    """rounds.parquet's numeric columns but `round`, as floats."""
    table = pq.read_table(run_dir / "rounds.parquet").to_pydict()
    return {
        name: [float(v) for v in values]
        for name, values in table.items()
        if name != "round" and all(isinstance(v, int | float) for v in values)
    }


def _same(got: list[float], expected: list[float]) -> bool:
    return len(got) == len(expected) and all(
        (math.isnan(a) and math.isnan(b)) or a == b for a, b in zip(got, expected, strict=True)
    )


def test_mlflow_names_have_no_characters_mlflow_refuses() -> None:
    assert mlflow_name("device_hr@10") == "device_hr_at_10"
    assert mlflow_name("cloud_gauc") == "cloud_gauc"
    assert mlflow_name("a:b(c)") == "a_b_c_"


def test_mlflow_holds_the_config_every_rounds_record_and_the_run_directory(tmp_path: Path, mlflow_store) -> None:
    out = tmp_path / "run"
    _run(out, "rounds=2", "output.tracker=mlflow", "output.tracker_experiment=trackers-test")

    client = mlflow_store
    experiment = client.get_experiment_by_name("trackers-test")
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_name == "run" and tracked.info.status == "FINISHED"
    assert json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"] == tracked.info.run_id

    expected = _expected_params(out)
    assert tracked.data.params == expected
    assert expected["rounds"] == "2" and expected["model.mlp_hidden"] == "[200, 80]"

    columns = _round_columns(out)
    assert {"cloud_gauc", "device_hr@10", "t_round_s", "t_checkpoint_s", "no_device_results"} <= set(columns)
    assert set(tracked.data.metrics) == {mlflow_name(name) for name in columns}
    for name, values in columns.items():
        history = sorted(client.get_metric_history(tracked.info.run_id, mlflow_name(name)), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1], name
        assert _same([m.value for m in history], values), name

    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert artifacts == {"config.json", "rounds.parquet", "devices.parquet"}  # no checkpoints, no tracking.json
    copy = client.download_artifacts(tracked.info.run_id, "rounds.parquet", str(tmp_path))
    assert Path(copy).read_bytes() == (out / "rounds.parquet").read_bytes()


def test_a_resumed_run_continues_its_mlflow_run_and_a_branch_gets_its_own(tmp_path: Path, mlflow_store) -> None:
    client = mlflow_store
    out = tmp_path / "run"
    _run(out, "rounds=1", "output.tracker=mlflow")
    first = json.loads((out / "tracking.json").read_text())["mlflow"]["run_id"]
    assert client.get_run(first).info.status == "FINISHED"

    run(*resume_state(out, ["rounds=2"]))
    branched = tmp_path / "branch"
    run(*resume_state(out, ["rounds=3", "cloud.lr=0.01"], branch_to=branched))

    experiment = client.get_experiment_by_name("dccl-sim")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"run", "branch"}
    assert runs["run"].info.run_id == first and runs["run"].info.status == "FINISHED"
    # the resumed run: one point per round, none twice; MLflow parameters cannot change, so `rounds` stays
    for name, tracked, rounds in (("run", runs["run"], 2), ("branch", runs["branch"], 3)):
        history = client.get_metric_history(tracked.info.run_id, "cloud_gauc")
        assert sorted(m.step for m in history) == list(range(rounds)), name
        values = [m.value for m in sorted(history, key=lambda m: m.step)]
        assert _same(values, _round_columns(tmp_path / name)["cloud_gauc"]), name
    assert runs["run"].data.params["rounds"] == "1"
    assert runs["branch"].data.params["cloud.lr"] == "0.01" and runs["branch"].data.params["rounds"] == "3"


def test_tensorboard_holds_every_rounds_record_once_across_a_resume(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    out = tmp_path / "run"
    _run(out, "rounds=1", "output.tracker=tensorboard")
    run(*resume_state(out, ["rounds=2"]))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2

    # the reader TensorBoard's own server uses: it drops the events a later session (the resume) restarts from
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    columns = _round_columns(out)
    assert set(events.PluginTagToContent("scalars")) == set(columns)
    for name, values in columns.items():
        points = events.Tensors(name)
        assert [p.step for p in points] == [0, 1], name
        assert _same([tensor_util.make_ndarray(p.tensor_proto).item() for p in points], values), name

    (content,) = events.PluginTagToContent("hparams").values()
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    logged = {key: hparams[key].WhichOneof("kind") for key in hparams}
    expected = _expected_params(out)
    assert set(logged) == set(expected)
    assert hparams["data.num_devices"].number_value == 8 and hparams["runtime.backend"].string_value == "local"
    assert hparams["model.mlp_hidden"].string_value == expected["model.mlp_hidden"] == "[200, 80]"
    assert hparams["output.progress"].bool_value is False


@pytest.mark.parametrize(
    ("tracker", "modules"), [("mlflow", ["mlflow"]), ("tensorboard", ["tensorboard", "torch.utils.tensorboard"])]
)
def test_a_missing_package_fails_in_one_line_before_any_work(
    tracker: str, modules: list[str], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in modules:  # as if not installed: `import` of a None entry fails
        monkeypatch.setitem(sys.modules, module, None)
    ray_was_up = "ray" in sys.modules and sys.modules["ray"].is_initialized()  # the suite's shared Ray, if any
    runtimes: list[SimConfig] = []
    monkeypatch.setattr(session, "make_runtime", runtimes.append)
    out, cache = tmp_path / "run", tmp_path / "cache"
    out.mkdir()
    (out / "rounds.parquet").write_bytes(b"an earlier run's rounds")
    settings = [*SMALL, f"data.cache_dir={cache}", "runtime.backend=ray", f"output.tracker={tracker}"]
    code = main(["run", "--out", str(out), "--overwrite", *(x for s in settings for x in ("--set", s))])
    printed = capsys.readouterr().out
    assert code == 2 and "Traceback" not in printed
    (error,) = [line for line in printed.splitlines() if line.startswith("error")]
    assert f"output.tracker = {tracker} needs" in error and f"pip install 'dccl-sim[{tracker}]'" in error
    # before any work: no data prepared, no Ray started, and the run to be overwritten is still there
    assert not cache.exists()
    assert not runtimes  # no runtime made: Ray neither started nor joined
    assert ray_was_up or "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert (out / "rounds.parquet").read_bytes() == b"an earlier run's rounds"


def test_an_unusable_mlflow_store_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuch://store")
    with pytest.raises(ConfigError, match=r"output.tracker = mlflow: MLflow cannot open the tracking store nosuch://"):
        _run(tmp_path / "run", "output.tracker=mlflow", f"data.cache_dir={tmp_path / 'cache'}")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("setting", "key"),
    [("output.tracker=wandb", "output.tracker"), ('output.tracker_experiment=""', "tracker_experiment")],
)
def test_a_bad_tracker_setting_names_its_key(setting: str, key: str, capsys) -> None:
    with pytest.raises(ConfigError, match=rf"output\.{key.removeprefix('output.')}: "):
        load_config(None, [setting])
    assert main(["run", "--set", setting]) == 2
    printed = capsys.readouterr().out
    assert f"{key}: " in printed and "Traceback" not in printed
    assert len([line for line in printed.splitlines() if line.startswith("error")]) == 1


def test_the_overhead_script_times_every_hook_of_a_real_tracked_run(tmp_path: Path, monkeypatch) -> None:
    import tracker_overhead

    monkeypatch.chdir(tmp_path)  # the script works in its work folder
    settings = [x for s in [*TINY_RUN, "rounds=2"] for x in ("--set", s)]
    out = tmp_path / "overhead.json"
    argv = ["--tracker", "tensorboard", "--work-dir", str(tmp_path / "work"), "--out", str(out), *settings]
    result = tracker_overhead.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert len(result["on_round_s"]) == len(result["t_round_s"]) == 2
    assert all(0 < s < 60 for s in [*result["on_round_s"], result["on_start_s"], result["make_tracker_s"]])
    assert min(result["on_round_s"]) <= result["on_round_median_s"] <= max(result["on_round_s"])
    assert len(list((tmp_path / "work" / "run-tensorboard" / "tensorboard").glob("events.out.tfevents.*"))) == 1
