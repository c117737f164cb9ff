"""cluster/: `ray-up.yaml` checked the way `ray up` applies it, `rayjob.yaml` against the KubeRay RayJob CRD.

ray-up.yaml: Ray's own validator (the schema step of `ray up`); then what its file mounts and rsync rules deliver to
a node: the rsync arguments Ray's command runner builds, run by rsync where it is installed, else by an emulation of
rsync's filter rules (checked against rsync where both exist); then its setup commands, run against the delivered
copy as far as that works offline: a fresh virtual environment that reuses this checkout's torch and Ray instead of
downloading them, the delivered package installed into it by pip, and `dccl-sim` run from it.

rayjob.yaml: an excerpt of the KubeRay CRD's OpenAPI schema (tests/data, which says where it comes from), validated
with unknown fields rejected as `kubectl apply` does; then what the schema cannot say: KubeRay's own spec checks, an
entrypoint that `dccl-sim` accepts, and an image (cluster/Dockerfile) that provides it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
CRD_EXCERPT = Path(__file__).parent / "data" / "kuberay-rayjob-crd-v1-excerpt.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RSYNC = shutil.which("rsync")
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"

# the rsync_exclude that ray-up.yaml had at first: "**/data" also matched the package dccl_sim/data
FIRST_RSYNC_EXCLUDE = [
    "**/.git",
    "**/.venv",
    "**/__pycache__",
    "**/.pytest_cache",
    "**/.ruff_cache",
    "**/runs",
    "**/data",
    "**/*.egg-info",
]


def _pin(requirement: str) -> Version:
    """The version an `==` requirement pins."""
    (spec,) = Requirement(requirement).specifier
    assert spec.operator == "==", requirement
    return Version(spec.version)


def _project_requirement(name: str) -> Requirement:
    (found,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == name]
    return found


# ---------------------------------------------------------------------------------------------------------------
# ray-up.yaml: Ray's validator


def ray_up_config() -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())


def prepared(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` makes of the file before it needs the cloud (`commands._bootstrap_config`): defaults merged,
    setup commands merged per node kind, per-node-type worker bounds filled, then `validate_config` (ray-schema.json
    plus its cross-field checks). The steps after it, `fillout_available_node_types_resources` and the provider's
    `bootstrap_config`, call the AWS API and need credentials, so they are not run here."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def test_ray_up_yaml_passes_rays_own_validator() -> None:
    from ray.autoscaler._private.providers import _NODE_PROVIDERS

    raw = ray_up_config()
    assert raw["provider"]["type"] in _NODE_PROVIDERS  # create_or_update_cluster's first check
    config = prepared(raw)
    assert config["head_setup_commands"] == raw["setup_commands"] + raw["head_setup_commands"]
    assert config["worker_setup_commands"] == raw["setup_commands"] + raw["worker_setup_commands"]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"] == {"CPU": 0}
    # the defaults Ray merged in did not bring mounts or sync rules of their own
    assert config["file_mounts"] == raw["file_mounts"]
    assert config["rsync_exclude"] == raw["rsync_exclude"]
    assert config.get("rsync_filter", []) == raw.get("rsync_filter", [])


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda c: _rename(c, "rsync_exclude", "rsync_exlude"), id="misspelt-top-level-key"),
        pytest.param(
            lambda c: _rename(c["available_node_types"]["ray.worker.default"], "min_workers", "min_worker"),
            id="misspelt-node-type-key",
        ),
        pytest.param(lambda c: c.update(idle_timeout_minutes="ten"), id="wrong-type"),
        pytest.param(lambda c: c.update(head_node_type="ray.head.gpu"), id="head-node-type-not-defined"),
        pytest.param(lambda c: c.update(max_workers=1), id="max-workers-below-min-workers"),
    ],
)
def test_rays_validator_rejects_a_broken_copy(break_it: Callable[[dict[str, Any]], None]) -> None:
    broken = ray_up_config()
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        prepared(broken)


def test_ray_up_token_mount_is_where_ray_looks_on_the_nodes() -> None:
    config = ray_up_config()
    home = f"/home/{config['auth']['ssh_user']}"
    assert config["file_mounts"][f"{home}/.ray/auth_token"] == "~/.ray/auth_token"  # `ray get-auth-token --generate`
    assert "chmod 600 ~/.ray/auth_token" in config["setup_commands"]
    # `~` in the commands is the SSH user's home: every mount lands there
    assert all(remote.startswith(f"{home}/") for remote in config["file_mounts"])


# ---------------------------------------------------------------------------------------------------------------
# ray-up.yaml: what the file mounts deliver


def ray_rsync_args(config: dict[str, Any]) -> list[str]:
    """The filter arguments Ray's SSH command runner adds to every `rsync` it runs for file mounts (its own helper,
    `SSHCommandRunner._create_rsync_filter_args`, which reads no instance state)."""
    from ray.autoscaler._private.command_runner import SSHCommandRunner

    options = {"rsync_exclude": config.get("rsync_exclude"), "rsync_filter": config.get("rsync_filter")}
    return SSHCommandRunner._create_rsync_filter_args(None, options)


@functools.cache
def _wildmatch(pattern: str) -> re.Pattern[str]:
    """rsync's wildcards: `**` anything, `*` anything but "/", `?` one character but "/"."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wild = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wild.get(part, re.escape(part)) for part in parts), re.DOTALL)


