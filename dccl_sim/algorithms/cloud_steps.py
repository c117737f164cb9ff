"""Cloud-side steps: bootstrapping G, fine-tuning, MoMoDistill (eq. 5) and the patch-space update (eq. 7)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from dccl_sim.algorithms.data_parallel import MinibatchLoss, minibatch_loop, split_work, world
from dccl_sim.algorithms.metapatch_step import patched_logits
from dccl_sim.algorithms.packed_adam import PackedAdam
from dccl_sim.config import CloudConfig, PatchConfig
from dccl_sim.data.device_data import Batch, DeviceData
from dccl_sim.models.base import Recommender
from dccl_sim.models.encoder import PatchEncoder
from dccl_sim.models.metapatch import MetaPatch
from dccl_sim.models.training import SCORING_CHUNK, ExtraLoss, fit
from dccl_sim.seeding import run_keys, seeded_generator


def binary_kl_with_temperature(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float):
    """T² · KL(Bernoulli(σ(t/T)) ‖ Bernoulli(σ(s/T))) per sample; T² keeps gradients comparable across T.

    p(log σ(t) − log σ(s)) + (1 − p)(log σ(−t) − log σ(−s)) with log σ(−x) = log σ(x) − x: two log-sigmoids instead
    of four (the KL was a third of MoMoDistill's extra cost per step)."""
    t, s = teacher_logits / temperature, student_logits / temperature
    kl = functional.logsigmoid(t) - functional.logsigmoid(s) + (1 - torch.sigmoid(t)) * (s - t)
    return temperature**2 * kl


def _frozen(module: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    states = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in states:
        p.requires_grad_(False)
    return states


def _restore(states: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in states:
        p.requires_grad_(flag)


def _in_chunks(compute, indices: np.ndarray, width: int, chunk: int) -> torch.Tensor:
    """compute(indices chunk) -> [len, width] for each chunk, written into one preallocated tensor: no list of parts
    and no copy into a second tensor as large (fresh memory is costly on some VMs: 4 s for a 374 MB torch.cat)."""
    out = torch.empty(len(indices), width)
    for start in range(0, len(indices), chunk):
        out[start : start + chunk] = compute(indices[start : start + chunk])
    return out


@torch.no_grad()
def features_of(
    model: Recommender, data: DeviceData, indices: np.ndarray, history_len: int, chunk: int = SCORING_CHUNK
):
    """The top-MLP input x of the given samples under a frozen model, computed in chunks to bound memory."""
    model.eval()
    return _in_chunks(lambda part: model.features(data.batch(part, history_len)), indices, model.input_dim, chunk)


@torch.no_grad()
def first_hidden_of(
    model: Recommender, data: DeviceData, indices: np.ndarray, history_len: int, chunk: int = SCORING_CHUNK
):
    """z_0 of the given samples under a frozen model."""
    model.eval()
    return _in_chunks(
        lambda part: model.first_hidden(model.features(data.batch(part, history_len))),
        indices,
        model.hidden_sizes[0],
        chunk,
    )


def per_sample_theta(theta_of_device: torch.Tensor, device_rows: np.ndarray) -> torch.Tensor:
    return theta_of_device[torch.from_numpy(np.asarray(device_rows, dtype=np.int64))]


def whole_device_chunks(device_rows: np.ndarray, chunk: int) -> list[tuple[int, int]]:
    """[lo, hi) ranges over samples sorted by device, each the fewest whole devices holding at least `chunk`
    samples (the last may hold fewer)."""
    rows = np.asarray(device_rows)
    cuts = np.flatnonzero(np.diff(rows)) + 1  # where a new device starts
    bounds, lo = [], 0
    while lo < len(rows):
        at = np.searchsorted(cuts, lo + chunk)  # the first device start at or after lo + chunk
        hi = int(cuts[at]) if at < len(cuts) else len(rows)
        bounds.append((lo, hi))
        lo = hi
    return bounds


@torch.no_grad()
def teacher_logits(
    model: Recommender,
    patch: MetaPatch,
    data: DeviceData,
    indices: np.ndarray,
    theta_of_device: torch.Tensor,
    device_rows: np.ndarray,
    history_len: int,
    chunk: int = 16384,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed teachers of MoMoDistill, f(x; W_t, G_t, θ̂_m), for the round's samples (sample i belongs to the
    device with meta-patch theta_of_device[device_rows[i]], `device_rows` sorted), and the broadcast model's own
    f(x; W_t) on them, from one pass of the model's features. Computed over whole devices at a time: memory stays
    bounded (z_0 of 10^7 samples would be 8 GB) and each device's rows meet in one `patched_logits` call; the chunks
    are shared out among the cloud's workers (`split_work`)."""
    rows = np.asarray(device_rows, dtype=np.int64)

    def both(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        z0 = first_hidden_of(model, data, indices[lo:hi], history_len)
        patched = patched_logits(model, patch, z0, theta_of_device, torch.from_numpy(rows[lo:hi]))
        return patched, model.head_from_first(z0)

    teachers, base = split_work(whole_device_chunks(rows, chunk), both, outputs=2)
    return teachers, base


@torch.no_grad()
def cloud_logits(model: Recommender, data: DeviceData, indices: np.ndarray, history_len: int) -> torch.Tensor:
    """f(x; W) of the given samples, without patches, shared out among the cloud's workers in chunks."""

    def logits(lo: int, hi: int) -> tuple[torch.Tensor]:
        return (model.head_from_first(first_hidden_of(model, data, indices[lo:hi], history_len)),)

    if world()[1] == 1:  # one pass, as before workers existed
        return logits(0, len(indices))[0]
    bounds = [(lo, min(lo + SCORING_CHUNK, len(indices))) for lo in range(0, len(indices), SCORING_CHUNK)]
    return split_work(bounds, logits, outputs=1)[0]


# z_0 of a training set is computed once (in large chunks: faster than per minibatch even for one epoch) and kept
# when it fits this; otherwise each minibatch computes its own (at 10^6 devices, z_0 of ~1.7 × 10^7 pretraining
# samples would be 14 GB, of a round's ~5 × 10^6 samples 4 GB)
Z0_CACHE_BYTES = 2**31


class FirstHiddenSource:
    """z_0 of fixed samples under a frozen model, by position in `indices`: cached or computed per minibatch.

    The cache costs every cloud worker a pass over all samples; computing per minibatch costs each `passes` / workers
    passes (a worker computes its own part of each minibatch), so with as many workers as passes or more the cache
    is not made."""

    def __init__(
        self, model: Recommender, data: DeviceData, indices: np.ndarray, history_len: int, passes: int = 1
    ) -> None:
        self.model, self.data, self.indices, self.history_len = model, data, indices, history_len
        fits = len(indices) * model.hidden_sizes[0] * 4 <= Z0_CACHE_BYTES
        workers = world()[1]
        pays = workers == 1 or passes > workers
        self.cached = first_hidden_of(model, data, indices, history_len) if fits and pays else None

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[positions]
        return first_hidden_of(self.model, self.data, self.indices[positions.numpy()], self.history_len)


def bootstrap_patch(
    model: Recommender,
    patch: MetaPatch,
    data: DeviceData,
    indices: np.ndarray,
    config: PatchConfig,
    batch_size: int,
    history_len: int,
    seed: int,
    on_batch: Callable[[int, int], None] | None = None,
    max_samples: int | None = None,
) -> list[float]:
    """Learn Θ and {A_l} with W frozen and a per-device θ table on the pretraining data (then the table is
    discarded: every device starts from θ = 0). Returns the mean BCE per epoch.

    The table starts near zero (`bootstrap_init_std`) and carries the devices' own L2 penalty (`bootstrap_l2`), so
    Θ is learned for the small meta-patches a device's few Adam steps reach; a table drawn at a larger scale and
    trained slowly leaves Θ fitted to noise (experiments/results/strategies_investigation.md). `on_batch(done,
    total)` is called after every minibatch; `max_samples` stops it once about that many samples went through."""
    z0_of = FirstHiddenSource(model, data, indices, history_len, passes=config.bootstrap_epochs)
    label = torch.from_numpy(data.label[indices].astype(np.float32))
    rows = torch.from_numpy(data.rows_of(data.sample_device[indices]))
    generator = torch.Generator().manual_seed(seed)
    table = nn.Parameter(config.bootstrap_init_std * torch.randn(data.num_devices, config.k, generator=generator))
    lazy = config.bootstrap_table == "lazy"
    parameters = [*patch.parameters(), *([] if lazy else [table])]
    optimizer = torch.optim.Adam(parameters, lr=config.bootstrap_lr)
    table_optimizer = PackedAdam([table], lr=config.bootstrap_lr) if lazy else None
    touched: list[torch.Tensor] = []  # the lazy table's rows the minibatch touches, for `step_rows`

    def part_loss(positions: np.ndarray, part: slice) -> MinibatchLoss:
        chunk = torch.from_numpy(positions)
        mine = chunk[part]
        leaves: tuple[torch.Tensor, ...] = ()
        if table_optimizer is not None:
            # only the minibatch's rows enter the graph, so no gradient the size of the table is formed
            active, inverse = torch.unique(rows[chunk], return_inverse=True)
            active_rows = table.detach()[active].requires_grad_(True)
            theta = active_rows[inverse[part]]
            touched[:] = [active]
            leaves = (active_rows,)
        else:
            theta = table[rows[mine]]
        logits = model.head_from_first(z0_of(mine), patch.patch(theta))
        loss = functional.binary_cross_entropy_with_logits(logits, label[mine])
        penalty = config.bootstrap_l2 * theta.pow(2).sum(dim=1).mean()
        return MinibatchLoss(loss + penalty, loss, leaves)

    def step_table(step: MinibatchLoss) -> None:
        if table_optimizer is not None:
            table_optimizer.step_rows(touched[0], [step.leaves[0].grad])

    frozen = _frozen(model)
    try:
        return minibatch_loop(
            len(indices),
            part_loss,
            parameters,
            optimizer,
            epochs=config.bootstrap_epochs,
            batch_size=batch_size,
            rng=seeded_generator(*run_keys(seed, "bootstrap_minibatches")),
            after_step=step_table,
            on_batch=on_batch,
            max_samples=max_samples,
        )
    finally:
        _restore(frozen)


def finetune(
    model: Recommender,
    data: DeviceData,
    indices: np.ndarray,
    config: CloudConfig,
    history_len: int,
    seed_keys: tuple[int, ...],
    extra_loss: ExtraLoss | None = None,
) -> list[float]:
    """Plain BCE fine-tuning of W on the round's data (cloud_only's cloud step), plus `extra_loss` if given."""
    return fit(
        model,
        data,
        indices,
        epochs=config.finetune_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        history_len=history_len,
        seed_keys=seed_keys,
        extra_loss=extra_loss,
    )


def distill_weight(config: CloudConfig, round_index: int) -> float:
    """β_t = β · beta_decay^t: MoMoDistill's weight in round t."""
    return config.beta * config.beta_decay**round_index


@torch.no_grad()
def teacher_weights(
    weighting: str, teachers: torch.Tensor, base_logits: torch.Tensor, patched: torch.Tensor
) -> torch.Tensor | None:
    """Per-sample weights of the distillation term (None: uniform).

    `base_logits` are the broadcast model's own logits f(x; W_t) on the same samples and `patched` says whether the
    sample's device uploaded a non-zero meta-patch. `patched`: 1 for those samples, 0 otherwise; `confidence`:
    |σ(teacher) − σ(base)|, how far personalization moved the prediction, normalized to mean 1 where non-zero.
    """
    if weighting == "uniform":
        return None
    if weighting == "patched":
        return patched.to(teachers.dtype)
    if weighting == "confidence":
        moved = (torch.sigmoid(teachers) - torch.sigmoid(base_logits)).abs() * patched.to(teachers.dtype)
        positive = moved > 0
        return moved / moved[positive].mean() if positive.any() else moved
    raise ValueError(f"unknown teacher weighting {weighting!r}; use uniform, patched or confidence")


def momodistill_step(
    model: Recommender,
    data: DeviceData,
    indices: np.ndarray,
    teachers: torch.Tensor,
    config: CloudConfig,
    history_len: int,
    seed_keys: tuple[int, ...],
    *,
    beta: float | None = None,
    weights: torch.Tensor | None = None,
) -> list[float]:
    """Eq. 5: train W on the round's data with BCE + β · KL_T(p_m ‖ σ(f(x; W))) against fixed teachers.

    `teachers[i]` is the teacher logit of sample `indices[i]` (and `weights[i]`, if given, its KL weight).
    `beta` defaults to `config.beta`. With β = 0 this is `finetune` exactly: the same
    minibatches in the same order, so a comparison with cloud_only is paired.
    """
    beta = config.beta if beta is None else beta
    if beta == 0:
        return finetune(model, data, indices, config, history_len, seed_keys)

    def distill(logits: torch.Tensor, batch: Batch, positions: np.ndarray) -> torch.Tensor:
        position = torch.from_numpy(positions)
        kl = binary_kl_with_temperature(teachers[position], logits, config.temperature)
        if weights is not None:
            kl = kl * weights[position]
        return beta * kl.mean()

    return finetune(model, data, indices, config, history_len, seed_keys, extra_loss=distill)


def patch_space_update(
    model: Recommender,
    patch: MetaPatch,
    encoder: PatchEncoder,
    data: DeviceData,
    indices: np.ndarray,
    teachers: torch.Tensor,
    theta_hat_of_sample: torch.Tensor,
    config: CloudConfig,
    patch_config: PatchConfig,
    history_len: int,
    seed_keys: tuple[int, ...],
) -> list[float]:
    """Eq. 7: with W_{t+1} fixed, fit G and ψ so that σ(f(x; W_{t+1}, G, E_ψ(profile_m, θ̂_m))) matches the teachers."""
    z0_of = FirstHiddenSource(model, data, indices, history_len, passes=config.patch_epochs)
    profile = torch.from_numpy(data.profile[data.rows_of(data.sample_device[indices])])
    parameters = [*patch.parameters(), *encoder.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=patch_config.lr)

    def part_loss(positions: np.ndarray, part: slice) -> MinibatchLoss:
        mine = torch.from_numpy(positions)[part]
        theta = encoder(profile[mine], theta_hat_of_sample[mine])
        logits = model.head_from_first(z0_of(mine), patch.patch(theta))
        loss = binary_kl_with_temperature(teachers[mine], logits, config.temperature).mean()
        return MinibatchLoss(loss, loss)

    frozen = _frozen(model)
    try:
        return minibatch_loop(
            len(indices),
            part_loss,
            parameters,
            optimizer,
            epochs=config.patch_epochs,
            batch_size=config.batch_size,
            rng=seeded_generator(*seed_keys),
        )
    finally:
        _restore(frozen)
