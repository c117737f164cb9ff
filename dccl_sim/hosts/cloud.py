"""The cloud host: W, G, ψ, the cloud's view of the data, pretraining, evaluation and checkpoints; the strategy's
cloud step and broadcast payload run on it."""

from __future__ import annotations

import datetime
import functools
import hashlib
import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dccl_sim import metrics, sizing
from dccl_sim.algorithms.cloud_steps import bootstrap_patch
from dccl_sim.algorithms.data_parallel import minibatch_loop, world
from dccl_sim.algorithms.full_ranking import FullRanker
from dccl_sim.algorithms.protocol import Broadcast, PackResult, load_numpy_state, state_to_numpy
from dccl_sim.config import SimConfig
from dccl_sim.context import RoundContext
from dccl_sim.data.device_data import PRETRAIN_WINDOW, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID
from dccl_sim.data.store import read_meta
from dccl_sim.hosts.loading import load_devices, model_spec
from dccl_sim.models.factory import build_models
from dccl_sim.models.training import fit, import_optimizer_modules, predict
from dccl_sim.plugins import STRATEGY, resolve
from dccl_sim.progress import Progress
from dccl_sim.seeding import run_keys

_FLOAT_BYTES = 4
# how long a cloud worker waits for the others (joining, each all-reduce): a dead worker stops the round this soon
_GROUP_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class ModelCost:
    """What the deployment latency model needs to know about the models: sizes and forward FLOPs per sample."""

    model_floats: int  # W
    patch_floats: int  # G
    k: int  # floats of a meta-patch
    features: float  # computing x from a sample
    head: float  # the top MLP on x
    patch: float  # MetaPatch's patches on the top MLP
    first_hidden: float  # the top MLP's first layer alone
    input_dim: int  # width of x
    behaviour_dim: int  # the leading columns of x that describe the sample, not the user's profile

    @property
    def model_bytes(self) -> int:
        return self.model_floats * _FLOAT_BYTES

    @property
    def patch_bytes(self) -> int:
        return self.patch_floats * _FLOAT_BYTES

    @property
    def meta_patch_bytes(self) -> int:
        return self.k * _FLOAT_BYTES


@dataclass(frozen=True)
class DeviceInfo:
    """Per-device facts the driver reports by."""

    bucket: np.ndarray  # activity bucket of every device (0 = the long tail)
    num_buckets: int


_NOT_HASHED = {"builtins", "torch.nn.modules.module", "abc", "typing"}


def _source_digest(*objects: object) -> str:
    """A digest of the source files that define `objects` and, for classes, their bases outside torch (a plug-in
    model's own file included)."""
    defined = [
        c for o in objects for c in (o.__mro__ if isinstance(o, type) else (o,)) if c.__module__ not in _NOT_HASHED
    ]
    digest = hashlib.sha256()
    for path in sorted({inspect.getsourcefile(o) for o in defined} - {None}):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _binding(budget: int | None, wanted: int) -> int | None:
    """`budget` where it cuts the `wanted` sample passes short, else None."""
    return budget if budget is not None and budget < wanted else None


def _dump(settings: object) -> object:
    return settings.model_dump(mode="json") if hasattr(settings, "model_dump") else None


