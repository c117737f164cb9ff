"""What a data source is: a function `fn(request: SourceRequest) -> RawDataset` registered with `@data_source`.

The built-ins live one per file beside this one and are found by name (`dccl_sim.plugins.SOURCE`); a user's source is
`data.source = "my_module:my_function"`. This module also says what `data.source` and `data.path` name
(`resolve_source`) and turns a source's settings into its validated `Settings` object (`source_settings`); the
decorator lives here, not in a source's file, so that it is never mistaken for a source.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from dccl_sim import plugins
from dccl_sim.config import ConfigError
from dccl_sim.data.raw import RawDataset
from dccl_sim.progress import Progress

if TYPE_CHECKING:
    from dccl_sim.config import DataConfig, Section


@dataclass(frozen=True)
class SourceRequest:
    """Everything a source may use to produce its raw dataset."""

    config: DataConfig  # the whole data section (e.g. `config.synthetic` for the generator)
    seed: int  # the run's seed: a source that samples must derive its randomness from it alone
    num_devices: int | None  # devices asked for (`data.num_devices` unless the caller overrides it); None: all
    path: Path | None  # the file or folder to read (`data.path`, expanded), for sources that read files
    cache_dir: Path  # `data.cache_dir`, expanded: where a source may keep what it downloads
    settings: BaseModel | None = None  # the source's own validated `Settings`, or None when it declares none
    # a long source may say how far it has got: on_progress("reading my logs: file", done, total); None: nobody asks
    on_progress: Progress | None = None

    def require_path(self) -> Path:
        """`path`, for a source that cannot work without one."""
        if self.path is None:
            raise ConfigError("this data source reads files: set data.path to its file or folder")
        return self.path


class DataSource(Protocol):
    """A function registered with `@data_source`."""

    name: str
    is_data_source: bool
    reads_path: bool

    def __call__(self, request: SourceRequest) -> RawDataset: ...


SettingsInput = BaseModel | Mapping[str, Any] | None
"""A source's settings as a caller gives them: its `Settings` object, a mapping to validate into one, or None (its
defaults)."""

F = TypeVar("F", bound=Callable[[SourceRequest], RawDataset])


def data_source(
    name: str,
    *,
    reads_path: bool = False,
    settings: type[Section] | None = None,
    settings_key: str | None = None,
) -> Callable[[F], F]:
    """Register `fn(request) -> RawDataset` as the data source `name`.

    `reads_path`: the source reads the file or folder `data.path`, which the config then requires (and checks that it
    exists); a source that does not read files rejects `data.path`. `settings`: a pydantic model (a `Section`) of the
    source's own settings, read from the config section `settings_key` (default: `name`); the source finds the
    validated object in `request.settings`.
    """
    if not name or ":" in name or "/" in name:
        raise ValueError(f"data source name {name!r}: use a plain name (no ':' or '/'), as users type it")

    def register(fn: F) -> F:
        fn.name = name  # type: ignore[attr-defined]
        fn.is_data_source = True  # type: ignore[attr-defined]
        fn.reads_path = reads_path  # type: ignore[attr-defined]
        if settings is not None:
            fn.Settings = settings  # type: ignore[attr-defined]
            fn.settings_key = settings_key  # type: ignore[attr-defined]
        return fn

    return register


def is_dataset_dir(source: str) -> bool:
    """`data.source` names a built dataset: a folder holding `meta.json`, or a pyarrow filesystem URI."""
    return "://" in source or (Path(source).expanduser() / "meta.json").is_file()


def resolve_source(source: str) -> tuple[DataSource | None, Path | None]:
    """What `data.source` names: (None, None) for a built dataset; else the source function and, for a bare path
    to MovieLens or RecBole files (the form before `data.path` existed), that path, read by the `movielens` source.

    Built-in names win over files of the same name. Raises a ValueError (`plugins.PluginError` for names and
    `module:function` references, `ConfigError` for paths) saying what is wrong and what would be right.
    """
    if is_dataset_dir(source):
        return None, None
    known = plugins.builtins(plugins.SOURCE)
    if source in known:
        return known[source], None
    path = Path(source).expanduser()
    if path.exists():
        from dccl_sim.data.movielens import ratings_files

        if path.is_dir() and not ratings_files(path):
            raise ConfigError(
                f"{source!r} is neither a dataset directory (no meta.json; build one with `dccl-sim data`) nor a "
                "folder of MovieLens files (u.data, ratings.dat, ratings.csv or a RecBole <name>.inter)"
            )
        return known["movielens"], path
    if plugins.is_reference(source):
        return plugins.resolve(plugins.SOURCE, source), None
    if "/" in source or "\\" in source or source.startswith((".", "~")):  # meant as a path
        raise ConfigError(
            f"no such dataset directory or MovieLens file: {source!r} "
            f"(or name a data source: {', '.join(sorted(known))}, or module:function)"
        )
    try:
        return plugins.resolve(plugins.SOURCE, source), None  # not built in: raises, listing the built-ins
    except plugins.PluginError as error:
        raise plugins.PluginError(f"{error} (nor is it a file or folder here)") from None


def check_path(source: DataSource, path: Path | None) -> None:
    """`data.path` is given exactly when the source reads files (its existence is checked with the field)."""
    reads_path = getattr(source, "reads_path", False)  # a hand-made plug-in may lack it: then it reads no files
    if reads_path and path is None:
        raise ConfigError(f"data source {source.name!r} reads files: set data.path to its file or folder")
    if not reads_path and path is not None:
        raise ConfigError(f"data.path is set but data source {source.name!r} reads no files; remove data.path")


def source_settings(source: DataSource, settings: SettingsInput) -> BaseModel | None:
    """The source's validated settings: `settings` itself when it is the source's `Settings`, else `Settings`
    validated from the mapping given (None: its defaults). A source without `Settings` takes none."""
    model = plugins.settings_model(source)
    if model is None:
        if settings is not None:
            raise ConfigError(f"data source {source.name!r} has no settings, got {settings!r}")
        return None
    if isinstance(settings, model):
        return settings
    key = plugins.settings_key(source)
    if isinstance(settings, BaseModel):
        raise ConfigError(
            f"[{key}]: data source {source.name!r} expects {model.__name__}, got {type(settings).__name__}"
        )
    try:
        return model.model_validate(dict(settings or {}))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"[{key}] settings of data source {source.name!r} are invalid: {problems}") from None


def request_for(
    config: DataConfig,
    seed: int,
    num_devices: int | None = None,
    settings: SettingsInput = None,
    on_progress: Progress | None = None,
) -> tuple[DataSource, SourceRequest]:
    """The source `config` names and the request to call it with; `num_devices` overrides `config.num_devices`."""
    source, legacy_path = resolve_source(config.source)
    if source is None:
        raise ConfigError(f"data.source {config.source!r} is a built dataset, not a source of raw interactions")
    path = legacy_path or (Path(config.path).expanduser() if config.path is not None else None)
    request = SourceRequest(
        config=config,
        seed=seed,
        num_devices=num_devices if num_devices is not None else config.num_devices,
        path=path,
        cache_dir=Path(config.cache_dir).expanduser(),
        settings=source_settings(source, settings),
        on_progress=on_progress,
    )
    return source, request
