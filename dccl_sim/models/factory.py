"""Build the cloud model, the MetaPatch parameters and the patch encoder from a dataset's description."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dccl_sim.config import SimConfig
from dccl_sim.models.din import CloudModel
from dccl_sim.models.encoder import PatchEncoder
from dccl_sim.models.metapatch import MetaPatch


@dataclass(frozen=True)
class ModelSpec:
    """What the models need to know about the data: vocabulary sizes and the item → category table."""

    num_items: int
    num_categories: int
    profile_cardinalities: tuple[int, ...]
    item_category: np.ndarray  # [num_items + 1]


@dataclass
class Models:
    cloud: CloudModel
    patch: MetaPatch
    encoder: PatchEncoder


def build_models(spec: ModelSpec, config: SimConfig, seed: int) -> Models:
    """Fresh models with weights drawn from `seed` alone, so every process builds the same ones."""
    torch.manual_seed(seed)
    cloud = CloudModel(
        spec.num_items,
        spec.num_categories,
        spec.profile_cardinalities,
        torch.from_numpy(spec.item_category),
        config.model,
    )
    patch = MetaPatch(cloud.hidden_sizes, config.patch.k, config.patch.rank)
    encoder = PatchEncoder(spec.profile_cardinalities, config.patch.k)
    return Models(cloud, patch, encoder)
