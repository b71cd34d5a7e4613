"""From a node's uint8 shard to batches: the DataInterface that OpenFL hands to the tasks.

The notebook's data cell shows MedMNISTData as written here (tools/notebooks.py copies it); the helpers below are
what its methods call.
"""
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


def shuffling(dataset, seed: int, first_epoch: int = 0) -> torch.Generator:
    """The generator that orders a node's training batches, epoch after epoch, from `seed`; a resumed run starts at
    `first_epoch`, past the orders of the epochs it trained before."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(first_epoch):
        list(RandomSampler(dataset, generator=generator))
    return generator


def loader_settings(device_request: str, training: bool = True) -> dict:
    """DataLoader settings for the device this node resolves `device_request` to.

    No worker processes: a batch is one indexing call on an in-memory shard, so workers would only compete with
    training for a small machine's cores (and on HPU they must not fork). On CUDA, batches are pinned for faster
    copies. On HPU the last partial training batch is dropped: lazy mode would compile a second graph for it.
    """
    kind = pick_device(device_request).type
    return {"num_workers": 0, "pin_memory": kind == "cuda", "drop_last": training and kind == "hpu"}


class MedMNISTData(DataInterface):
    """Each envoy's batches: `train` for training, `val` (or `test`, for the test run) for evaluation."""

    def __init__(self, train_batch_size=64, eval_batch_size=256, eval_split="val", seed=0, device="auto",
                 first_epoch=0):
        super().__init__(train_batch_size=train_batch_size, eval_batch_size=eval_batch_size,
                         eval_split=eval_split, seed=seed, device=device, first_epoch=first_epoch)

    @property
    def shard_descriptor(self):
        return self._shard_descriptor

    @shard_descriptor.setter
    def shard_descriptor(self, shard_descriptor):
        # Runs on the envoy, once per experiment: OpenFL hands over the node's own shard descriptor.
        self._shard_descriptor = shard_descriptor
        self.train_set = shard_descriptor.get_dataset("train")
        self.eval_set = shard_descriptor.get_dataset(self.kwargs["eval_split"])
        self.shuffle = shuffling(self.train_set, self.kwargs["seed"], self.kwargs["first_epoch"])

    def get_train_loader(self, **kwargs):
        """Shuffled training batches; the generator gives each round a new order, the seed the same ones."""
        return batch_loader(self.train_set, self.kwargs["train_batch_size"], shuffle=True, generator=self.shuffle,
                            **loader_settings(self.kwargs["device"]))

    def get_valid_loader(self, **kwargs):
        """Evaluation batches in a fixed order; every sample counts."""
        return batch_loader(self.eval_set, self.kwargs["eval_batch_size"],
                            **loader_settings(self.kwargs["device"], training=False))

    def get_train_data_size(self):
        return len(self.train_set)

    def get_valid_data_size(self):
        return len(self.eval_set)
