"""The strategies compared side by side; each is a device step and a cloud step sharing one round loop.

- `cloud_only`: model-over-data. Devices only contribute their data; the cloud fine-tunes W on it.
- `metapatch`: device MetaPatch (eq. 3, gated) from θ = 0, and `cloud_only`'s cloud step.
- `dccl`: MetaPatch from the cloud's θ̃, MoMoDistill (eq. 5) and the patch-space update (eq. 7).
- `fedavg`: devices train a full copy of W; the cloud averages them weighted by sample count.
- `local_finetune`: each device trains its own copy of the top MLP; `cloud_only`'s cloud step.
- `coda`: the cloud retrieves samples of similar users for each device; the device filters them with its own
  sample classifier and trains its meta-patch on local + kept samples; `cloud_only`'s cloud step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call
from torch.nn import functional

from dccl_sim.algorithms.cloud_side import CloudSide
from dccl_sim.algorithms.cloud_steps import (
    cloud_logits,
    distill_weight,
    features_of,
    finetune,
    momodistill_step,
    patch_space_update,
    per_sample_theta,
    teacher_logits,
    teacher_weights,
)
from dccl_sim.algorithms.coda import Candidates, coda_device_step
from dccl_sim.algorithms.device_side import DeviceSide, RoundSamples, Stopwatch
from dccl_sim.algorithms.metapatch_step import metapatch_device_step, patched_logits
from dccl_sim.algorithms.protocol import Broadcast, PackResult, concat_theta, load_numpy_state, merge_packs
from dccl_sim.algorithms.schedule import minibatch_schedule
from dccl_sim.models.training import predict


def _rows_of_samples(samples: RoundSamples) -> np.ndarray:
    return np.repeat(np.arange(len(samples.starts)), samples.ends - samples.starts)


def _received(results: list[PackResult]) -> np.ndarray:
    return np.sort(np.concatenate([r.device_ids for r in results])) if results else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Strategy:
    name: str

    def device_round(self, side: DeviceSide, broadcast: Broadcast, device_ids: np.ndarray) -> PackResult:
        raise NotImplementedError

    def cloud_round(self, cloud: CloudSide, round_index: int, results: list[PackResult]) -> dict[str, float]:
        raise NotImplementedError


def _cloud_scores(side: DeviceSide, evaluation: RoundSamples) -> np.ndarray:
    return predict(side.models.cloud, side.data, evaluation.indices, history_len=side.config.data.history_len)


def _finetune_keys(seed: int, round_index: int) -> tuple[int, ...]:
    """Minibatch seed of the cloud's per-round update, shared by fine-tuning and MoMoDistill (paired comparisons)."""
    return (seed, round_index, 0xC1)


def _finetune_cloud(cloud: CloudSide, round_index: int, results: list[PackResult]) -> dict[str, float]:
    indices = cloud.round_indices(_received(results), round_index)
    losses = finetune(
        cloud.models.cloud,
        cloud.data,
        indices,
        cloud.config.cloud,
        cloud.config.data.history_len,
        _finetune_keys(cloud.config.seed, round_index),
    )
    return {"cloud_loss": losses[-1] if losses else float("nan"), "cloud_samples": float(len(indices))}


class CloudOnly(Strategy):
    def device_round(self, side: DeviceSide, broadcast: Broadcast, device_ids: np.ndarray) -> PackResult:
        clock = Stopwatch()
        side.load(broadcast)
        local, evaluation = side.local_samples(device_ids, broadcast.round), side.eval_samples(device_ids)
        scores = _cloud_scores(side, evaluation)
        untrained = np.zeros(len(device_ids), dtype=np.int64)
        return side.result(
            device_ids, local, evaluation, scores, scores, samples_trained=untrained, elapsed_s=clock.elapsed()
        )

    def cloud_round(self, cloud: CloudSide, round_index: int, results: list[PackResult]) -> dict[str, float]:
        return _finetune_cloud(cloud, round_index, results)


