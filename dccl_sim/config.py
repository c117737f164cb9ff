"""Every setting of a simulation, as one validated pydantic model.

`SimConfig` is loaded from TOML or YAML (`load_config`), patched with dotted command-line overrides
(`--set device.local_epochs=2`), and saved resolved with every run. Unknown keys and impossible values
are rejected with a `ConfigError` whose message names the offending key.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dccl_sim import plugins

Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]


class ConfigError(ValueError):
    """A configuration that cannot run; the message says which key and why."""


class Section(BaseModel):
    """A settings section: unknown keys are errors, values are immutable once validated. A plug-in's `Settings`
    subclass this too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SyntheticConfig(Section):
    """The long-tail generator (docs/design.md §2). `personal_deviation` decides how much personalization can win."""

    num_items: PositiveInt = 2000
    num_categories: PositiveInt = 20
    num_clusters: PositiveInt = 16
    latent_dim: PositiveInt = 16
    zipf_exponent: NonNegativeFloat = 1.0
    mean_interactions: Annotated[float, Field(ge=3.0)] = 20.0
    activity_sigma: NonNegativeFloat = 1.0
    personal_deviation: NonNegativeFloat = 1.0
    drift: NonNegativeFloat = 0.3
    candidates_per_choice: Annotated[int, Field(ge=1)] = 16


class DataConfig(Section):
    """Where samples come from and how they are cut (docs/design.md §2 and §4)."""

    # a built-in source (ml100k, synthetic, movielens, recbole, table), a user's `module:function`, a dataset directory
    # (holding meta.json) or URI, or (the older form of `movielens`) a path to MovieLens or RecBole files
    source: str = "ml100k"
    path: Path | None = None  # the file or folder read by a source that reads files (movielens, recbole, table)
    num_devices: PositiveInt | None = None
    cache_dir: Path = Path("~/.cache/dccl-sim")
    history_len: PositiveInt = 20
    train_negatives: Annotated[int, Field(ge=0)] = 2
    eval_negatives: PositiveInt = 99
    # False: evaluation negatives are sampled once and stored (99 per positive: most of a dataset's rows);
    # True: they are drawn when a device's data is loaded, from (seed, device, position, j) alone, so any process
    # loading a device draws the same ones; for 10^5+ devices, where storing them would not fit. auto: True above
    # dccl_sim.sizing.ON_LOAD_ABOVE_DEVICES requested devices
    eval_negatives_on_load: bool | Literal["auto"] = "auto"
    test_frac: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.2
    valid_frac: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    pretrain_frac: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5
    windows: PositiveInt = 5
    min_interactions: Annotated[int, Field(ge=3)] = 3
    shard_size: PositiveInt = 1024
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        # Not the default: it is built in, and checking it would import every source module, some of which import
        # this one, while this module is still loading (SimConfig validates its default DataConfig).
        if value != cls.model_fields["source"].default:
            from dccl_sim.data.sources.base import resolve_source

            resolve_source(value)  # raises, saying why, unless the name, reference or path is usable
        return value

    @field_validator("path")
    @classmethod
    def _path_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.expanduser().exists():
            raise ValueError("no such file or folder")
        return value

    @model_validator(mode="after")
    def _path_is_read(self) -> DataConfig:
        if self.path is None and self.source == type(self).model_fields["source"].default:
            return self  # the default source reads no files (not resolved here: see _known_source)
        from dccl_sim.data.sources.base import check_path, resolve_source

        source, legacy_path = resolve_source(self.source)
        if source is not None and legacy_path is None:
            check_path(source, self.path)
        elif self.path is not None:  # a dataset directory or the files themselves are already named
            raise ValueError(
                f"data.path is set but data.source {self.source!r} names the data itself; remove data.path"
            )
        return self

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> DataConfig:
        if self.test_frac + self.valid_frac >= 0.9:
            total = self.test_frac + self.valid_frac
            raise ValueError(f"test_frac + valid_frac = {total:g} leaves almost no training data; keep it below 0.9")
        return self


