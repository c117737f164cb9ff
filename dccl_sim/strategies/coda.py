"""`coda`: cloud-coordinated data augmentation. The cloud retrieves samples of similar users for each device and
broadcasts them; the device keeps those its sample classifier finds local-like and trains its meta-patch on local +
kept samples. The cloud fine-tunes W as `cloud_only` does and adds the round's uploads to its pool."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import Field, model_validator

from dccl_sim.algorithms.coda import (
    Augmentation,
    Candidates,
    candidate_table,
    coda_device_step,
    draw_candidates,
    nearest_users,
    user_representations,
)
from dccl_sim.algorithms.protocol import Broadcast, PackResult, received_devices
from dccl_sim.config import Fraction, NonNegativeFloat, PositiveFloat, PositiveInt, Section
from dccl_sim.context import RoundContext
from dccl_sim.hosts.cloud import CloudHost, ModelCost
from dccl_sim.hosts.device import DeviceHost, Stopwatch
from dccl_sim.strategies.base import DeviceCost
from dccl_sim.strategies.metapatch import MetaPatch, patched_full_ranks, patched_scores


class CodaSettings(Section):
    """The `coda` section: cloud-coordinated data augmentation for the device model (docs/design.md §4).

    Cloud, coarse matching: each user is represented by the mean cloud-model item embedding of the newest
    `history_len` + 1 items the cloud holds for it; a participant's `neighbours` most cosine-similar users (never
    itself) supply at most `candidates` samples, drawn uniformly from those users' training samples in the cloud's
    pool (the pretraining window plus the windows the cloud has received: never the current window, never
    validation or test samples), seeded by (seed, round, device id). Candidates travel as their top-MLP input x
    under the broadcast W_t, in `feature_dtype`, with their labels.

    Device, fine filtering: `filter = classifier` trains a per-device logistic regression, local samples = 1 vs
    candidates = 0 (classes weighted equally), on the behaviour part of x (pooled history, target, their product;
    the profile block is left out because it is constant over a device's own samples and would separate users,
    not samples), standardized per device, with `classifier_steps` full-batch Adam steps at `classifier_lr` and L2
    `classifier_l2`. It keeps the candidates it scores local-like: probability ≥ `threshold` (τ), or the top
    `keep_frac` (ρ) of each device's candidates; exactly one of the two is set. `filter = none` keeps every
    candidate (the ablation). The device
    then trains its meta-patch (the MetaPatch step and gate of `device`) on local + kept samples, each kept sample
    weighing `weight` against a local sample's 1 in the loss.
    """

    neighbours: PositiveInt = 20
    candidates: PositiveInt = 64
    feature_dtype: Literal["float16", "float32"] = "float16"
    filter: Literal["classifier", "none"] = "classifier"
    threshold: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    keep_frac: Fraction | None = 0.5
    weight: PositiveFloat = 1.0
    classifier_steps: PositiveInt = 50
    classifier_lr: PositiveFloat = 5e-2
    classifier_l2: NonNegativeFloat = 1e-2

    @model_validator(mode="after")
    def _one_selection_rule(self) -> CodaSettings:
        if self.filter == "classifier" and (self.threshold is None) == (self.keep_frac is None):
            raise ValueError(
                "the classifier keeps candidates by a threshold τ or a top fraction ρ: set exactly one of "
                f"coda.threshold and coda.keep_frac (got {self.threshold} and {self.keep_frac}; keep_frac defaults "
                "to 0.5, so with a threshold also set coda.keep_frac=null)"
            )
        return self


class CoDA(MetaPatch):
    """CoDA on the MetaPatch device step. The cloud's pool (the samples it may retrieve) starts as the pretraining
    data and grows by each round's uploads; it is part of the checkpoint."""

    name = "coda"
    Settings = CodaSettings
    device_columns: ClassVar[Mapping[str, Any]] = {
        "n_candidates": 0,
        "n_kept": 0,
        "candidate_bytes": 0,
        "classifier_s": np.nan,
    }

    def start_cloud(self, cloud: CloudHost) -> None:
        self.pool = np.zeros(cloud.data.num_samples, dtype=bool)
        self.pool[cloud.pretraining_indices()] = True

    def broadcast_payload(self, cloud: CloudHost, ctx: RoundContext) -> Augmentation:
        """Coarse matching under the broadcast model: each participant's most similar users, at most
        `candidates` of their pooled samples, shipped as top-MLP inputs."""
        settings, history_len = self.settings, self.config.data.history_len
        reps = user_representations(cloud.models.cloud, cloud.data, self.pool, history_len)
        neighbours = nearest_users(reps, cloud.data.rows_of(ctx.participants), settings.neighbours)
        offsets, samples = draw_candidates(
            cloud.data, self.pool, neighbours, ctx.participants, settings.candidates, ctx.keys("coda_candidates")
        )
        return candidate_table(cloud.models.cloud, cloud.data, offsets, samples, history_len, settings.feature_dtype)

    def device_step(
        self, device: DeviceHost, ctx: RoundContext, broadcast: Broadcast, device_ids: np.ndarray
    ) -> PackResult:
        clock = Stopwatch()
        model = device.models.cloud
        local, evaluation = device.local_samples(device_ids, ctx.round), device.eval_samples(device_ids)
        local_x = device.features(local)
        samples = device.patch_samples(device_ids, local, local_x)
        x, label, counts = broadcast.payload.of(broadcast.participants, device_ids)
        theta_start = self.start_theta(broadcast, device_ids)
        step = coda_device_step(
            model,
            device.models.patch,
            samples,
            local_x,
            Candidates(x, label, counts),
            theta_start,
            self.config.device,
            self.settings,
            model.behaviour_dim,
            ctx,
        )
        start, personal = patched_scores(device, evaluation, self.scored_start(theta_start), step.theta)
        passes = step.classifier_passes
        # the classifier's time is shared out by the rows each device's classifier passed
        classifier = step.classifier_s * passes / passes.sum() if passes.sum() else np.zeros(len(device_ids))
        return device.result(
            device_ids,
            local,
            evaluation,
            start,
            personal,
            gate_passed=step.gate_passed,
            samples_trained=step.samples_trained,
            elapsed_s=clock.elapsed(),
            uploads={"theta": step.theta.numpy()},
            extra_columns={
                "n_candidates": counts,
                "n_kept": step.n_kept,
                "candidate_bytes": counts * self.candidate_bytes(model.input_dim),
                "classifier_passes": passes,
                "classifier_s": classifier,
            },
            extra_work=counts,
            own_time_s=classifier,
            full_ranks=patched_full_ranks(device, evaluation, self.scored_start(theta_start), step.theta),
        )

    def cloud_step(self, cloud: CloudHost, ctx: RoundContext, results: list[PackResult]) -> dict[str, float]:
        stats = super().cloud_step(cloud, ctx, results)
        self.pool[cloud.round_indices(received_devices(results), ctx.round)] = True
        return stats

    def state(self) -> dict[str, Any]:
        return {"pool": np.packbits(self.pool)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        if "pool" in state:  # checkpoints written before CoDA hold no pool: keep the pretraining data
            self.pool = np.unpackbits(state["pool"], count=len(self.pool)).astype(bool)

    # ---------------------------------------------------------------- deployment model

    def candidate_bytes(self, input_dim: int) -> int:
        """One candidate on the wire: its top-MLP input x in the configured dtype and a one-byte label."""
        return input_dim * np.dtype(self.settings.feature_dtype).itemsize + 1

    def planned_samples_trained(self, n_local: np.ndarray) -> np.ndarray:
        """MetaPatch's upper bound over local samples plus every candidate kept."""
        return super().planned_samples_trained(n_local + self.settings.candidates)

    def device_cost(
        self,
        cost: ModelCost,
        n_local: np.ndarray,
        n_eval: np.ndarray,
        columns: Mapping[str, np.ndarray] | None = None,
    ) -> DeviceCost:
        """MetaPatch's cost, plus the candidates' download, their first hidden layer, and the sample classifier's
        training (3× a forward row per pass). Before the round: every candidate, all through the classifier with
        the local samples at every step."""
        if columns is None:
            candidates = np.full_like(n_local, self.settings.candidates)
            steps = self.settings.classifier_steps if self.settings.filter == "classifier" else 0
            passes = (n_local + candidates) * steps
            candidate_bytes = candidates * self.candidate_bytes(cost.input_dim)
        else:
            candidates, passes = columns["n_candidates"], columns["classifier_passes"]
            candidate_bytes = columns["candidate_bytes"]
        base = super().device_cost(cost, n_local, n_eval, columns)
        classifier_flops = 2.0 * cost.behaviour_dim  # a dot product over the behaviour block of x
        flops = base.flops + (candidates * cost.first_hidden + passes * 3.0 * classifier_flops)
        return replace(base, flops=flops, download_bytes=base.download_bytes + candidate_bytes)

    def round_columns(self, columns: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Means over participants: candidates received, kept, and their download bytes."""
        names = {"candidates_per_device": "n_candidates", "kept_per_device": "n_kept"}
        names["candidate_bytes_per_device"] = "candidate_bytes"
        return {key: _mean(columns[name]) for key, name in names.items()}


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")