class MetaPatchStrategy(Strategy):
    """Device-side MetaPatch; the cloud fine-tunes W as in cloud_only and keeps G as bootstrapped."""

    def device_round(self, side: DeviceSide, broadcast: Broadcast, device_ids: np.ndarray) -> PackResult:
        clock = Stopwatch()
        side.load(broadcast)
        local, evaluation = side.local_samples(device_ids, broadcast.round), side.eval_samples(device_ids)
        samples = side.patch_samples(device_ids, local)
        theta_start = broadcast.start_theta_of(device_ids, side.config.patch.k)
        step = metapatch_device_step(
            side.models.cloud,
            side.models.patch,
            samples,
            theta_start,
            side.config.device,
            side.config.seed,
            broadcast.round,
        )
        start, device = _patched_scores(side, evaluation, theta_start, step.theta)
        trained = _samples_trained(samples.ends - samples.starts, side, step.gate_passed)
        return side.result(
            device_ids,
            local,
            evaluation,
            start,
            device,
            gate_passed=step.gate_passed,
            samples_trained=trained,
            elapsed_s=clock.elapsed(),
            theta=step.theta.numpy(),
        )

    def cloud_round(self, cloud: CloudSide, round_index: int, results: list[PackResult]) -> dict[str, float]:
        return _finetune_cloud(cloud, round_index, results)


