"""Data sources by name: the table and RecBole sources on real ML-100K, a user's plug-in source (with and without its
own settings), the config's errors, and the cache keys that must not move."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from dccl_sim import plugins
from dccl_sim.cli import main
from dccl_sim.config import ConfigError, DataConfig, SyntheticConfig, load_config
from dccl_sim.data.prepare import cache_key, load_raw, prepare_dataset, prepare_run_dataset
from dccl_sim.data.raw import DataError, RawDataset
from dccl_sim.data.store import read_meta
from dccl_sim.runtime.session import run

RAW_FIELDS = ("user_id", "item_id", "timestamp", "item_ids", "item_category", "user_ids")


def interactions_table(raw: RawDataset) -> pa.Table:
    """ML-100K's interactions as a plain table, each row carrying its item's genre name as `category`."""
    genre_of_item = np.array([f"genre-{code:02d}" for code in raw.item_category])
    category = genre_of_item[np.searchsorted(raw.item_ids, raw.item_id)]
    return pa.table({"user_id": raw.user_id, "item_id": raw.item_id, "timestamp": raw.timestamp, "category": category})


def assert_same_raw(actual: RawDataset, expected: RawDataset, *, profiles: bool = True) -> None:
    for name in RAW_FIELDS:
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name), err_msg=name)
    assert actual.num_categories == expected.num_categories
    if profiles:
        assert actual.profile_cardinalities == expected.profile_cardinalities
        for name, codes in expected.profiles.items():
            np.testing.assert_array_equal(actual.profiles[name], codes, err_msg=name)


def write_module(folder: Path, name: str, text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(folder))


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(None, list(overrides))
    return str(caught.value)


# ------------------------------------------------------------------------------------------------------ built-ins


def test_the_builtins_are_found_by_name() -> None:
    assert set(plugins.builtins(plugins.SOURCE)) == {"ml100k", "movielens", "recbole", "synthetic", "table"}
    assert plugins.SOURCE in plugins.KINDS


@pytest.mark.parametrize("first", ["dccl_sim.data.sources.synthetic", "dccl_sim.data.synthetic", "dccl_sim.plugins"])
def test_every_builtin_is_found_whichever_module_is_imported_first(first: str) -> None:
    """The config validates sources through the registry and some sources import the config: no import order may
    leave the registry half-filled or fail."""
    code = (
        f"import {first}\n"
        "from dccl_sim import plugins\n"
        "from dccl_sim.config import DataConfig\n"
        "DataConfig(source='synthetic')\n"
        "print(' '.join(sorted(plugins.builtins(plugins.SOURCE))))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ml100k", "movielens", "recbole", "synthetic", "table"]


def test_table_from_csv_and_parquet_gives_the_ml100k_interactions(ml100k_raw: RawDataset, tmp_path: Path) -> None:
    table = interactions_table(ml100k_raw)
    pacsv.write_csv(table, tmp_path / "ratings.csv")
    # Parquet with real date-times: read back as the same whole seconds
    as_times = table.set_column(2, "timestamp", table.column("timestamp").cast(pa.timestamp("s")))
    pq.write_table(as_times, tmp_path / "ratings.parquet")
    (tmp_path / "parts").mkdir()
    pq.write_table(table.slice(0, 40_000), tmp_path / "parts" / "a.parquet")
    pq.write_table(table.slice(40_000), tmp_path / "parts" / "b.parquet")
    for name in ("ratings.csv", "ratings.parquet", "parts"):
        raw = load_raw(DataConfig(source="table", path=tmp_path / name), seed=0)
        # genre names sort as their codes do, so the category codes are ML-100K's own
        assert_same_raw(raw, ml100k_raw, profiles=False)
        assert raw.profiles == {} and raw.profile_cardinalities == {}


def test_table_without_profiles_builds_and_runs(ml100k_raw: RawDataset, tmp_path: Path) -> None:
    """No profile fields: the dataset, the DIN model and the patch encoder (the dccl strategy) work with none."""
    table = interactions_table(ml100k_raw).drop_columns(["category"])
    pq.write_table(table, tmp_path / "log.parquet")
    overrides = ["data.source=table", f"data.path={tmp_path / 'log.parquet'}", f"data.cache_dir={tmp_path / 'cache'}"]
    config = load_config(
        None,
        [
            *overrides,
            "data.num_devices=8",
            "data.eval_negatives=9",
            "strategy=dccl",
            "rounds=1",
            "cloud.pretrain_epochs=1",
            "patch.bootstrap_epochs=1",
            "runtime.backend=local",
            "output.progress=false",
            f"output.out_dir={tmp_path / 'run'}",
        ],
    )
    root = prepare_dataset(config.data, config.seed)
    assert Path(root).name.startswith("table-log.parquet-")
    meta = read_meta(root)
    assert (meta.num_devices, meta.num_categories, meta.profile_fields) == (8, 1, [])
    state = run(config)
    assert state is not None
    rounds = pq.read_table(tmp_path / "run" / "rounds.parquet").to_pylist()
    assert len(rounds) == 1 and 0.0 < rounds[0]["cloud_auc"] < 1.0 and math.isfinite(rounds[0]["device_gauc"])


def test_table_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("user,item_id,timestamp\n1,2,3\n")
    with pytest.raises(DataError, match=r"a.csv: no column user_id; .*\(it has user, item_id, timestamp\)"):
        load_raw(DataConfig(source="table", path=tmp_path / "a.csv"), seed=0)
    (tmp_path / "b.csv").write_text("user_id,item_id,timestamp,category\n1,2,3,x\n1,4,5,y\n2,2,6,z\n")
    with pytest.raises(DataError, match=r"b.csv: item 2 has two categories \('x' and 'z'\)"):
        load_raw(DataConfig(source="table", path=tmp_path / "b.csv"), seed=0)
    (tmp_path / "c.csv").write_text("user_id,item_id,timestamp\nu1,2,3\n")
    with pytest.raises(DataError, match="column 'user_id' must hold integers"):
        load_raw(DataConfig(source="table", path=tmp_path / "c.csv"), seed=0)
    (tmp_path / "d.txt").write_text("user_id,item_id,timestamp\n1,2,3\n")
    with pytest.raises(DataError, match=r"expected a \.csv or \.parquet file"):
        load_raw(DataConfig(source="table", path=tmp_path / "d.txt"), seed=0)


def test_recbole_atomic_files_give_the_ml100k_dataset(ml100k_raw: RawDataset) -> None:
    folder = Path(DataConfig().cache_dir).expanduser() / "ml-100k"  # where load_ml100k keeps the wheel's files
    for path in (folder, folder / "ml-100k.inter"):
        raw = load_raw(DataConfig(source="recbole", path=path), seed=0)
        assert raw.name == ml100k_raw.name == "ml-100k"
        assert_same_raw(raw, ml100k_raw)


def test_a_bare_path_in_data_source_still_reads_movielens_files(ml100k_raw: RawDataset) -> None:
    folder = Path(DataConfig().cache_dir).expanduser() / "ml-100k"
    assert_same_raw(load_raw(DataConfig(source=str(folder)), seed=0), ml100k_raw)
    assert_same_raw(load_raw(DataConfig(source="movielens", path=folder), seed=0), ml100k_raw)


def test_cache_keys_of_ml100k_and_synthetic_are_unchanged(tmp_path: Path) -> None:
    # recorded with the code before sources were plug-ins: existing caches and the reference runs depend on them
    assert cache_key(DataConfig(), 0) == "ml100k-ff5d35e81083"
    assert cache_key(DataConfig(num_devices=40, eval_negatives=19, history_len=10), 0) == "ml100k-73dc2b623bc8"
    assert cache_key(DataConfig(), 7) == "ml100k-05a7cc5f5e60"
    assert cache_key(DataConfig(source="synthetic"), 0) == "synthetic-286f65c3aa7d"
    synthetic = DataConfig(source="synthetic", num_devices=300, synthetic=SyntheticConfig(num_items=300))
    assert cache_key(synthetic, 0) == "synthetic-f12b68e71139"
    assert cache_key(DataConfig(source="synthetic", num_devices=100000, eval_negatives_on_load=True), 7) == (
        "synthetic-0de69e2dde55"
    )
    # a file source is keyed by its resolved path
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "u.data").write_text("1\t2\t3\t4\n")
    key_a = cache_key(DataConfig(source="movielens", path=tmp_path / "a"), 0)
    assert key_a.startswith("movielens-a-")
    assert key_a != cache_key(DataConfig(source="movielens", path=tmp_path / "b"), 0)
    assert key_a != cache_key(DataConfig(source=str(tmp_path / "a")), 0)


# ----------------------------------------------------------------------------------------------------- plug-ins

PLUGIN = """
    import numpy as np
    from dccl_sim.data.raw import RawDataset
    from dccl_sim.data.sources import data_source

    requests = []

    @data_source("ring")
    def ring(request):
        \"\"\"request.num_devices users, each rating 10 of 30 items around a ring, times drawn from the seed.\"\"\"
        requests.append(request)
        n = request.num_devices
        rng = np.random.default_rng(request.seed)
        user_id = np.repeat(np.arange(n), 10)
        item_id = (user_id * 3 + np.tile(np.arange(10), n)) % 30
        return RawDataset(
            name="ring",
            user_id=user_id,
            item_id=item_id,
            timestamp=rng.integers(0, 10**6, size=len(user_id)),
            item_ids=np.arange(30),
            item_category=np.arange(30) % 3,
            num_categories=3,
            user_ids=np.arange(n),
            profiles={"parity": np.arange(n) % 2},
            profile_cardinalities={"parity": 2},
        )
