"""Datasets in an S3 bucket, as cluster/GUIDE.md tells users to keep them: the real CLI and pyarrow's real S3 client
against a real S3-compatible server (moto's, started here on localhost), pointed at it the way a MinIO user would,
with `AWS_ENDPOINT_URL` (or `endpoint_override` in the URI)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import BUCKET, DIRECT, S3

from dccl_sim.cli import main
from dccl_sim.config import load_config
from dccl_sim.data.store import read_devices, read_meta

pytest.importorskip("moto.server", reason="moto[server] (a dev extra) runs the local S3 server")

DATASET = f"s3://{BUCKET}/datasets/small"
BUILD = ["synthetic", "--devices", "40", "--set", "data.eval_negatives=9"]
RUN = ["runtime.backend=local", "rounds=1", "cloud.pretrain_epochs=1", "patch.bootstrap_epochs=1"]
RUN += ["output.progress=false", "data.eval_negatives=9"]
# measured, so they differ from run to run; every other column of rounds.parquet must match
TIMINGS = ("t_", "device_compute_", "peak_memory_mb")


def bucket_keys(s3: S3, prefix: str) -> set[str]:
    """The object keys under `prefix`, listed by a plain HTTP ListObjectsV2 (not through pyarrow)."""
    url = f"{s3.endpoint}/{BUCKET}?list-type=2&max-keys=1000&prefix={prefix}"
    with DIRECT.open(url, timeout=10) as response:
        listing = ET.fromstring(response.read())
    return {element.text for element in listing.iter() if element.tag.endswith("}Key")}


def dccl_sim(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line in its own process, as a user runs it, with this module's environment."""
    command = [sys.executable, "-m", "dccl_sim.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=dict(os.environ), timeout=300)


def run_args(s3: S3, source: str, out: Path) -> list[str]:
    settings = [f"data.source={source}", f"data.cache_dir={s3.cache}", *RUN]
    return ["run", "--out", str(out)] + [arg for setting in settings for arg in ("--set", setting)]


@pytest.fixture(scope="module")
def s3_dataset(s3: S3) -> str:
    """`dccl-sim data synthetic --devices 40 --out s3://BUCKET/datasets/small`."""
    result = dccl_sim("data", *BUILD, "--out", DATASET)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"written to {DATASET}" in result.stdout
    return DATASET


def test_the_data_command_writes_the_dataset_into_the_bucket(s3: S3, s3_dataset: str) -> None:
    keys = bucket_keys(s3, "datasets/small/")
    expected = ["meta.json", "items.parquet", "devices.parquet"]
    expected += ["samples/shard=00000/part-0.parquet", "sequences/shard=00000/part-0.parquet"]
    assert {f"datasets/small/{name}" for name in expected} <= keys, sorted(keys)
    assert read_meta(s3_dataset).num_devices == 40
    assert read_devices(s3_dataset, [0, 39]).num_devices == 2


def test_a_run_from_the_bucket_matches_one_from_a_local_copy(s3: S3, s3_dataset: str, tmp_path: Path) -> None:
    local = tmp_path / "local-dataset"
    built = dccl_sim("data", *BUILD, "--out", str(local))
    assert built.returncode == 0, built.stdout + built.stderr
    tables = {}
    for name, source in (("s3", s3_dataset), ("local", str(local))):
        result = dccl_sim(*run_args(s3, source, tmp_path / f"run-{name}"))
        assert result.returncode == 0, result.stdout + result.stderr
        tables[name] = pq.read_table(tmp_path / f"run-{name}" / "rounds.parquet").to_pylist()
    from_s3, from_local = tables["s3"], tables["local"]
    assert len(from_s3) == 1 and from_s3[0]["n_devices"] == 40  # the bucket's 40 devices, not a default dataset
    assert math.isfinite(from_s3[0]["cloud_gauc"]) and 0 < from_s3[0]["cloud_gauc"] < 1
    metrics = [key for key in from_s3[0] if not key.startswith(TIMINGS)]
    assert len(metrics) > 50
    assert {key: from_s3[0][key] for key in metrics} == {key: from_local[0][key] for key in metrics}


def test_the_endpoint_can_be_given_in_the_uri_instead(s3: S3, s3_dataset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    uri = f"{s3_dataset}?endpoint_override={s3.endpoint.removeprefix('http://')}&scheme=http"
    assert load_config(None, [f"data.source={uri}"]).data.source == uri  # survives --set's parsing
    assert read_meta(uri).num_devices == 40
    assert read_devices(uri, [5]).num_devices == 1


def test_a_bucket_that_does_not_exist_is_a_one_line_error(
    s3: S3, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = "s3://no-such-bucket/x"
    assert main(run_args(s3, missing, tmp_path / "run")) == 2  # an exception (a traceback) would fail the test
    printed = capsys.readouterr().out
    assert f"error: {missing} is not a dataset directory (no meta.json)" in printed
    assert main(["data", *BUILD, "--out", missing]) == 2
    printed = capsys.readouterr().out
    assert f"error: cannot write the dataset to {missing}: Bucket 'no-such-bucket' not found" in printed
    assert "Traceback" not in printed


def test_an_endpoint_nobody_answers_is_a_one_line_error(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert main(run_args(s3, DATASET, tmp_path / "run")) == 2
    printed = capsys.readouterr().out
    assert f"error: cannot read {DATASET}/meta.json:" in printed and "connect" in printed.lower()
