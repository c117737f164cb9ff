"""Build the cloud model, the MetaPatch parameters and the patch encoder from a dataset's description.

The cloud model's class is the plug-in `config.model.name` names (a built-in recommender of `dccl_sim.models` or a
user's `module:Class`), built with its own settings section.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dccl_sim import plugins
from dccl_sim.config import SimConfig
from dccl_sim.models.base import ModelSpec, Recommender
from dccl_sim.models.encoder import PatchEncoder
from dccl_sim.models.metapatch import MetaPatch

__all__ = ["ModelSpec", "Models", "build_models", "model_class"]


@dataclass
class Models:
    cloud: Recommender
    patch: MetaPatch
    encoder: PatchEncoder


def model_class(config: SimConfig) -> type[Recommender]:
    """The recommender class `model.name` selects."""
    return plugins.resolve(plugins.MODEL, config.model.name)


def build_models(spec: ModelSpec, config: SimConfig, seed: int) -> Models:
    """Fresh models with weights drawn from `seed` alone, so every process builds the same ones."""
    torch.manual_seed(seed)
    cls = model_class(config)
    cloud = cls(spec, config.model, config.section(cls))
    patch = MetaPatch(cloud.hidden_sizes, config.patch.k, config.patch.rank)
    encoder = PatchEncoder(spec.profile_cardinalities, config.patch.k)
    return Models(cloud, patch, encoder)
