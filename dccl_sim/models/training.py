"""Plain supervised training and batched scoring of the cloud model over a DeviceData."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from dccl_sim.algorithms.data_parallel import MinibatchLoss, minibatch_loop
from dccl_sim.data.device_data import Batch, DeviceData
from dccl_sim.seeding import seeded_generator

# samples per forward pass when scoring without gradients: at 4,096 the attention's [chunk, L, H] intermediates
# (about 12 MB at L = 20) stay near the cache; 16,384 was 1.7× slower per sample on 1 thread
SCORING_CHUNK = 4096

# extra loss on a minibatch: (logits, batch, the samples' positions in `fit`'s `indices`) -> scalar
ExtraLoss = Callable[[torch.Tensor, Batch, np.ndarray], torch.Tensor]


def import_optimizer_modules() -> None:
    """Import what torch.optim imports when the first optimizer is built (torch._dynamo, ~1 s). A host calls this
    when it is made, so that the import lands neither inside round 0's timed cloud update nor in a command that only
    checks its settings and fails."""
    import torch._dynamo  # noqa: F401


def fit(
    model: nn.Module,
    data: DeviceData,
    indices: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    history_len: int,
    seed_keys: tuple[int, ...],
    extra_loss: ExtraLoss | None = None,
    parameters: list[nn.Parameter] | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    max_samples: int | None = None,
) -> list[float]:
    """Minimize mean BCE (plus `extra_loss`) over the samples `indices` with Adam; returns the mean loss per epoch.

    Minibatch order is drawn from `seed_keys` (e.g. (seed, round)), so a run is reproducible. The order is drawn
    as positions into `indices`, so that `extra_loss` finds per-sample values by position instead of searching for
    each sample in every step. Data-parallel over the cloud's workers (`minibatch_loop`). `on_batch(done, total)`
    is called after every minibatch (progress display). `max_samples`: stop once about that many samples went
    through (whole minibatches), even within an epoch.
    """
    params = parameters if parameters is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)

    def part_loss(positions: np.ndarray, part: slice) -> MinibatchLoss:
        mine = positions[part]
        batch = data.batch(indices[mine], history_len)
        logits = model(batch)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.label)
        if extra_loss is not None:
            loss = loss + extra_loss(logits, batch, mine)
        return MinibatchLoss(loss, loss)

    model.train()
    # the order is drawn as rng.permutation(indices) would: numpy shuffles arange(n) with the same draws
    losses = minibatch_loop(
        len(indices),
        part_loss,
        params,
        optimizer,
        epochs=epochs,
        batch_size=batch_size,
        rng=seeded_generator(*seed_keys),
        on_batch=on_batch,
        max_samples=max_samples,
    )
    model.eval()
    return losses


@torch.no_grad()
def predict(
    model: nn.Module, data: DeviceData, indices: np.ndarray, *, history_len: int, chunk_size: int = SCORING_CHUNK
) -> np.ndarray:
    """Logits of the samples `indices`, computed in chunks to bound memory."""
    model.eval()
    out = np.empty(len(indices), dtype=np.float32)
    for start in range(0, len(indices), chunk_size):
        chunk = indices[start : start + chunk_size]
        out[start : start + len(chunk)] = model(data.batch(chunk, history_len)).numpy()
    return out
