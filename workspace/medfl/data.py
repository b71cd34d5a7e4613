"""From a node's uint8 shard to batches: the DataInterface that OpenFL hands to the tasks."""
from __future__ import annotations

import torch
from openfl.interface.interactive_api.experiment import DataInterface
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from .device import pick_device


def to_float_chw(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) to float32 (N, C, H, W) in [-1, 1]: ToTensor then Normalize(0.5, 0.5)."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def batch_loader(dataset, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                 drop_last: bool = False, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches fetched with one indexing call each (dataset[list_of_indices]), kept uint8."""
    order = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=None, sampler=BatchSampler(order, batch_size, drop_last),
                      num_workers=num_workers, pin_memory=pin_memory)


class MedMNISTData(DataInterface):
    """Train on the shard's `train` split; validate on its `val` split (or `test`, for a final test).

    num_workers stays 0 by default: the shard is in memory and a batch is one indexing call, so
    worker processes would only compete with training for a small machine's cores. The loaders
    follow the device each envoy resolves from `device`: on HPU the last partial training batch is
    dropped (lazy mode would compile a second graph for it) and no worker processes are forked; on
    CUDA, batches are pinned for faster copies.
    """

    def __init__(self, train_batch_size: int = 64, eval_batch_size: int = 256, eval_split: str = "val",
                 seed: int = 0, num_workers: int = 0, device: str = "auto"):
        if eval_split not in ("val", "test"):
            raise ValueError(f"eval_split must be 'val' or 'test', not {eval_split!r}")
        for name, value in (("train_batch_size", train_batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        super().__init__(train_batch_size=train_batch_size, eval_batch_size=eval_batch_size,
                         eval_split=eval_split, seed=seed, num_workers=num_workers, device=device)

    @property
    def shard_descriptor(self):
        return self._shard_descriptor

    @shard_descriptor.setter
    def shard_descriptor(self, shard_descriptor):
        # Runs on the envoy, once per experiment.
        self._shard_descriptor = shard_descriptor
        self.train_set = shard_descriptor.get_dataset("train")
        self.eval_set = shard_descriptor.get_dataset(self.kwargs["eval_split"])
        self._shuffle = torch.Generator().manual_seed(self.kwargs["seed"])

    def _loader_settings(self) -> dict:
        kind = pick_device(self.kwargs.get("device", "auto")).type
        workers = 0 if kind == "hpu" else self.kwargs["num_workers"]
        return {"num_workers": workers, "pin_memory": kind == "cuda", "drop_last": kind == "hpu"}

    def get_train_loader(self, **kwargs) -> DataLoader:
        """Shuffled training batches; the shared generator gives each round a new order."""
        return batch_loader(self.train_set, self.kwargs["train_batch_size"], shuffle=True,
                            generator=self._shuffle, **self._loader_settings())

    def get_valid_loader(self, **kwargs) -> DataLoader:
        """Evaluation batches in a fixed order; every sample counts."""
        return batch_loader(self.eval_set, self.kwargs["eval_batch_size"],
                            **{**self._loader_settings(), "drop_last": False})

    def get_train_data_size(self) -> int:
        return len(self.train_set)

    def get_valid_data_size(self) -> int:
        return len(self.eval_set)