@dataclasses.dataclass(frozen=True)
class RsyncRule:
    """An rsync exclude pattern, matched as rsync's `rule_matches` does (the cases Ray's arguments can produce)."""

    pattern: str
    anchored: bool
    dir_only: bool

    @classmethod
    def parse(cls, text: str, base: str = "") -> RsyncRule:
        """`base`: for a rule read from a per-directory merge file, that file's directory (anchored rules are
        anchored there)."""
        if text.startswith(("+ ", "- ", "!")) or any(c in text for c in "[\\") or "***" in text:
            raise NotImplementedError(f"rsync rule {text!r} is not emulated here")
        dir_only = text.endswith("/")
        body = text.rstrip("/")
        anchored = body.startswith("/")
        body = body.lstrip("/")
        if anchored and base:
            body = f"{base}/{body}"
        return cls(body, anchored, dir_only)

    def matches(self, path: str, is_dir: bool) -> bool:
        """`path`: relative to the root of the transfer."""
        if self.dir_only and not is_dir:
            return False
        regex = _wildmatch(self.pattern)
        if self.anchored:
            return bool(regex.fullmatch(path))
        if "/" not in self.pattern and "**" not in self.pattern:  # only the name
            return bool(regex.fullmatch(path.rsplit("/", 1)[-1]))
        if self.pattern.startswith("**"):  # "**/" may match from the start of the path
            return bool(regex.fullmatch("/" + path))
        if "**" not in self.pattern:  # the last components, as many as the pattern has
            depth = self.pattern.count("/") + 1
            parts = path.split("/")
            return len(parts) >= depth and bool(regex.fullmatch("/".join(parts[-depth:])))
        starts = [0] + [i + 1 for i, c in enumerate(path) if c == "/"]  # an infix "**": from any component on
        return any(regex.fullmatch(path[i:]) for i in starts)


def _parse_rsync_args(args: list[str]) -> tuple[list[RsyncRule], list[str]]:
    """Ray's arguments: `--exclude PATTERN` and `--filter "dir-merge,- FILE"` pairs."""
    rules, merge_files = [], []
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag == "--exclude":
            rules.append(RsyncRule.parse(value))
        elif flag == "--filter" and (merge := re.fullmatch(r"dir-merge,- (.+)", value)):
            merge_files.append(merge.group(1))
        else:
            raise NotImplementedError(f"rsync argument {flag} {value!r} is not emulated here")
    return rules, merge_files


def emulated_rsync(source: Path, target: Path, args: list[str]) -> None:
    """`rsync -a ARGS SOURCE[/] TARGET[/]` for the filter arguments Ray builds: excluded entries are skipped (an
    excluded directory is not entered), a per-directory merge file's rules apply to its directory's subtree."""
    rules, merge_files = _parse_rsync_args(args)
    if not source.is_dir():
        if not any(rule.matches(source.name, False) for rule in rules):
            shutil.copy2(source, target)
        return
    target.mkdir(parents=True, exist_ok=True)

    def copy_dir(rel: str, rules: list[RsyncRule]) -> None:
        here = source / rel
        rules = list(rules)
        for name in merge_files:
            if (here / name).is_file():
                lines = (here / name).read_text().splitlines()
                rules += [RsyncRule.parse(line, rel) for line in lines if line.strip() and line[0] not in "#;"]
        for entry in sorted(os.scandir(here), key=lambda e: e.name):
            path = f"{rel}/{entry.name}" if rel else entry.name
            is_dir = entry.is_dir(follow_symlinks=False)
            if any(rule.matches(path, is_dir) for rule in rules):
                continue
            if entry.is_symlink():
                (target / path).symlink_to(os.readlink(entry.path))
            elif is_dir:
                (target / path).mkdir()
                copy_dir(path, rules)
            else:
                shutil.copy2(entry.path, target / path)

    copy_dir("", rules)


