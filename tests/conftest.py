"""Shared fixtures: a tiny hand-made raw dataset and small real ML-100K builds, made once per session."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dccl_sim.config import DataConfig, SyntheticConfig
from dccl_sim.data.build import BuiltDataset, build_dataset
from dccl_sim.data.movielens import load_ml100k
from dccl_sim.data.raw import RawDataset
from dccl_sim.data.synthetic import generate_synthetic
from dccl_sim.runtime.observers import Observer

# the smallest real run the round-loop tests use: 8 ML-100K users, 9 negatives per evaluation positive, one epoch
# of pretraining and bootstrapping, no progress display (each file adds rounds and the runtime it needs)
TINY_RUN = [
    "data.num_devices=8",
    "data.eval_negatives=9",
    "cloud.pretrain_epochs=1",
    "patch.bootstrap_epochs=1",
    "output.progress=false",
]


def make_tiny_raw() -> RawDataset:
    """Three users (ids 10, 20, 30) over 16 items; user 30 has exactly 5 interactions."""
    rows = []
    for user, count in ((10, 12), (20, 8), (30, 5)):
        for position in range(count):
            rows.append((user, 100 + (position * 7 + user) % 16, 1000 * user + 10 * position))
    user_id, item_id, timestamp = (np.array(column, dtype=np.int64) for column in zip(*rows, strict=True))
    return RawDataset(
        name="tiny",
        user_id=user_id,
        item_id=item_id,
        timestamp=timestamp,
        item_ids=np.arange(100, 116, dtype=np.int64),
        item_category=np.arange(16, dtype=np.int64) % 3,
        num_categories=3,
        user_ids=np.array([10, 20, 30], dtype=np.int64),
        profiles={"gender": np.array([0, 1, 1])},
        profile_cardinalities={"gender": 2},
    )


@pytest.fixture
def tiny_raw() -> RawDataset:
    return make_tiny_raw()


@pytest.fixture(scope="session")
def ml100k_raw(tmp_path_factory: pytest.TempPathFactory) -> RawDataset:
    return load_ml100k(DataConfig().cache_dir)


@pytest.fixture(scope="session")
def ml100k_small(ml100k_raw: RawDataset) -> BuiltDataset:
    """The first 60 ML-100K users with 19 negatives per evaluation positive: small enough for fast tests."""
    config = DataConfig(num_devices=60, eval_negatives=19)
    return build_dataset(ml100k_raw, config, seed=0)


@pytest.fixture(scope="session")
def synthetic_small() -> BuiltDataset:
    config = DataConfig(source="synthetic", num_devices=300, eval_negatives=19)
    raw = generate_synthetic(SyntheticConfig(num_items=300), 300, seed=0)
    return build_dataset(raw, config, seed=0)


def assert_aucs_within_one_pair(got, want, n_test, eval_negatives: int, name: str, slack: float = 1e-9) -> None:
    """Per-device AUCs equal up to one swapped positive/negative pair each. A per-device AUC counts ordered pairs:
    float32 sums in another order (thread count, placement, CPU) may swap two scores tied to ~1e-7, so a device's
    AUC may differ by 1 / (positives × negatives), and by nothing more; NaN (no positive or no negative) must match."""
    got, want = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
    assert np.array_equal(np.isnan(got), np.isnan(want)), name
    positives = np.asarray(n_test) / (1 + eval_negatives)
    one_pair = 1.0 / np.maximum(positives * positives * eval_negatives, 1.0)
    differ = np.abs(got - want)[~np.isnan(want)]
    assert (differ <= one_pair[~np.isnan(want)] + slack).all(), (name, differ.max())


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray instance for the whole test session, with explicit CPUs; always shut down. Started here, it is
    a cluster of one 2-CPU node to `RayRuntime`: the cloud's worker reserves one of them."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def round_context(seed: int, round_index: int, participants: np.ndarray | None = None):
    """The round context of a run with this seed, for calling steps directly."""
    from dccl_sim.config import SimConfig
    from dccl_sim.context import RoundContext

    return RoundContext(SimConfig(seed=seed), round_index, np.zeros(0) if participants is None else participants)


# the S3-compatible store of the tests that read and write buckets: moto's server on localhost, holding BUCKET
BUCKET = "dccl-test"
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # to localhost, whatever *_proxy says


@dataclass
class S3:
    endpoint: str  # http://127.0.0.1:PORT
    cache: Path  # data.cache_dir for the runs (pretrained clouds), so no test writes to ~/.cache


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """A moto S3 server on a free localhost port holding an empty bucket, and the environment a user sets to reach
    an S3-compatible store (credentials and endpoint; no region), for the requesting module only."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (a dev extra) runs the local S3 server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        # unsigned requests are fine for moto: create the bucket without any AWS client
        DIRECT.open(urllib.request.Request(f"{endpoint}/{BUCKET}", method="PUT"), timeout=10).close()
        home = tmp_path_factory.mktemp("s3-home")
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
                env.delenv(name, raising=False)
            env.setenv("AWS_CONFIG_FILE", str(home / "config"))  # none: the user's ~/.aws plays no part
            env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
            env.setenv("AWS_EC2_METADATA_DISABLED", "true")
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_ENDPOINT_URL", endpoint)
            yield S3(endpoint, home / "cache")
    finally:
        server.stop()


class PhaseRecorder(Observer):
    """Keeps every phase line a run announces (`on_phase`), in order, in `seen`."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_phase(self, round_index: int, phase: str) -> None:
        self.seen.append(phase)
