"""The cloud side: W, G, ψ, the starting meta-patch of every device, the cloud's data view and evaluation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from dccl_sim import metrics
from dccl_sim.algorithms.cloud_steps import bootstrap_patch
from dccl_sim.algorithms.coda import candidate_table, draw_candidates, nearest_users, user_representations
from dccl_sim.algorithms.protocol import Augmentation, Broadcast, load_numpy_state, state_to_numpy
from dccl_sim.config import SimConfig
from dccl_sim.data.device_data import PRETRAIN_WINDOW, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, DeviceData
from dccl_sim.models.factory import ModelSpec, build_models
from dccl_sim.models.training import fit, predict

PATCH_STRATEGIES = ("metapatch", "dccl", "coda")


class CloudSide:
    """Holds the cloud's models and per-device state; strategies' cloud steps act on it."""

    def __init__(self, config: SimConfig, spec: ModelSpec, data: DeviceData) -> None:
        self.config = config
        self.spec = spec
        self.data = data
        self.models = build_models(spec, config, config.seed)
        self.window = data.windows(config.data.windows, config.data.pretrain_frac)
        eval_split = SPLIT_VALID if config.metrics.split == "valid" else SPLIT_TEST
        self.eval_indices = np.flatnonzero(data.split == eval_split)
        self.num_buckets = len(config.metrics.bucket_quantiles) + 1
        self.bucket_of_device = metrics.activity_buckets(data.n_train, config.metrics.bucket_quantiles)
        # θ̃: each device's starting meta-patch; never-seen devices start from the encoder's cold start
        self.start_theta = np.zeros((data.num_devices, config.patch.k), dtype=np.float32)
        self.seen = np.zeros(data.num_devices, dtype=bool)
        # the training samples the cloud holds (CoDA's global pool): the central pretraining data, then each round's
        # window as it arrives with the devices' results (`receive`)
        self.pool = (data.split == SPLIT_TRAIN) & (self.window == PRETRAIN_WINDOW)

    @property
    def uses_patches(self) -> bool:
        return self.config.strategy in PATCH_STRATEGIES

    def round_indices(self, participants: np.ndarray, round_index: int) -> np.ndarray:
        """D_t: the participants' training samples of window t, which the cloud's update learns."""
        mask = (self.data.split == SPLIT_TRAIN) & (self.window == round_index)
        return np.flatnonzero(mask & np.isin(self.data.sample_device, participants))

    def receive(self, indices: np.ndarray) -> None:
        """The cloud now holds these training samples (a round's uploads), so CoDA may retrieve them."""
        self.pool[indices] = True

    def augmentation(self, round_index: int, participants: np.ndarray) -> Augmentation:
        """CoDA's coarse matching for the participants under the current (broadcast) model: top-M similar users,
        at most S of their pooled samples each, shipped as top-MLP inputs."""
        coda, history_len = self.config.coda, self.config.data.history_len
        reps = user_representations(self.models.cloud, self.data, self.pool, history_len)
        neighbours = nearest_users(reps, self.data.rows_of(participants), coda.neighbours)
        keys = (self.config.seed, round_index, 0xC0DA)
        offsets, samples = draw_candidates(self.data, self.pool, neighbours, participants, coda.candidates, keys)
        return candidate_table(self.models.cloud, self.data, offsets, samples, history_len, coda.feature_dtype)

    def device_counts(self, round_index: int) -> dict[str, np.ndarray]:
        local = (self.data.split == SPLIT_TRAIN) & (self.window <= round_index)
        n = self.data.num_devices
        return {
            "n_local": np.bincount(self.data.sample_device[local], minlength=n),
            "n_eval": np.bincount(self.data.sample_device[self.eval_indices], minlength=n),
        }

    def pretrain(self, cache_dir: Path | None = None) -> dict[str, float]:
        """Central pretraining on every device's pretraining window, then bootstrapping G (DESIGN.md §4).

        Cached by everything that decides the result, so strategies compared on one dataset and seed share it."""
        path = cache_dir / f"{self._pretrain_key()}.pt" if cache_dir is not None else None
        if path is not None and path.is_file():
            state = torch.load(path, weights_only=False)
            load_numpy_state(self.models.cloud, state["cloud"])
            load_numpy_state(self.models.patch, state["patch"])
            return {"pretrain_loss": state["loss"], "pretrain_cached": 1.0}
        cloud, hyper = self.config.cloud, self.config.data
        indices = np.flatnonzero((self.data.split == SPLIT_TRAIN) & (self.window == PRETRAIN_WINDOW))
        losses = fit(
            self.models.cloud,
            self.data,
            indices,
            epochs=cloud.pretrain_epochs,
            batch_size=cloud.batch_size,
            lr=cloud.lr,
            history_len=hyper.history_len,
            seed_keys=(self.config.seed, 0x9E7),
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
        )
        loss = losses[-1] if losses else float("nan")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_suffix(".tmp")
            state = {"cloud": state_to_numpy(self.models.cloud), "patch": state_to_numpy(self.models.patch)}
            torch.save({**state, "loss": loss}, temp)
            temp.replace(path)
        return {"pretrain_loss": loss, "pretrain_cached": 0.0}

    def _pretrain_key(self) -> str:
        c = self.config
        parts = {
            "seed": c.seed,
            "model": c.model.model_dump(mode="json"),
            "patch": c.patch.model_dump(mode="json"),
            "cloud": c.cloud.model_dump(mode="json", include={"pretrain_epochs", "batch_size", "lr"}),
            "data": c.data.model_dump(mode="json", exclude={"cache_dir"}),
            "samples": [self.data.num_samples, int(self.data.item.sum()), int(self.data.sample_device.sum())],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    @torch.no_grad()
    def starting_patches(self, participants: np.ndarray) -> np.ndarray:
        """θ̃ of the participants; those never seen get the cold start E_ψ(profile, 0)."""
        theta = self.start_theta[participants].copy()
        fresh = ~self.seen[participants]
        if fresh.any():
            profile = torch.from_numpy(self.data.profile[participants[fresh]])
            theta[fresh] = self.models.encoder.cold_start(profile).numpy()
        return theta

    def broadcast(self, round_index: int, participants: np.ndarray) -> Broadcast:
        patches = self.config.strategy == "dccl"
        return Broadcast(
            round=round_index,
            participants=participants,
            model_state=state_to_numpy(self.models.cloud),
            patch_state=state_to_numpy(self.models.patch) if self.uses_patches else None,
            start_theta=self.starting_patches(participants) if patches else None,
            augment=self.augmentation(round_index, participants) if self.config.strategy == "coda" else None,
        )

    def evaluate(self) -> metrics.Evaluation:
        """The current cloud model on every device's evaluation split."""
        idx = self.eval_indices
        scores = predict(self.models.cloud, self.data, idx, history_len=self.config.data.history_len)
        return metrics.evaluate(
            self.data.sample_device[idx],
            self.data.query_ids(idx),
            self.data.label[idx],
            scores,
            self.bucket_of_device,
            self.num_buckets,
            k=self.config.metrics.k,
        )

    def state(self) -> dict[str, object]:
        """Everything a checkpoint needs to continue the run."""
        return {
            "cloud": state_to_numpy(self.models.cloud),
            "patch": state_to_numpy(self.models.patch),
            "encoder": state_to_numpy(self.models.encoder),
            "start_theta": self.start_theta.copy(),
            "seen": self.seen.copy(),
            "pool": np.packbits(self.pool),
        }

    def load_state(self, state: dict[str, object]) -> None:
        load_numpy_state(self.models.cloud, state["cloud"])
        load_numpy_state(self.models.patch, state["patch"])
        load_numpy_state(self.models.encoder, state["encoder"])
        self.start_theta = np.array(state["start_theta"], dtype=np.float32)
        self.seen = np.array(state["seen"], dtype=bool)
        if "pool" in state:  # checkpoints written before CoDA hold no pool: keep the pretraining data
            self.pool = np.unpackbits(state["pool"], count=self.data.num_samples).astype(bool)