"""


def test_a_plugin_source_builds_through_prepare_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "ring_source", PLUGIN, monkeypatch)
    config = load_config(
        None,
        ["data.source=ring_source:ring", "data.num_devices=6", "data.eval_negatives=4", f"data.cache_dir={tmp_path}"],
    ).data
    root = prepare_dataset(config, seed=3)
    assert Path(root).name.startswith("ring_source.ring-")
    meta = read_meta(root)
    assert (meta.source, meta.num_devices, meta.num_items, meta.profile_fields) == ("ring", 6, 30, ["parity"])
    import ring_source  # the module the config imported

    (request,) = ring_source.requests
    assert (request.seed, request.num_devices, request.path, request.settings) == (3, 6, None, None)
    assert request.config is config and request.cache_dir == tmp_path
    assert prepare_dataset(config, seed=3) == root and len(ring_source.requests) == 1  # cached
    assert len(load_raw(config, seed=3, num_devices=2).user_ids) == 2  # the caller's count wins


SETTINGS_PLUGIN = """
    import numpy as np
    from pydantic import PositiveInt
    from dccl_sim.config import Section
    from dccl_sim.data.raw import RawDataset
    from dccl_sim.data.sources import data_source

    class Settings(Section):
        users: PositiveInt = 5
        items: PositiveInt = 20

    seen = []

    @data_source("sized", settings=Settings, settings_key="sized_source")
    def sized(request):
        seen.append(request.settings)
        n, m = request.settings.users, request.settings.items
        user_id = np.repeat(np.arange(n), 4)
        return RawDataset(
            name="sized",
            user_id=user_id,
            item_id=(user_id + np.tile(np.arange(4), n)) % m,
            timestamp=np.arange(len(user_id)),
            item_ids=np.arange(m),
            item_category=np.zeros(m, dtype=np.int64),
            num_categories=1,
            user_ids=np.arange(n),
        )
