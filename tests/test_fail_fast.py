"""Bad input is found before any heavy work: an address where no Ray cluster answers, a plug-in that cannot be
imported, a dataset that does not exist or is not one, an output directory that cannot be used. Each case runs the
real command line in its own process and must exit with code 2 and one sentence naming the thing, within seconds of
Python's own start-up, having prepared nothing: no dataset in the cache, no Ray session, no run directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import S3

from dccl_sim.cli import main
from dccl_sim.runtime.ray_runtime import check_reachable

# how much longer than starting Python and importing dccl-sim a failure may take: a connection's time-out (3 s) and
# a little. Preparing the default dataset or starting Ray takes longer than this on any machine.
SLACK_S = 5.0
SETTINGS = ["data.num_devices=4", "rounds=1", "output.progress=false"]
BROKEN_PLUGIN = "raise ImportError('libfoo.so: cannot open shared object file')\n"


@dataclass(frozen=True)
class Failure:
    code: int
    output: str
    seconds: float


@pytest.fixture(scope="module")
def startup_s() -> float:
    """Seconds from starting Python to having imported the command line: what every failure costs at least."""
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import dccl_sim.cli"], check=True, timeout=120)
    return time.perf_counter() - tic


@pytest.fixture
def where(tmp_path: Path) -> Path:
    """A folder for one case: plugins/ (on PYTHONPATH), cache/ (data.cache_dir), raytmp/ (RAY_TMPDIR: a started Ray
    would make its session folder here)."""
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "broken_plugin.py").write_text(BROKEN_PLUGIN)
    (tmp_path / "raytmp").mkdir()
    return tmp_path


def dccl_run(where: Path, *args: str, prefix: tuple[str, ...] = ()) -> Failure:
    """`dccl-sim run ARGS` in its own process, timed from its start to its exit."""
    command = [*prefix, sys.executable, "-m", "dccl_sim.cli", "run", *args]
    for setting in [*SETTINGS, f"data.cache_dir={where / 'cache'}"]:
        command += ["--set", setting]
    env = {
        **os.environ,
        "RAY_TMPDIR": str(where / "raytmp"),
        "PYTHONPATH": os.pathsep.join([str(where / "plugins"), *sys.path]),
    }
    tic = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=where, timeout=300, check=False)
    return Failure(done.returncode, (done.stdout + done.stderr).strip(), time.perf_counter() - tic)


def assert_failed_fast(failure: Failure, message: str, where: Path, startup_s: float) -> None:
    """Exit code 2, the message, nothing prepared, and no more time than start-up and a time-out."""
    print(f"{failure.seconds:.1f} s (start-up {startup_s:.1f} s): {failure.output}")
    assert failure.code == 2, failure.output
    assert failure.output.startswith("error: ") and message in failure.output, failure.output
    assert "Traceback" not in failure.output
    assert not (where / "cache" / "datasets").exists(), "the dataset was prepared"
    assert not any((where / "raytmp").iterdir()), "Ray was started"
    assert not (where / "run").exists(), "the run directory was made"
    assert failure.seconds < startup_s + SLACK_S


@pytest.fixture
def not_ray() -> Iterator[str]:
    """The address of a real server that is not a Ray cluster: a web server, as on a head's dashboard port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_address_nobody_listens_on(where: Path, startup_s: float) -> None:
    failure = dccl_run(where, "--address", "127.0.0.1:1", "--out", str(where / "run"))
    assert_failed_fast(failure, "cannot reach a Ray cluster at 127.0.0.1:1", where, startup_s)
    assert "ray start --head" in failure.output


def test_an_address_where_something_else_answers(where: Path, startup_s: float, not_ray: str) -> None:
    failure = dccl_run(where, "--address", not_ray, "--out", str(where / "run"))
    assert_failed_fast(failure, f"{not_ray} answers, but is not a Ray cluster's head", where, startup_s)


def test_a_non_routable_address(where: Path, startup_s: float) -> None:
    # where nothing routes, the connection times out after 3 s; behind a proxy that accepts every connection (as
    # some networks have), the proxy answers and is not Ray: either way one line, within seconds
    failure = dccl_run(where, "--address", "10.255.255.1:6379", "--out", str(where / "run"))
    assert_failed_fast(failure, "10.255.255.1:6379", where, startup_s)
    assert "cannot reach a Ray cluster" in failure.output or "is not a Ray cluster's head" in failure.output


def test_the_address_check_accepts_a_real_ray_cluster(ray_session) -> None:
    check_reachable(ray_session.get_runtime_context().gcs_address)  # raises if a real head were refused