@torch.no_grad()
def _patched_scores(
    side: DeviceSide, evaluation: RoundSamples, theta_start: torch.Tensor, theta: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Evaluation logits of the starting and the personalized patched models, each device with its own patch."""
    cloud, patch = side.models.cloud, side.models.patch
    z0 = side.z0(evaluation)
    rows = torch.from_numpy(_rows_of_samples(evaluation))
    start = patched_logits(cloud, patch, z0, theta_start, rows).numpy()
    return start, patched_logits(cloud, patch, z0, theta, rows).numpy()


def _samples_trained(counts: np.ndarray, side: DeviceSide, gate_passed: np.ndarray) -> np.ndarray:
    """Samples passed through training (for the latency model's FLOPs): the gate's trial plus the refit."""
    epochs = side.config.device.local_epochs
    if not side.config.device.gate:
        return counts * epochs
    trial = np.floor(counts * (1 - side.config.device.gate_frac)).astype(np.int64)
    return (trial + np.where(gate_passed, counts, 0)) * epochs


class DCCL(MetaPatchStrategy):
    """MetaPatch on devices, MoMoDistill and the patch-space update on the cloud."""

    def cloud_round(self, cloud: CloudSide, round_index: int, results: list[PackResult]) -> dict[str, float]:
        config, models = cloud.config, cloud.models
        if not results:
            return {"cloud_samples": 0.0}
        device_ids, theta = concat_theta(results)
        indices = cloud.round_indices(device_ids, round_index)
        rows = np.searchsorted(device_ids, cloud.data.sample_device[indices])
        theta_of_sample = per_sample_theta(torch.from_numpy(theta), rows)
        history_len = config.data.history_len
        # base = f(x; W_t), the broadcast model without patches, for the teacher weights and residual targets
        teachers, base = teacher_logits(
            models.cloud, models.patch, cloud.data, indices, torch.from_numpy(theta), rows, history_len
        )
        weights = None
        if config.cloud.teacher_weighting != "uniform":
            patched = theta_of_sample.abs().sum(dim=1) > 0
            weights = teacher_weights(config.cloud.teacher_weighting, teachers, base, patched)
        # the same minibatch seed as cloud_only's fine-tuning: with β = 0 the cloud models are identical
        distill = momodistill_step(
            models.cloud,
            cloud.data,
            indices,
            teachers,
            config.cloud,
            history_len,
            _finetune_keys(config.seed, round_index),
            beta=distill_weight(config.cloud, round_index),
            weights=weights,
        )
        targets = teachers
        if config.cloud.patch_target == "residual":
            # the teachers' personalization f(x; W_t, G_t, θ̂) − f(x; W_t) on top of the refreshed W_{t+1}
            refreshed = cloud_logits(models.cloud, cloud.data, indices, history_len)
            targets = refreshed + (teachers - base)
        patch = patch_space_update(
            models.cloud,
            models.patch,
            models.encoder,
            cloud.data,
            indices,
            targets,
            theta_of_sample,
            config.cloud,
            config.patch,
            history_len,
            (config.seed, round_index),
        )
        with torch.no_grad():
            profile = torch.from_numpy(cloud.data.profile[device_ids])
            cloud.start_theta[device_ids] = models.encoder(profile, torch.from_numpy(theta)).numpy()
        cloud.seen[device_ids] = True
        return {
            "cloud_loss": distill[-1] if distill else float("nan"),
            "patch_loss": patch[-1] if patch else float("nan"),
            "cloud_samples": float(len(indices)),
        }


def _train_copy(
    side: DeviceSide,
    parameters: dict[str, torch.Tensor],
    forward,
    local: RoundSamples,
    row: int,
    device_id: int,
    round_index: int,
) -> int:
    """Adam on one device's copy of some parameters over its local samples; returns the samples trained."""
    config = side.config.device
    for tensor in parameters.values():
        tensor.requires_grad_(True)
    optimizer = torch.optim.Adam(list(parameters.values()), lr=config.model_lr)
    schedule = minibatch_schedule(
        local.starts[row : row + 1],
        local.ends[row : row + 1],
        config.local_epochs,
        config.batch_size,
        [(side.config.seed, round_index, device_id, 2)],
    )
    trained = 0
    for s in range(schedule.num_steps):
        rows, _ = schedule.step(s)
        logits, label = forward(parameters, rows)
        loss = functional.binary_cross_entropy_with_logits(logits, label)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        trained += len(rows)
    return trained


class FedAvg(Strategy):
    """Devices train full copies of W on their local data; the cloud takes the sample-weighted average."""

    def device_round(self, side: DeviceSide, broadcast: Broadcast, device_ids: np.ndarray) -> PackResult:
        clock = Stopwatch()
        side.load(broadcast)
        model, data, history_len = side.models.cloud, side.data, side.config.data.history_len
        local, evaluation = side.local_samples(device_ids, broadcast.round), side.eval_samples(device_ids)
        start = _cloud_scores(side, evaluation)
        device = np.empty_like(start)
        base = {name: torch.from_numpy(value) for name, value in broadcast.model_state.items()}
        total = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in base.items()}
        trained = np.zeros(len(device_ids), dtype=np.int64)
        weight = 0.0

        def forward(params: dict[str, torch.Tensor], positions: np.ndarray):
            batch = data.batch(local.indices[positions], history_len)
            return functional_call(model, params, (batch,)), batch.label

        for row, device_id in enumerate(device_ids):
            params = {name: value.clone() for name, value in base.items()}
            trained[row] = _train_copy(side, params, forward, local, row, int(device_id), broadcast.round)
            n = float(local.ends[row] - local.starts[row])
            for name, value in params.items():
                total[name] += n * value.detach().double()
            weight += n
            lo, hi = evaluation.starts[row], evaluation.ends[row]
            with torch.no_grad():
                batch = data.batch(evaluation.indices[lo:hi], history_len)
                device[lo:hi] = functional_call(model, params, (batch,)).numpy()
        model_sum = {name: value.numpy() for name, value in total.items()}
        return side.result(
            device_ids,
            local,
            evaluation,
            start,
            device,
            samples_trained=trained,
            elapsed_s=clock.elapsed(),
            model_sum=model_sum,
            weight=weight,
        )

    def cloud_round(self, cloud: CloudSide, round_index: int, results: list[PackResult]) -> dict[str, float]:
        total = merge_packs(results) if results else None
        if total is None or total.weight == 0:
            return {"cloud_samples": 0.0}
        state = {name: (value / total.weight).astype(np.float32) for name, value in (total.model_sum or {}).items()}
        weight = total.weight
        load_numpy_state(cloud.models.cloud, state)
        return {"cloud_samples": weight}


class LocalFinetune(Strategy):
    """Each device trains its own copy of the top MLP on fixed features; the cloud fine-tunes W as cloud_only."""

    def device_round(self, side: DeviceSide, broadcast: Broadcast, device_ids: np.ndarray) -> PackResult:
        clock = Stopwatch()
        side.load(broadcast)
        model, data, history_len = side.models.cloud, side.data, side.config.data.history_len
        local, evaluation = side.local_samples(device_ids, broadcast.round), side.eval_samples(device_ids)
        x_local = features_of(model, data, local.indices, history_len)
        x_eval = features_of(model, data, evaluation.indices, history_len)
        label = torch.from_numpy(data.label[local.indices].astype(np.float32))
        start = model.head(x_eval).detach().numpy()
        device = np.empty_like(start)
        head_names = [n for n, _ in model.named_parameters() if n.startswith(("hidden_layers", "output_layer"))]
        base = dict(model.named_parameters())
        trained = np.zeros(len(device_ids), dtype=np.int64)

        def head(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            z = x
            for i in range(len(model.hidden_layers)):
                z = torch.relu(
                    functional.linear(z, params[f"hidden_layers.{i}.weight"], params[f"hidden_layers.{i}.bias"])
                )
            return functional.linear(z, params["output_layer.weight"], params["output_layer.bias"]).squeeze(-1)

        def forward(params: dict[str, torch.Tensor], positions: np.ndarray):
            rows = torch.from_numpy(positions)
            return head(params, x_local[rows]), label[rows]

        for row, device_id in enumerate(device_ids):
            params = {name: base[name].detach().clone() for name in head_names}
            trained[row] = _train_copy(side, params, forward, local, row, int(device_id), broadcast.round)
            lo, hi = evaluation.starts[row], evaluation.ends[row]
            with torch.no_grad():
                device[lo:hi] = head(params, x_eval[lo:hi]).numpy()
        return side.result(
            device_ids,
            local,
            evaluation,
            start,
            device,
            samples_trained=trained,
            elapsed_s=clock.elapsed(),
        )

    def cloud_round(self, cloud: CloudSide, round_index: int, results: list[PackResult]) -> dict[str, float]:
        return _finetune_cloud(cloud, round_index, results)


class CoDA(Strategy):
    """Cloud-coordinated data augmentation: the broadcast carries each participant's retrieved candidates (their x);
    the device keeps those its sample classifier finds local-like and trains its meta-patch on local + kept samples.
    The cloud fine-tunes W as cloud_only and adds the round's uploads to its pool."""

    def device_round(self, side: DeviceSide, broadcast: Broadcast, device_ids: np.ndarray) -> PackResult:
        clock = Stopwatch()
        side.load(broadcast)
        config, model = side.config, side.models.cloud
        local, evaluation = side.local_samples(device_ids, broadcast.round), side.eval_samples(device_ids)
        local_x = features_of(model, side.data, local.indices, config.data.history_len)
        samples = side.patch_samples(device_ids, local, local_x)
        x, label, counts = broadcast.augment.of(broadcast.participants, device_ids)
        theta_start = broadcast.start_theta_of(device_ids, config.patch.k)
        step = coda_device_step(
            model,
            side.models.patch,
            samples,
            local_x,
            Candidates(x, label, counts),
            theta_start,
            config.device,
            config.coda,
            3 * config.model.embed_dim,  # the behaviour block of x: pooled history, target, their product
            config.seed,
            broadcast.round,
        )
        start, device = _patched_scores(side, evaluation, theta_start, step.theta)
        return side.result(
            device_ids,
            local,
            evaluation,
            start,
            device,
            gate_passed=step.gate_passed,
            samples_trained=step.samples_trained,
            elapsed_s=clock.elapsed(),
            theta=step.theta.numpy(),
            n_candidates=counts,
            n_kept=step.n_kept,
            classifier_passes=step.classifier_passes,
            classifier_s=step.classifier_s,
        )

    def cloud_round(self, cloud: CloudSide, round_index: int, results: list[PackResult]) -> dict[str, float]:
        stats = _finetune_cloud(cloud, round_index, results)
        cloud.receive(cloud.round_indices(_received(results), round_index))
        return stats


STRATEGIES: dict[str, Strategy] = {
    "cloud_only": CloudOnly("cloud_only"),
    "metapatch": MetaPatchStrategy("metapatch"),
    "dccl": DCCL("dccl"),
    "fedavg": FedAvg("fedavg"),
    "local_finetune": LocalFinetune("local_finetune"),
    "coda": CoDA("coda"),
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"strategy {name!r} is not implemented yet; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]