"""


def test_a_plugin_source_gets_its_validated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "sized_source", SETTINGS_PLUGIN, monkeypatch)
    import sized_source

    assert plugins.settings_key(sized_source.sized) == "sized_source"
    assert plugins.settings_model(sized_source.sized) is sized_source.Settings
    config = DataConfig(source="sized_source:sized")
    given = sized_source.Settings(users=7)
    assert len(load_raw(config, 0, settings=given).user_ids) == 7
    assert sized_source.seen[-1] is given
    assert len(load_raw(config, 0, settings={"users": 6, "items": 9}).item_ids) == 9
    assert sized_source.seen[-1] == sized_source.Settings(users=6, items=9)
    assert len(load_raw(config, 0).user_ids) == 5  # no settings given: the defaults
    with pytest.raises(
        ConfigError,
        match=r"\[sized_source\] settings of data source 'sized' are invalid: users: Input should be greater than 0",
    ):
        load_raw(config, 0, settings={"users": 0})
    with pytest.raises(ConfigError, match="expects Settings, got SyntheticConfig"):
        load_raw(config, 0, settings=SyntheticConfig())
    with pytest.raises(ConfigError, match="data source 'ml100k' has no settings"):
        load_raw(DataConfig(), 0, settings={"users": 3})
    # the settings are part of the dataset: other settings, another cache entry
    assert cache_key(config, 0, {"users": 6}) == cache_key(config, 0, sized_source.Settings(users=6))
    assert cache_key(config, 0, {"users": 6}) != cache_key(config, 0, {"users": 7})


def test_a_plugin_source_reads_its_section_of_the_run_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--set sized_source.users=6` is validated with the source's Settings, saved in the config, and reaches the
    source when the run prepares its dataset."""
    write_module(tmp_path, "sized_source", SETTINGS_PLUGIN, monkeypatch)
    import sized_source

    config = load_config(None, ["data.source=sized_source:sized", "sized_source.users=6", f"data.cache_dir={tmp_path}"])
    assert config.model_dump(mode="json")["sized_source"] == {"users": 6, "items": sized_source.Settings().items}
    root = prepare_run_dataset(config)
    assert read_meta(root).num_devices == 6 and sized_source.seen[-1] == sized_source.Settings(users=6)
    with pytest.raises(ConfigError, match=r"sized_source\.users: Input should be greater than 0"):
        load_config(None, ["data.source=sized_source:sized", "sized_source.users=0"])