def test_a_cluster_that_refuses_the_drivers_token(where: Path, startup_s: float, ray_session) -> None:
    """Ray 2.60 turns token authentication on for a Ray it starts (and says so in RAY_AUTH_MODE): a driver without
    the token is refused, which `ray.init` reports after 20 s of retries."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        pytest.skip("this machine's Ray runs without token authentication")
    address = ray_session.get_runtime_context().gcs_address
    without_token = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("RAY_AUTH")}
    try:
        failure = dccl_run(where, "--address", address, "--out", str(where / "run"))
    finally:
        os.environ.update(without_token)
    assert_failed_fast(failure, f"the Ray cluster at {address} uses token authentication and refused", where, startup_s)
    assert "RAY_AUTH_MODE=token" in failure.output


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ("mypkg.mod:Cls", "strategy 'mypkg.mod:Cls': no module named 'mypkg.mod'"),
        ("dccl_sim.strategies.dcl:DCCL", "no module named 'dccl_sim.strategies.dcl'"),
        ("broken_plugin:Strategy", "importing 'broken_plugin' failed: ImportError: libfoo.so"),
    ],
    ids=["no-such-package", "typo-in-module", "module-raises-importerror"],
)
def test_a_plugin_that_cannot_be_imported(where: Path, startup_s: float, strategy: str, message: str) -> None:
    failure = dccl_run(where, "--set", f"strategy={strategy}", "--out", str(where / "run"))
    assert_failed_fast(failure, message, where, startup_s)


def test_a_dataset_that_does_not_exist(where: Path, startup_s: float) -> None:
    failure = dccl_run(where, "--set", f"data.source={where / 'nope'}", "--out", str(where / "run"))
    assert_failed_fast(failure, f"no such dataset directory or MovieLens file: '{where / 'nope'}'", where, startup_s)


def test_a_folder_that_is_not_a_dataset(where: Path, startup_s: float) -> None:
    (where / "notes").mkdir()
    (where / "notes" / "todo.txt").write_text("a folder, but no dataset")
    failure = dccl_run(where, "--set", f"data.source={where / 'notes'}", "--out", str(where / "run"))
    assert_failed_fast(failure, "is neither a dataset directory (no meta.json", where, startup_s)


def test_a_bucket_that_does_not_exist(where: Path, startup_s: float, s3: S3) -> None:
    failure = dccl_run(where, "--set", "data.source=s3://no-such-bucket/data", "--out", str(where / "run"))
    assert_failed_fast(failure, "s3://no-such-bucket/data is not a dataset directory (no meta.json)", where, startup_s)


def test_a_file_in_place_of_the_output_directory(where: Path, startup_s: float) -> None:
    (where / "taken").write_text("")
    failure = dccl_run(where, "--out", str(where / "taken" / "run"))
    assert_failed_fast(failure, f"{where / 'taken'} is a file, not a folder", where, startup_s)


def test_an_output_directory_holding_a_run(where: Path, startup_s: float) -> None:
    old = where / "old"
    old.mkdir()
    (old / "rounds.parquet").write_text("the old run's rounds")
    failure = dccl_run(where, "--out", str(old))
    assert_failed_fast(failure, f"output directory {old} already holds a run", where, startup_s)
    assert "--resume" in failure.output and "--overwrite" in failure.output
    assert (old / "rounds.parquet").read_text() == "the old run's rounds"


def _read_only(folder: Path) -> tuple[str, ...]:
    """Make `folder` read-only; returns the command prefix under which it is: none for an ordinary user (its
    permissions), and for root, whom permissions do not stop, a read-only bind mount in a private mount namespace."""
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return ()
    prefix = ("unshare", "-rm", "sh", "-c", 'mount -o bind,ro "$0" "$0" && exec "$@"', str(folder))
    if shutil.which("unshare") is None or subprocess.run([*prefix, "true"], check=False).returncode != 0:
        pytest.skip("running as root without user namespaces: no way to make a folder read-only here")
    return prefix


def test_an_output_directory_that_cannot_be_written(where: Path, startup_s: float) -> None:
    locked = where / "locked"
    locked.mkdir()
    prefix = _read_only(locked)
    try:
        failure = dccl_run(where, "--out", str(locked / "run"), prefix=prefix)
    finally:
        locked.chmod(0o755)
    assert_failed_fast(failure, f"output directory {locked / 'run'}: cannot write in {locked}", where, startup_s)
    assert not any(locked.iterdir())


def test_overwrite_keeps_the_old_run_when_the_dataset_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A dataset that fails while it is prepared (here: damaged MovieLens files) must not cost the run that
    --overwrite would replace: the output directory is claimed only once the dataset is ready."""
    ratings = tmp_path / "ml" / "u.data"
    ratings.parent.mkdir()
    ratings.write_text("1\t2\t5\t881250949\nnot a rating line\n")
    old = tmp_path / "old"
    old.mkdir()
    (old / "rounds.parquet").write_text("the old run's rounds")
    settings = [*SETTINGS, f"data.cache_dir={tmp_path / 'cache'}", "data.source=movielens", f"data.path={ratings}"]
    code = main(["run", "--out", str(old), "--overwrite", *(arg for s in settings for arg in ("--set", s))])
    assert code == 2
    assert str(ratings) in capsys.readouterr().out
    assert (old / "rounds.parquet").read_text() == "the old run's rounds"