class ModelConfig(Section):
    """The cloud model (docs/design.md §3): `name` picks the recommender family (`din`, `sasrec`, or a user's
    `module:Class`); the sizes below are shared by every family (its own settings live in its own section)."""

    # the default is a built-in: resolving it here would import torch and every model module whenever
    # dccl_sim.config is imported, so only a name the user gives is resolved
    name: str = Field("din", validate_default=False)
    embed_dim: PositiveInt = 32
    profile_dim: PositiveInt = 8
    attention_hidden: tuple[PositiveInt, ...] = (36,)
    mlp_hidden: tuple[PositiveInt, ...] = (200, 80)

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        plugins.resolve(plugins.MODEL, value)  # a PluginError (a ValueError) says which model and why
        return value

    @field_validator("mlp_hidden")
    @classmethod
    def _has_hidden_layer(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("the top MLP needs at least one hidden layer (patches attach to hidden layers)")
        return value


class PatchConfig(Section):
    """MetaPatch sizes: k floats per device, bottleneck rank r per hidden layer. Bootstrapping G (docs/design.md §4)
    learns Θ, {A_l} and a per-user θ table (drawn N(0, bootstrap_init_std²), L2 `bootstrap_l2`) with Adam at
    `bootstrap_lr`; `lr` is the patch-space update's (eq. 7) learning rate."""

    k: PositiveInt = 16
    rank: PositiveInt = 16
    bootstrap_epochs: Annotated[int, Field(ge=0)] = 5
    bootstrap_lr: PositiveFloat = 1e-2
    bootstrap_init_std: NonNegativeFloat = 0.01
    bootstrap_l2: NonNegativeFloat = 1e-2
    # "adam": one Adam over Θ, {A_l} and the θ table, every row's moments decaying at every step (work ∝ users per
    # step); "lazy": a table row moves only when its user is in the minibatch, with its own step count (PackedAdam,
    # work ∝ minibatch): for 10^5+ devices, where a step over the whole table costs ~0.1 s. auto: lazy above
    # dccl_sim.sizing.LAZY_TABLE_ABOVE_DEVICES devices
    bootstrap_table: Literal["adam", "lazy", "auto"] = "auto"
    lr: PositiveFloat = 1e-3


class DeviceConfig(Section):
    """The device step (eq. 3) and its gate; `model_lr` is for strategies that train full models (fedavg,
    local_finetune)."""

    local_epochs: PositiveInt = 2
    batch_size: PositiveInt = 32
    lr: PositiveFloat = 1e-2
    model_lr: PositiveFloat = 1e-3
    l2: NonNegativeFloat = 1e-4
    gate: bool = True
    gate_frac: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.3


class CloudConfig(Section):
    """Cloud training: pretraining, per-round fine-tuning / MoMoDistill (eq. 5), the patch-space update (eq. 7).

    MoMoDistill's weight in round t is `beta * beta_decay**t` (annealing when below 1). `teacher_weighting` says
    which teachers count: `uniform` (eq. 5 as written), `patched` (only devices that uploaded a non-zero
    meta-patch: one that fell back to θ̂ = 0 is the stale broadcast model itself) or `confidence` (each sample
    weighted by how far the device's patch moved its prediction, |p_m(x) − σ(f(x; W_t))|, normalized to mean 1
    over the patched samples). The patch-space update (eq. 7) fits the proxy σ(f(x; W_{t+1}, G, θ̃_m)) either to
    the teachers themselves (`patch_target = teacher`, eq. 7 as written) or to `residual` targets
    f(x; W_{t+1}) + [f(x; W_t, G_t, θ̂_m) − f(x; W_t)]: the devices' personalization carried onto the refreshed
    cloud model, instead of pulling W_{t+1}'s predictions back to the stale W_t's."""

    pretrain_epochs: Annotated[int, Field(ge=0)] = 6
    # at most this many samples through pretraining, and as many through bootstrapping G (None: no cap): binds only
    # at scale (ML-100K's pretraining is ~6 × 10^5, 10^6 synthetic devices' ~10^8), where epochs would take hours
    pretrain_budget: PositiveInt | None = 20_000_000
    finetune_epochs: Annotated[int, Field(ge=0)] = 3
    batch_size: PositiveInt = 1024
    lr: PositiveFloat = 1e-3
    beta: NonNegativeFloat = 0.3
    beta_decay: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    temperature: PositiveFloat = 1.0
    teacher_weighting: Literal["uniform", "patched", "confidence"] = "confidence"
    patch_epochs: Annotated[int, Field(ge=0)] = 1
    patch_target: Literal["teacher", "residual"] = "teacher"
    # processes the cloud trains in, data-parallel (docs/scale-out.md): Ray actors joined in a torch.distributed
    # group, each reserving a CPU; `auto`: one per Ray node. The same minibatches, so the cloud model equals one
    # worker's up to float sums in another order (below 1e-5). More than one needs runtime.backend = ray
    workers: PositiveInt | Literal["auto"] = 1


class RuntimeConfig(Section):
    """Where the round loop runs (docs/design.md §5)."""

    backend: Literal["ray", "local"] = "ray"
    address: str | None = None
    devices_per_actor: PositiveInt | Literal["auto"] = "auto"
    num_actors: PositiveInt | None = None
    participation: Fraction = 1.0
    deadline_s: PositiveFloat | None = None
    torch_threads: PositiveInt | None = None
    # a pack trains its devices in chunks, one after another: at most `chunk_devices` devices and, past a chunk's
    # first device, at most `chunk_samples` of their samples (all splits). Memory stays bounded, results do not
    # depend on it, and small chunks keep each step's tensors within memory the allocator reuses. On ML-100K
    # (~2,200 samples a device with its evaluation negatives) one chunk per pack took round 0's device phase 128 s
    # and 8.3 GB, these defaults 26 s and 2.8 GB
    chunk_devices: PositiveInt = 1024
    chunk_samples: PositiveInt = 65536


class LatencyConfig(Section):
    """The deployment latency model (docs/design.md §6): per-device profiles drawn log-normally, seeded. Devices whose
    modelled time exceeds `deadline_s` are stragglers of the modelled deployment (deterministic), unlike
    `runtime.deadline_s`, which bounds the simulator's own wall-clock gather."""

    compute_flops_median: PositiveFloat = 2e10
    compute_flops_sigma: NonNegativeFloat = 0.5
    down_bps_median: PositiveFloat = 2.5e6
    up_bps_median: PositiveFloat = 1e6
    bandwidth_sigma: NonNegativeFloat = 0.7
    availability: Fraction = 1.0
    deadline_s: PositiveFloat | None = None
    cloud_flops: PositiveFloat = 1e12


class MetricsConfig(Section):
    """Which split rounds are evaluated on, the ranking cut-off and the user-activity buckets (bucket 0 is the
    long tail). Tune on `valid`; report `test`."""

    split: Literal["valid", "test"] = "test"
    # ranking cut-offs: every K gives hr@K and ndcg@K columns (and every run reports mrr)
    ks: tuple[PositiveInt, ...] = (5, 10, 20)
    # the cut-off of the progress line and of the columns named before `ks` existed (`*_hr10`, `*_ndcg10`, kept as
    # aliases for one release: they hold HR and NDCG at this k, whatever it is); must be one of `ks`
    k: PositiveInt = 10
    # how HR/NDCG/MRR rank a test positive: `sampled` among its stored sampled negatives (cheap; the DIN / MetaPatch
    # papers' convention), `full` among every item the user has not interacted with (RecBole's default; costs
    # several times the sampled evaluation, docs/evaluation.md), `both` reports the two side by side
    ranking: Literal["sampled", "full", "both"] = "sampled"
    # evaluate a seeded sample of this many devices, the same every round (None: all). At 10^5+ devices scoring
    # every device's 99 negatives per positive three times a round would dominate the round. auto: all up to
    # dccl_sim.sizing.EVAL_SAMPLE_DEVICES devices, else a sample of that many
    eval_devices: PositiveInt | Literal["auto"] | None = "auto"
    bucket_quantiles: tuple[Annotated[float, Field(gt=0.0, lt=1.0)], ...] = (0.25, 0.5, 0.75)

    @field_validator("bucket_quantiles")
    @classmethod
    def _increasing(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if list(value) != sorted(set(value)):
            raise ValueError("bucket quantiles must be strictly increasing")
        return value

    @field_validator("ks")
    @classmethod
    def _distinct_cutoffs(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or list(value) != sorted(set(value)):
            raise ValueError("ranking cut-offs must be a non-empty, strictly increasing list, e.g. [5, 10, 20]")
        return value

    @model_validator(mode="after")
    def _k_is_a_cutoff(self) -> MetricsConfig:
        if self.k not in self.ks:
            raise ValueError(f"metrics.k = {self.k} must be one of metrics.ks = {list(self.ks)}")
        return self


class OutputConfig(Section):
    # the run directory; None: a new folder runs/<YYYYmmdd-HHMMSS>-<strategy> each run, runs/latest linking to it
    out_dir: Path | None = None
    # replace a run already in out_dir (its folder is cleared first); without it such a run is refused
    overwrite: bool = False
    checkpoint_every: PositiveInt = 1
    progress: bool = True
    # show Ray's own log lines (its start-up messages, the token-authentication notice); without it only its errors
    verbose: bool = False
    # mirror the run into an experiment tracker (README, "Tracking"): the config as parameters, every round's record
    # as metrics (step = round); mlflow also stores the run directory's records as artifacts. Each needs its extra:
    # pip install 'dccl-sim[mlflow]' or 'dccl-sim[tensorboard]'
    tracker: Literal["none", "mlflow", "tensorboard"] = "none"
    # the MLflow experiment the run goes into (the MLflow run is named after the run directory)
    tracker_experiment: Annotated[str, Field(min_length=1)] = "dccl-sim"


class SimConfig(Section):
    """One simulation: every setting, with defaults that run out of the box."""

    # plug-ins (strategy, model, data source) may bring their own section, named by their `settings_key`; those
    # extra top-level keys are checked in `_plugin_sections`
    model_config = ConfigDict(extra="allow", frozen=True, validate_default=True)

    seed: int = 0
    strategy: str = "dccl"
    rounds: PositiveInt = 3
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    patch: PatchConfig = PatchConfig()
    device: DeviceConfig = DeviceConfig()
    cloud: CloudConfig = CloudConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    latency: LatencyConfig = LatencyConfig()
    metrics: MetricsConfig = MetricsConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        plugins.resolve(plugins.STRATEGY, value)
        return value

    def _selected_plugins(self) -> list[Any]:
        """The plug-ins this config runs with, whose settings sections it carries."""
        from dccl_sim.data.sources.base import resolve_source

        source, _ = resolve_source(self.data.source)  # None: data.source names a built dataset
        selected = [plugins.resolve(plugins.STRATEGY, self.strategy), plugins.resolve(plugins.MODEL, self.model.name)]
        return selected + ([source] if source is not None else [])

    @model_validator(mode="after")
    def _plugin_sections(self) -> SimConfig:
        """Each selected plug-in's settings section, validated by its `Settings` (defaults where absent). A section
        of a built-in that is not selected (e.g. `coda` in a dccl run) is validated and dropped, so configs that
        set it for a whole comparison keep working; any other extra key is unknown."""
        extra = self.__pydantic_extra__ if self.__pydantic_extra__ is not None else {}
        selected = {plugins.settings_key(p): p for p in self._selected_plugins() if plugins.settings_key(p)}
        other = {plugins.settings_key(p): p for p in plugins.builtin_with_settings()} | selected
        problems = []
        for key in list(extra):
            if key not in other:
                problems.append(f"{key}: unknown key")
                continue
            try:
                value = plugins.settings_model(other[key]).model_validate(extra[key])
            except ValidationError as error:
                problems += _lines(error, prefix=f"{key}.")
                continue
            if key in selected:
                extra[key] = value
            else:
                del extra[key]
        if problems:
            raise ValueError("\n  ".join(problems))
        for key, plugin in selected.items():
            if key in type(self).model_fields:
                raise ValueError(f"{plugin.name}: its settings_key {key!r} is a built-in section; choose another")
            extra.setdefault(key, plugins.settings_model(plugin)())
        return self

    def section(self, plugin: Any) -> Any:
        """The validated settings of a selected plug-in (None if it has none)."""
        key = plugins.settings_key(plugin)
        return None if key is None else (self.__pydantic_extra__ or {})[key]

    @model_validator(mode="after")
    def _workers_need_ray(self) -> SimConfig:
        if self.cloud.workers != 1 and self.runtime.backend != "ray":
            raise ValueError(
                f"cloud.workers = {self.cloud.workers!r} needs runtime.backend = ray (the local backend runs the "
                "cloud in this process); set cloud.workers = 1 or use ray"
            )
        return self

    @model_validator(mode="after")
    def _a_window_per_round(self) -> SimConfig:
        if self.rounds > self.data.windows:
            raise ValueError(
                f"rounds ({self.rounds}) exceeds data.windows ({self.data.windows}): each round learns a new time "
                "window; raise data.windows"
            )
        return self

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


_UNION_MEMBER = re.compile(r"^(constrained-\w+|literal\[.*\]|bool|int|float|str|none|is-instance\[.*\])$")


def _lines(error: ValidationError, prefix: str = "") -> list[str]:
    """One line per key. A value a union rejects (e.g. `PositiveInt | Literal["auto"]`) gets one line saying every
    alternative, "greater than 0 or 'auto'", not a line per member named by pydantic's internal tags."""
    lines: list[str] = []
    merged: dict[str, int] = {}  # key -> its line's index, for union members
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        member = bool(loc) and _UNION_MEMBER.match(loc[-1]) is not None
        key = prefix + ".".join(loc[:-1] if member else loc)
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        got = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
        if member and key in merged:
            lines[merged[key]] = (
                lines[merged[key]].removesuffix(got) + " or " + message.removeprefix("Input should be ") + got
            )
            continue
        if member:
            merged[key] = len(lines)
        # a model-level check (e.g. plug-in sections) already names its keys
        lines.append(f"{key}: {message}{got}" if key.rstrip(".") else message + got)
    return lines


def _describe(error: ValidationError) -> str:
    return "invalid configuration:\n  " + "\n  ".join(_lines(error))


def build_config(values: dict[str, Any]) -> SimConfig:
    """Validate a nested dict into a SimConfig, turning pydantic's report into a ConfigError."""
    try:
        return SimConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML, YAML or JSON config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            values = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: use .toml, .yaml/.yml or .json")
    except (tomllib.TOMLDecodeError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise ConfigError(f"config file {path} does not parse: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    return values


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides; values parse as YAML scalars or lists (`2`, `1e-3`, `true`, `[1,2]`)."""
    merged = json.loads(json.dumps(values, default=str))
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {override!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = merged
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> SimConfig:
    """The config a command runs with: defaults, then the file (if any), then the overrides."""
    values = read_config_file(path) if path is not None else {}
    return build_config(apply_overrides(values, overrides or []))