def real_rsync(source: Path, target: Path, args: list[str]) -> None:
    """What Ray's SSH command runner runs (`rsync -avz --rsh ssh ARGS SOURCE USER@HOST:TARGET`), locally."""
    assert RSYNC is not None
    trailing = "/" if source.is_dir() else ""
    command = [RSYNC, "-a", *args, f"{source}{trailing}", f"{target}{trailing}"]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


def ray_sync(source: Path, target: Path, config: dict[str, Any], *, rsync: bool | None = None) -> None:
    """Copy as Ray's rsync does with the config's rules; `rsync`: run rsync itself (default: where it is installed)
    or the emulation."""
    use_rsync = RSYNC is not None if rsync is None else rsync
    (real_rsync if use_rsync else emulated_rsync)(source, target, ray_rsync_args(config))


def deliver(config: dict[str, Any], node: Path, cwd: Path = REPO, *, rsync: bool | None = None) -> dict[str, Path]:
    """Copy the file mounts whose local path is in `cwd` into `node` (a stand-in for the node's file system) as
    Ray's updater syncs them (`NodeUpdater.sync_file_mounts`): the local path with `~` expanded and taken relative
    to the directory `ray up` runs in, `mkdir -p` of the remote path's folder, then rsync with the filter arguments.
    The `~` mounts (the token) are left out. Returns remote path -> delivered path."""
    delivered = {}
    for remote, local in config["file_mounts"].items():
        if local.startswith("~"):
            continue
        source = cwd / os.path.expanduser(local)
        assert source.exists(), f"file_mounts {remote!r}: {source} does not exist (`ray up` asserts it does)"
        target = node / remote.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        ray_sync(source, target, config, rsync=rsync)
        delivered[remote] = target
    return delivered


def _tree(root: Path) -> set[str]:
    return {f"{p.relative_to(root)}{'/' if p.is_dir() and not p.is_symlink() else ''}" for p in root.rglob("*")}


def _packages(root: Path) -> set[str]:
    from setuptools import find_packages

    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    return set(find_packages(str(root), include=include))


def install_tree_problems(tree: Path, source: Path = REPO) -> list[str]:
    """What keeps `pip install TREE` from installing the project of `source` whole, or what should not be there."""
    problems = []
    readme = PYPROJECT["project"]["readme"]
    problems += [f"{name} missing" for name in ("pyproject.toml", readme) if not (tree / name).is_file()]
    problems += [f"package {p} missing" for p in sorted(_packages(source) - _packages(tree))]
    modules = {str(p.relative_to(source)) for p in source.glob("dccl_sim/**/*.py") if "__pycache__" not in p.parts}
    problems += [f"module {m} missing" for m in sorted(m for m in modules if not (tree / m).is_file())]
    unwanted = (".git", ".venv", "runs", "data", "build", "__pycache__")
    for path in sorted(_tree(tree)):
        parts = path.rstrip("/").split("/")
        if parts[0] in unwanted or "__pycache__" in parts or path.endswith((".pyc", ".egg-info/")):
            problems.append(f"{path} should not be delivered")
    return problems