# -------------------------------------------------------------------------------------------------------- errors


def test_unknown_source_lists_the_known_ones() -> None:
    message = config_error("data.source=movielenz")
    assert (
        "data.source: unknown data source 'movielenz'; choose one of ml100k, movielens, recbole, synthetic, table"
        in (message)
    )


@pytest.mark.parametrize("source", ["movielens", "recbole", "table"])
def test_a_file_source_needs_data_path(source: str, tmp_path: Path) -> None:
    assert f"data source {source!r} reads files: set data.path" in config_error(f"data.source={source}")
    missing = tmp_path / "nowhere.csv"
    assert f"data.path: no such file or folder (got '{missing}')" in config_error(
        f"data.source={source}", f"data.path={missing}"
    )


def test_data_path_is_refused_where_no_file_is_read(tmp_path: Path) -> None:
    assert "data source 'synthetic' reads no files; remove data.path" in config_error(
        "data.source=synthetic", f"data.path={tmp_path}"
    )
    (tmp_path / "u.data").write_text("")  # a MovieLens folder (an empty one is neither that nor a dataset)
    assert "names the data itself; remove data.path" in config_error(f"data.source={tmp_path}", f"data.path={tmp_path}")


def test_an_unimportable_plugin_names_the_module_and_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = config_error("data.source=no_such_source_module:load")
    assert "data source 'no_such_source_module:load': no module named 'no_such_source_module'" in message
    write_module(tmp_path, "broken_source", "import numpy\nraise RuntimeError('needs a GPU')\n", monkeypatch)
    message = config_error("data.source=broken_source:load")
    assert "importing 'broken_source' failed: RuntimeError: needs a GPU" in message
    write_module(tmp_path, "plain_source", "def load(request):\n    return None\n", monkeypatch)
    assert "'plain_source:load' is not a function decorated with @data_source" in config_error(
        "data.source=plain_source:load"
    )
    assert "module 'plain_source' has no attribute 'lod'" in config_error("data.source=plain_source:lod")


def test_data_command_takes_any_source(ml100k_raw: RawDataset, tmp_path: Path) -> None:
    pacsv.write_csv(interactions_table(ml100k_raw), tmp_path / "ratings.csv")
    out = tmp_path / "built"
    assert main(["data", "table", str(tmp_path / "ratings.csv"), "--out", str(out), "--devices", "12"]) == 0
    meta = read_meta(str(out))
    assert (meta.source, meta.num_devices, meta.num_categories) == ("ratings", 12, ml100k_raw.num_categories)
    assert main(["data", "table", "--out", str(tmp_path / "x")]) == 2
