"""The validation and test loaders of every datamodule: each item once across the ranks of a DDP run.

Lightning gives an evaluation loader a ``DistributedSampler``, which pads the split so that every rank gets as many
items (3 views on 2 ranks: 4 batches, one view twice), and the logged epoch mean then counts the repeat. These loaders
carry Lightning's ``UnrepeatedDistributedSampler`` instead (which Lightning keeps): the ranks get 2 and 1 views, and
the epoch mean Lightning syncs (the sum of each rank's batch values over the sum of their batch sizes) is the
one-process mean. The ranks then run different numbers of evaluation batches, so nothing may call a collective per
evaluation batch (``src.callbacks.stop.StopOnSignal`` checks the stop flag across ranks only between training steps).
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset


def eval_loader(dataset: Dataset, **kwargs: Any) -> DataLoader:
    """``DataLoader(dataset, **kwargs)`` (in order, no shuffling) with each item on one rank only under DDP."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

        kwargs["sampler"] = UnrepeatedDistributedSampler(dataset, num_replicas=dist.get_world_size(),
                                                         rank=dist.get_rank(), shuffle=False)
    return DataLoader(dataset, **kwargs)