def make_source_tree(root: Path) -> Path:
    """A small checkout: the package (with a `data` subpackage and a `build.py`), and what a working copy also has."""
    files = {
        "pyproject.toml": (REPO / "pyproject.toml").read_text(),
        "README.md": "# readme\n",
        ".gitignore": (REPO / ".gitignore").read_text(),
        "dccl_sim/__init__.py": "",
        "dccl_sim/cli.py": "",
        "dccl_sim/data/__init__.py": "",
        "dccl_sim/data/build.py": "",
        "dccl_sim/runtime/__init__.py": "",
        "dccl_sim/__pycache__/cli.cpython-311.pyc": "",
        "dccl_sim.egg-info/PKG-INFO": "",
        "data/ml100k/meta.json": "{}",
        "runs/latest/config.json": "{}",
        "build/lib/dccl_sim/__init__.py": "",
        ".venv/bin/python": "",
        ".git/HEAD": "",
        "experiments/notes/.gitignore": "*.tmp\n/local/\n# a comment\n",
        "experiments/notes/keep.md": "",
        "experiments/notes/scratch.tmp": "",
        "experiments/notes/local/x.md": "",
        "experiments/local/y.md": "",
        "stray.pyc": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


# sync rules to compare the emulation with rsync on: Ray's arguments for each
SYNC_RULES = {
    "ray-up.yaml": lambda: {k: v for k, v in ray_up_config().items() if k.startswith("rsync_")},
    "first-ray-up.yaml": lambda: {"rsync_exclude": FIRST_RSYNC_EXCLUDE},
    "gitignore-merge": lambda: {"rsync_exclude": [".git"], "rsync_filter": [".gitignore"]},
    "anchored-and-infix": lambda: {"rsync_exclude": ["/data", "runs/", "dccl_sim/data", "build/**", "n*s/?eep*"]},
}
needs_rsync = pytest.mark.skipif(RSYNC is None, reason="rsync is not installed: nothing to compare the emulation with")


@needs_rsync
@pytest.mark.parametrize("rules", SYNC_RULES)
def test_rsync_emulation_agrees_with_rsync(tmp_path: Path, rules: str) -> None:
    source = make_source_tree(tmp_path / "src")
    args = ray_rsync_args(SYNC_RULES[rules]())
    real_rsync(source, tmp_path / "rsync", args)
    emulated_rsync(source, tmp_path / "emulated", args)
    assert _tree(tmp_path / "emulated") == _tree(tmp_path / "rsync")


@needs_rsync
def test_rsync_emulation_agrees_with_rsync_on_ray_up_yaml_mounts(tmp_path: Path) -> None:
    config = ray_up_config()
    emulated = deliver(config, tmp_path / "emulated", rsync=False)
    assert deliver(config, tmp_path / "rsync", rsync=True).keys() == emulated.keys()
    assert _tree(tmp_path / "emulated") == _tree(tmp_path / "rsync")


def test_first_rsync_exclude_would_have_dropped_a_subpackage(tmp_path: Path) -> None:
    """The check below is not vacuous: the rules ray-up.yaml had at first ("**/data") lose dccl_sim/data."""
    source = make_source_tree(tmp_path / "src")
    config = {"file_mounts": {"/home/ubuntu/dccl-sim": "."}, "rsync_exclude": FIRST_RSYNC_EXCLUDE}
    tree = deliver(config, tmp_path / "node", cwd=source)["/home/ubuntu/dccl-sim"]
    problems = install_tree_problems(tree, source)
    assert "package dccl_sim.data missing" in problems
    assert "module dccl_sim/data/build.py missing" in problems


def test_ray_up_delivers_exactly_what_installing_needs(tmp_path: Path) -> None:
    config = ray_up_config()
    delivered = deliver(config, tmp_path / "node")
    home = tmp_path / "node" / "home" / config["auth"]["ssh_user"]
    tree = home / "dccl-sim"
    assert all(path.is_relative_to(tree) for path in delivered.values()), delivered
    assert install_tree_problems(tree) == []
    assert {p.name for p in tree.iterdir()} == {"pyproject.toml", "README.md", "dccl_sim"}
    assert (tree / "pyproject.toml").read_bytes() == (REPO / "pyproject.toml").read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# ray-up.yaml: the setup commands


@dataclasses.dataclass
class PipInstall:
    index_url: str | None
    requirements: list[Requirement]
    local_paths: list[str]


def venv_of(config: dict[str, Any]) -> str:
    """The virtual environment the setup commands create, as written (`~/...`)."""
    created = [m.group(1) for c in config["setup_commands"] if (m := re.search(r"python3 -m venv (\S+)$", c))]
    assert len(created) == 1, config["setup_commands"]
    return created[0]


def pip_installs(commands: list[str], venv: str) -> list[PipInstall]:
    """The `pip install` commands, in order; each must be the environment's own pip and nothing else on the line."""
    installs = []
    for command in commands:
        if "pip install" not in command:
            continue
        tokens = shlex.split(command)
        assert tokens[:2] == [f"{venv}/bin/pip", "install"], command
        index_url, requirements, local_paths = None, [], []
        rest = iter(tokens[2:])
        for token in rest:
            if token == "--index-url":
                index_url = next(rest)
            elif token.startswith("-"):
                assert token in ("--quiet", "-q", "--upgrade", "-U"), f"{command}: {token} is not understood here"
            elif token.startswith(("~", "/", ".")):
                local_paths.append(token)
            else:
                requirements.append(Requirement(token))
        installs.append(PipInstall(index_url, requirements, local_paths))
    return installs


def on_node(path: str, node: Path, ssh_user: str) -> Path:
    home = Path("/home") / ssh_user
    absolute = home / path[2:] if path.startswith("~/") else Path(path)
    return node / absolute.relative_to("/")


def test_setup_commands_install_dccl_sim_from_what_the_mounts_deliver(tmp_path: Path) -> None:
    raw = ray_up_config()
    config = prepared(raw)
    venv, user = venv_of(raw), raw["auth"]["ssh_user"]
    node = tmp_path / "node"
    deliver(raw, node)
    for kind in ("head", "worker"):  # the device packs import dccl_sim on the workers, the driver on the head
        installs = pip_installs(config[f"{kind}_setup_commands"], venv)
        local = [(i, p) for i, install in enumerate(installs) for p in install.local_paths]
        assert len(local) == 1, f"{kind}: {local}"
        position, path = local[0]
        tree = on_node(path, node, user)
        assert tomllib.loads((tree / "pyproject.toml").read_text())["project"]["name"] == "dccl-sim"
        assert install_tree_problems(tree) == []
        # CPU torch comes first, from PyTorch's CPU index: installing dccl-sim then keeps it (it satisfies the
        # package's torch requirement) instead of pulling the CUDA build from PyPI
        torch = [(i, r) for i, install in enumerate(installs) for r in install.requirements if r.name == "torch"]
        assert len(torch) == 1, torch
        torch_at, torch_req = torch[0]
        assert torch_at < position and installs[torch_at].index_url == CPU_TORCH_INDEX
        assert _project_requirement("torch").specifier.contains(_pin(str(torch_req)))
        # Ray with the dashboard and Jobs API (`ray job submit`), at the version the package pins
        (ray,) = [r for install in installs for r in install.requirements if r.name == "ray"]
        assert "default" in ray.extras
        assert _pin(str(ray)) == _pin(str(_project_requirement("ray")))
    # Ray is started from the same environment, token authentication on, and every shell the updater opens finds
    # the environment's commands
    for command in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert f"{venv}/bin/ray " in command
        assert "ray start" not in command or "export RAY_AUTH_MODE=token;" in command
    assert any(venv.replace("~", "$HOME") + "/bin" in c for c in raw["initialization_commands"])


def _main_site_packages() -> Path:
    return Path(sysconfig.get_path("purelib"))


def _checkout_install_snapshot() -> dict[str, bytes]:
    """This checkout's own (editable) install of dccl-sim: its metadata and import hook."""
    site = _main_site_packages()
    files = [*site.glob("dccl_sim-*.dist-info/*"), *site.glob("__editable__*dccl_sim*")]
    return {str(p): p.read_bytes() for p in files if p.is_file()}


def test_setup_commands_install_and_run_dccl_sim_offline(tmp_path: Path) -> None:
    """The setup commands against the delivered copy, offline (well under 2 minutes): the environment is made as
    `python3 -m venv` does but reuses this checkout's site-packages (torch, Ray and dccl-sim's other dependencies,
    which a node downloads) through a .pth file; the local path the setup commands install is installed by pip
    from the delivered tree (`--no-deps --no-index --no-build-isolation`); the initialization commands are run as
    written; then `dccl-sim` is found on the PATH of a shell reading ~/.bashrc and runs a one-round simulation."""
    raw = ray_up_config()
    config = prepared(raw)
    venv_written, user = venv_of(raw), raw["auth"]["ssh_user"]
    node = tmp_path / "node"
    deliver(raw, node)
    home = on_node("~/", node, user)
    venv = on_node(venv_written, node, user)

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    venv_python = venv / "bin" / "python"
    purelib = subprocess.run(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "_checkout_site_packages.pth").write_text(f"{_main_site_packages()}\n")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    before = _checkout_install_snapshot()
    for install in pip_installs(config["head_setup_commands"], venv_written):
        for path in install.local_paths:
            pip = [venv_python, "-m", "pip", "install", "--quiet", "--no-cache-dir"]
            pip += ["--no-deps", "--no-index", "--no-build-isolation", on_node(path, node, user)]
            done = subprocess.run(pip, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, done.stdout + done.stderr
    # pip saw this checkout's editable dccl-sim through the .pth file and must have left it alone
    assert _checkout_install_snapshot() == before

    for _ in range(2):  # as written, and idempotent (they run again on every `ray up` that changes the config)
        for command in raw["initialization_commands"]:
            subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    bashrc = (home / ".bashrc").read_text().splitlines()
    assert len(bashrc) == len(raw["initialization_commands"]), bashrc
    shell = subprocess.run(
        ["bash", "-c", "source ~/.bashrc && command -v dccl-sim && echo $RAY_AUTH_MODE"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shell.stdout.split() == [str(venv / "bin" / "dccl-sim"), "token"], shell.stdout + shell.stderr

    where = subprocess.run(
        [venv_python, "-c", "import dccl_sim.data.build, dccl_sim.cli; print(dccl_sim.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the delivered copy, not this checkout

    dccl_sim = str(venv / "bin" / "dccl-sim")
    helped = subprocess.run([dccl_sim, "--help"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "run" in helped.stdout, helped.stderr
    tiny = ["data.source=synthetic", "runtime.backend=local", "rounds=1", "data.num_devices=8"]
    tiny += ["data.eval_negatives=9", "cloud.pretrain_epochs=1", "patch.bootstrap_epochs=1", "output.progress=false"]
    command = [dccl_sim, "run", *(a for s in tiny for a in ("--set", s)), "--out", str(tmp_path / "run")]
    ran = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert (tmp_path / "run" / "rounds.parquet").is_file()
    # `ray rsync-down cluster/ray-up.yaml /home/ubuntu/runs/NAME runs/` (cluster/GUIDE.md) goes through the same
    # rsync rules: they keep every file of a run directory
    ray_sync(tmp_path / "run", tmp_path / "fetched", raw)
    assert _tree(tmp_path / "fetched") == _tree(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------------
# rayjob.yaml: the KubeRay CRD's schema


def rayjob_documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d is not None]


def the_rayjob() -> dict[str, Any]:
    (rayjob,) = [d for d in rayjob_documents() if d.get("kind") == "RayJob"]
    return rayjob


def crd_schema() -> dict[str, Any]:
    return yaml.safe_load(CRD_EXCERPT.read_text())["openAPIV3Schema"]


def strict(schema: Any) -> Any:
    """Unknown fields are errors, as with `kubectl apply` (server-side field validation "Strict"): every object
    schema that lists its properties allows no others (a structural CRD schema never says so itself)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator: Any, list_type: str, instance: Any, schema: dict[str, Any]) -> Iterator[Any]:
    """`x-kubernetes-list-type: map`: the API server refuses two items with the same keys (defaults filled in)."""
    if list_type != "map" or not validator.is_type(instance, "array"):
        return
    keys = schema["x-kubernetes-list-map-keys"]
    properties = schema["items"]["properties"]
    seen = set()
    for item in instance:
        key = tuple(item.get(k, properties[k].get("default")) for k in keys) if isinstance(item, dict) else None
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for {keys}: {key}")
        seen.add(key)


CrdValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_map_keys})


def crd_errors(document: dict[str, Any]) -> list[str]:
    validator = CrdValidator(strict(crd_schema()))
    errors = sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_crd_excerpt_is_a_valid_schema() -> None:
    CrdValidator.check_schema(strict(crd_schema()))


def test_rayjob_yaml_matches_the_kuberay_crd_schema() -> None:
    rayjob = the_rayjob()
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert crd_errors(rayjob) == []


def _uses_elided(instance: Any, schema: dict[str, Any], path: str = "") -> Iterator[str]:
    if schema.get("x-elided"):
        yield path
        return
    if isinstance(instance, dict):
        for key, value in instance.items():
            sub = schema.get("properties", {}).get(key)
            if sub is None and isinstance(schema.get("additionalProperties"), dict):
                sub = schema["additionalProperties"]
            if sub is not None:  # an unknown field is the validator's business
                yield from _uses_elided(value, sub, f"{path}.{key}")
    elif isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            yield from _uses_elided(item, schema["items"], f"{path}[{i}]")


def test_crd_excerpt_covers_all_that_rayjob_yaml_uses() -> None:
    assert list(_uses_elided(the_rayjob(), crd_schema())) == []


def _head(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


@pytest.mark.parametrize(
    ("break_it", "expected"),
    [
        pytest.param(lambda j: _rename(j["spec"], "entrypoint", "entrypont"), "'entrypont' was unexpected", id="key"),
        pytest.param(
            lambda j: _rename(_head(j)["template"]["spec"]["containers"][0], "image", "imgae"),
            "'imgae' was unexpected",
            id="container-key",
        ),
        pytest.param(
            lambda j: _head(j)["rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'", id="int"
        ),
        pytest.param(
            lambda j: j["spec"]["rayClusterSpec"]["authOptions"].update(mode="tokens"),
            "'tokens' is not one of",
            id="enum",
        ),
        pytest.param(
            lambda j: _worker(j)["template"]["spec"]["containers"][0]["resources"]["limits"].update(memory="4 GiB"),
            "does not match",
            id="quantity",
        ),
        pytest.param(
            lambda j: _head(j)["template"]["spec"]["containers"][0]["ports"].append({"containerPort": 8265}),
            "duplicate entry",
            id="duplicate-port",
        ),
        pytest.param(lambda j: _worker(j).pop("maxReplicas"), "'maxReplicas' is a required property", id="required"),
    ],
)
def test_crd_schema_rejects_a_broken_rayjob(break_it: Callable[[dict[str, Any]], None], expected: str) -> None:
    broken = the_rayjob()
    break_it(broken)
    assert any(expected in error for error in crd_errors(broken)), crd_errors(broken)


# ---------------------------------------------------------------------------------------------------------------
# rayjob.yaml: what the schema cannot check

SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}  # KubeRay v1.6's JobSubmissionMode


def kuberay_spec_problems(job: dict[str, Any]) -> list[str]:
    """The checks of KubeRay's ValidateRayJobMetadata / ValidateRayJobSpec / ValidateRayClusterSpec
    (ray-operator/controllers/ray/utils/validation.go) that apply to a RayJob creating its own cluster without
    autoscaling: the operator marks a RayJob failing one of them ValidationFailed and runs nothing. Two more of this
    port's own: a submissionMode of rayjob_types.go's JobSubmissionMode (the CRD has no enum for it), and
    minReplicas <= replicas <= maxReplicas."""
    problems = []
    spec, name = job["spec"], job["metadata"]["name"]
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        problems.append(f"name {name!r} is not a DNS-1035 label")
    mode = spec.get("submissionMode", "K8sJobMode")
    if mode not in SUBMISSION_MODES:
        problems.append(f"submissionMode {mode!r}")
    shutdown, ttl = spec.get("shutdownAfterJobFinishes", False), spec.get("ttlSecondsAfterFinished", 0)
    if spec.get("suspend") and not shutdown:
        problems.append("suspend needs shutdownAfterJobFinishes")
    if ttl < 0 or (ttl > 0 and not shutdown):
        problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes and must be >= 0")
    if spec.get("activeDeadlineSeconds", 1) <= 0 or spec.get("backoffLimit", 0) < 0:
        problems.append("activeDeadlineSeconds must be > 0, backoffLimit >= 0")
    cluster = spec.get("rayClusterSpec")
    if cluster is None:
        return [*problems, "no rayClusterSpec (and no clusterSelector)"]
    if mode == "SidecarMode":
        problems += [
            f"SidecarMode does not support {k}" for k in ("submitterPodTemplate", "submitterConfig") if k in spec
        ]
        if cluster["headGroupSpec"]["template"]["spec"].get("restartPolicy", "Never") != "Never":
            problems.append("SidecarMode needs the head Pod's restartPolicy Never or unset")
    if not cluster["headGroupSpec"]["template"]["spec"].get("containers"):
        problems.append("the head group has no container")
    autoscaling = cluster.get("enableInTreeAutoscaling", False)
    for group in cluster.get("workerGroupSpecs", []):
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not group["template"]["spec"].get("containers"):
            problems.append(f"worker group {group['groupName']} has no container")
        if not autoscaling and (low is None or high is None):
            problems.append(f"worker group {group['groupName']} needs minReplicas and maxReplicas")
        elif low is not None and high is not None and not 0 <= low <= group.get("replicas", low) <= high:
            problems.append(f"worker group {group['groupName']}: not 0 <= minReplicas <= replicas <= maxReplicas")
    token = cluster.get("authOptions", {"mode": "disabled"}).get("mode", "token") == "token"
    if token and Version(cluster.get("rayVersion", "0")) < Version("2.52.0"):
        problems.append("authOptions.mode token needs rayVersion >= 2.52.0")
    return problems


def test_rayjob_passes_kuberays_spec_checks() -> None:
    assert kuberay_spec_problems(the_rayjob()) == []


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda j: _head(j)["template"]["spec"].update(restartPolicy="Always"), id="sidecar-restart"),
        pytest.param(lambda j: j["spec"]["rayClusterSpec"].update(rayVersion="2.50.0"), id="token-needs-ray-2.52"),
        pytest.param(lambda j: _worker(j).update(minReplicas=3), id="min-above-max"),
        pytest.param(lambda j: j["spec"].update(submissionMode="Sidecar"), id="unknown-mode"),
    ],
)
def test_kuberay_spec_checks_reject_a_broken_rayjob(break_it: Callable[[dict[str, Any]], None]) -> None:
    broken = the_rayjob()
    break_it(broken)
    assert kuberay_spec_problems(broken) != []


def _cpus(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_rayjob_entrypoint_is_a_dccl_sim_run_that_fits_the_cluster() -> None:
    from dccl_sim.cli import parser
    from dccl_sim.config import load_config

    job = the_rayjob()
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] in PYPROJECT["project"]["scripts"]  # the console script the image's `pip install .` provides
    args = parser().parse_args(argv[1:])
    assert args.command == "run" and args.resume is None and args.config is None
    config = load_config(None, args.set)  # every --set names a real setting with a valid value
    # the entrypoint runs where Ray's job supervisor starts it (not necessarily the image's WORKDIR), and the job
    # has no runtime env of its own (the code is in the image): every path it names is absolute
    assert "runtimeEnvYAML" not in spec
    assert args.out.is_absolute() and config.data.cache_dir.is_absolute()
    assert "://" in config.data.source or Path(config.data.source).is_absolute()
    # the driver runs on the head (SidecarMode: the submitter too): --out is on the head's volume
    (head_container,) = _head(job)["template"]["spec"]["containers"]
    assert any(args.out.is_relative_to(m["mountPath"]) for m in head_container.get("volumeMounts", []))
    # the device packs: no CPU on the head, and each pack fits on one worker (cluster/GUIDE.md, "Sizing the actors")
    assert _head(job)["rayStartParams"]["num-cpus"] == "0"
    per_worker = []
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        cpus = group["rayStartParams"].get("num-cpus", container["resources"]["limits"]["cpu"])
        per_worker += [_cpus(cpus)] * group["replicas"]
    assert config.runtime.num_actors is not None
    assert sum(per_worker) / config.runtime.num_actors <= min(per_worker)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_image_and_ray_up_install_the_same_dccl_sim() -> None:
    steps = dockerfile_instructions()
    (base,) = [arg for op, arg in steps if op == "FROM"]
    python = re.fullmatch(r"python:(\d+\.\d+)(-.*)?", base)
    assert python and SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"{python.group(1)}.0")
    copied = {src for op, arg in steps if op == "COPY" for src in shlex.split(arg)[:-1]}
    mounted = {local for local in ray_up_config()["file_mounts"].values() if not local.startswith("~")}
    assert copied == mounted == {"pyproject.toml", "README.md", "dccl_sim"}
    runs = [arg for op, arg in steps if op == "RUN"]
    (torch_step,) = [r for r in runs if '"torch==' in r]
    (package_step,) = [r for r in runs if re.search(r"pip install \.( |$)", r)]
    assert runs.index(torch_step) < runs.index(package_step) and f"--index-url {CPU_TORCH_INDEX}" in torch_step
    torch_pin = _pin(re.search(r'"(torch==[^"]+)"', torch_step).group(1))
    assert _project_requirement("torch").specifier.contains(torch_pin)
    ray_pins = {_pin(r) for r in re.findall(r'"(ray\[default\]==[^"]+)"', " ".join(runs))}
    ray_up_pins = {
        _pin(str(r))
        for install in pip_installs(ray_up_config()["setup_commands"], venv_of(ray_up_config()))
        for r in install.requirements
        if r.name == "ray"
    }
    versions = {_pin(str(_project_requirement("ray"))), Version(the_rayjob()["spec"]["rayClusterSpec"]["rayVersion"])}
    assert len(ray_pins | ray_up_pins | versions) == 1, (ray_pins, ray_up_pins, versions)


def test_image_provides_what_rayjob_yaml_runs(tmp_path: Path) -> None:
    """A wheel built from exactly what the Dockerfile copies has the `dccl-sim` command and every module."""
    steps = dockerfile_instructions()
    context = tmp_path / "context"
    for op, arg in steps:
        if op == "COPY":
            *sources, _ = shlex.split(arg)
            for source in sources:
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, context / source, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    context.mkdir(exist_ok=True)
                    shutil.copy2(REPO / source, context / source)
    pip = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index", "--no-build-isolation"]
    done = subprocess.run(
        [*pip, "--wheel-dir", tmp_path / "wheels", context], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "wheels").glob("dccl_sim-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    assert f"dccl-sim = {PYPROJECT['project']['scripts']['dccl-sim']}" in scripts
    modules = {str(p.relative_to(REPO)) for p in REPO.glob("dccl_sim/**/*.py") if "__pycache__" not in p.parts}
    assert modules <= names, sorted(modules - names)

    # the image runs as the numeric non-root user the pods require, and owns the run volume through fsGroup
    (user,) = [arg for op, arg in steps if op == "USER"]
    job = the_rayjob()
    head_pod = _head(job)["template"]["spec"]
    assert user.isdigit() and int(user) != 0
    assert head_pod["securityContext"]["runAsNonRoot"] and head_pod["securityContext"]["fsGroup"] == int(user)
    assert ("ENV", "RAY_AUTH_MODE=token") in steps and job["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    # every Ray container runs that image, tagged with the package's version
    images = {c["image"] for g in [_head(job), _worker(job)] for c in g["template"]["spec"]["containers"]}
    (image,) = images
    assert image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"]


def test_rayjob_companion_objects_match_it() -> None:
    documents = {d["kind"]: d for d in rayjob_documents()}
    job = documents["RayJob"]
    volumes = {v["name"]: v for v in _head(job)["template"]["spec"]["volumes"]}
    assert (
        volumes["runs"]["persistentVolumeClaim"]["claimName"] == documents["PersistentVolumeClaim"]["metadata"]["name"]
    )
    policy = documents["NetworkPolicy"]["spec"]
    selected = policy["podSelector"]["matchLabels"]
    for group in (_head(job), _worker(job)):
        assert selected.items() <= group["template"]["metadata"]["labels"].items()
    assert policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == selected
    dashboard = [
        p["containerPort"] for p in _head(job)["template"]["spec"]["containers"][0]["ports"] if p["name"] == "dashboard"
    ]
    assert [p["port"] for p in policy["ingress"][1]["ports"]] == dashboard