class CloudHost:
    """Holds the cloud's models, its data view and the strategy's cloud-side state."""

    def __init__(self, config: SimConfig, dataset_root: str, torch_threads: int | None = None) -> None:
        """`torch_threads`: None keeps torch's default."""
        if torch_threads:
            torch.set_num_threads(torch_threads)
        import_optimizer_modules()
        config = self.config = sizing.for_dataset(config, read_meta(dataset_root).num_devices)
        self.data = load_devices(config, dataset_root)
        self.models = build_models(model_spec(dataset_root), config, config.seed)
        self.window = self.data.windows(config.data.windows, config.data.pretrain_frac)
        eval_split = SPLIT_VALID if config.metrics.split == "valid" else SPLIT_TEST
        self.eval_indices = np.flatnonzero(self.data.split == eval_split)
        self.num_buckets = len(config.metrics.bucket_quantiles) + 1
        self.bucket_of_device = metrics.activity_buckets(self.data.n_train, config.metrics.bucket_quantiles)
        self.strategy = resolve(STRATEGY, config.strategy)(config)
        self.strategy.start_cloud(self)

    def join_workers(self, init_method: str, rank: int, workers: int) -> None:
        """Become worker `rank` of the cloud's `workers` data-parallel processes (docs/scale-out.md): every training
        loop then sums its gradients with the others' (`algorithms.data_parallel`). gloo: CPU tensors, any node."""
        torch.distributed.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=workers, timeout=_GROUP_TIMEOUT
        )

    # ---------------------------------------------------------------- what cloud steps use

    def round_indices(self, participants: np.ndarray, round_index: int) -> np.ndarray:
        """D_t: the participants' training samples of window t, which the cloud's update learns."""
        mask = (self.data.split == SPLIT_TRAIN) & (self.window == round_index)
        return np.flatnonzero(mask & np.isin(self.data.sample_device, participants))

    def pretraining_indices(self) -> np.ndarray:
        """The samples the cloud holds before round 0: every device's pretraining window."""
        return np.flatnonzero((self.data.split == SPLIT_TRAIN) & (self.window == PRETRAIN_WINDOW))

    # ---------------------------------------------------------------- what the driver calls

    def pretrain(self, cache_dir: str | None, on_progress: Progress | None = None) -> dict[str, float]:
        """Central pretraining on every device's pretraining window, then bootstrapping G (docs/design.md §4).

        Cached by everything that decides the result, so strategies compared on one dataset and seed share it.
        `on_progress(stage, done, total)` hears of every minibatch."""
        path = Path(cache_dir) / f"{self._pretrain_key()}.pt" if cache_dir else None
        if path is not None and path.is_file():
            state = torch.load(path, weights_only=False)
            load_numpy_state(self.models.cloud, state["cloud"])
            load_numpy_state(self.models.patch, state["patch"])
            return {"pretrain_loss": state["loss"], "pretrain_cached": 1.0}
        cloud, hyper = self.config.cloud, self.config.data
        indices = self.pretraining_indices()
        losses = fit(
            self.models.cloud,
            self.data,
            indices,
            epochs=cloud.pretrain_epochs,
            batch_size=cloud.batch_size,
            lr=cloud.lr,
            history_len=hyper.history_len,
            seed_keys=run_keys(self.config.seed, "pretrain_minibatches"),
            on_batch=self._reporter("pretraining: minibatch", on_progress),
            max_samples=cloud.pretrain_budget,
        )
        bootstrap_patch(
            self.models.cloud,
            self.models.patch,
            self.data,
            indices,
            self.config.patch,
            cloud.batch_size,
            hyper.history_len,
            self.config.seed,
            on_batch=self._reporter("bootstrapping the patch generator: minibatch", on_progress),
            max_samples=cloud.pretrain_budget,
        )
        loss = losses[-1] if losses else float("nan")
        if path is not None and world()[0] == 0:  # the workers' models are the same: one writes them
            path.parent.mkdir(parents=True, exist_ok=True)
            # a name of its own: runs pretraining the same cloud at once must not write into one file
            temp = path.with_suffix(f".{os.getpid()}.tmp")
            state = {"cloud": state_to_numpy(self.models.cloud), "patch": state_to_numpy(self.models.patch)}
            torch.save({**state, "loss": loss}, temp)
            temp.replace(path)
        return {"pretrain_loss": loss, "pretrain_cached": 0.0}

    def _reporter(self, stage: str, on_progress: Progress | None) -> Callable[[int, int], None] | None:
        if on_progress is None:
            return None
        return functools.partial(on_progress, stage)

    def _pretrain_key(self) -> str:
        """What decides pretraining: the seed, the models' and pretraining's settings, the pretraining samples
        themselves (a digest), the code that pretrains (a digest of its source files) and torch's thread count (float
        sums in another order give another model, and training amplifies it: 8e-4 GAUC three rounds on); not what
        only evaluation uses (`metrics.*`, the evaluation negatives)."""
        c = self.config
        indices = self.pretraining_indices()
        samples = hashlib.sha256()
        for values in (self.data.sample_device, self.data.item, self.data.label, self.data.seq_pos):
            samples.update(np.ascontiguousarray(values[indices]).tobytes())
        parts = {
            "seed": c.seed,
            "model": c.model.model_dump(mode="json"),
            "model_settings": _dump(c.section(type(self.models.cloud))),
            "patch": c.patch.model_dump(mode="json"),
            "cloud": c.cloud.model_dump(mode="json", include={"pretrain_epochs", "batch_size", "lr"}),
            # the budget only where it binds: a budget no step reaches changes nothing
            "budget": _binding(
                c.cloud.pretrain_budget, len(indices) * max(c.cloud.pretrain_epochs, c.patch.bootstrap_epochs)
            ),
            "data": c.data.model_dump(mode="json", exclude={"cache_dir", "eval_negatives", "eval_negatives_on_load"}),
            "samples": samples.hexdigest(),
            "code": _source_digest(
                type(self.models.cloud), type(self.models.patch), fit, bootstrap_patch, minibatch_loop
            ),
            "torch_threads": torch.get_num_threads(),
            "workers": world()[1],  # gradients summed across workers: float sums in another order
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def device_info(self) -> DeviceInfo:
        return DeviceInfo(self.bucket_of_device, self.num_buckets)

    def device_counts(self, round_index: int) -> dict[str, np.ndarray]:
        """Per device: samples held in round t (windows up to t) and evaluation samples, for the latency model."""
        local = (self.data.split == SPLIT_TRAIN) & (self.window <= round_index)
        n = self.data.num_devices
        return {
            "n_local": np.bincount(self.data.sample_device[local], minlength=n),
            "n_eval": np.bincount(self.data.sample_device[self.eval_indices], minlength=n),
        }

    def model_cost(self) -> ModelCost:
        cloud, patch = self.models.cloud, self.models.patch
        return ModelCost(
            model_floats=sum(p.numel() for p in cloud.parameters()),
            patch_floats=sum(p.numel() for p in patch.parameters()),
            k=self.config.patch.k,
            features=float(cloud.feature_flops(self.config.data.history_len)),
            head=float(cloud.head_flops()),
            patch=float(patch.flops_per_sample()),
            first_hidden=float(cloud.first_hidden_flops()),
            input_dim=cloud.input_dim,
            behaviour_dim=cloud.behaviour_dim,
        )

    def broadcast(self, round_index: int, participants: np.ndarray) -> Broadcast:
        ctx = RoundContext(self.config, round_index, participants)
        return Broadcast(
            round=round_index,
            participants=participants,
            model_state=state_to_numpy(self.models.cloud),
            patch_state=state_to_numpy(self.models.patch) if self.strategy.uses_patches else None,
            payload=self.strategy.broadcast_payload(self, ctx),
        )

    def update(self, round_index: int, participants: np.ndarray, results: list[PackResult]) -> dict[str, float]:
        """The strategy's cloud step on what came back from the devices; `workers`: how many processes it ran in."""
        stats = self.strategy.cloud_step(self, RoundContext(self.config, round_index, participants), results)
        return {**stats, "workers": float(world()[1])}

    def evaluate(self) -> metrics.Evaluation:
        """The current cloud model on every device's evaluation split (and by full ranking where configured)."""
        idx = self.eval_indices
        history_len = self.config.data.history_len
        with self.models.cloud.scoring_for_metrics():
            scores = predict(self.models.cloud, self.data, idx, history_len=history_len)
        full = {}
        if self.config.metrics.ranking != "sampled":
            positives = idx[self.data.label[idx] == 1]
            ranker = FullRanker(self.models.cloud, history_len=history_len)
            full = {"full_ranks": ranker.ranks(self.data, positives), "full_queries": self.data.query_ids(positives)}
        return metrics.evaluate(
            self.data.sample_device[idx],
            self.data.query_ids(idx),
            self.data.label[idx],
            scores,
            self.bucket_of_device,
            self.num_buckets,
            k=self.config.metrics.k,
            ks=self.config.metrics.ks,
            **full,
        )

    def state(self) -> dict[str, object]:
        """Everything a checkpoint needs to continue the run: the models and the strategy's own state."""
        return {
            "cloud": state_to_numpy(self.models.cloud),
            "patch": state_to_numpy(self.models.patch),
            "encoder": state_to_numpy(self.models.encoder),
            **self.strategy.state(),
        }

    def load_state(self, state: dict[str, object]) -> None:
        load_numpy_state(self.models.cloud, state["cloud"])
        load_numpy_state(self.models.patch, state["patch"])
        load_numpy_state(self.models.encoder, state["encoder"])
        self.strategy.load_state(state)
