"""A data node's side of the federation: MedMNIST 2D files, shards and the OpenFL shard descriptor.

This package stays on the envoy's machine; the training code travels with each experiment instead.
"""
from .descriptor import MedMNISTShardDataset, MedMNISTShardDescriptor, ShardSetup, prepare
from .spec import FLAGS, SIZES, SPLITS, DataError

__all__ = [
    "FLAGS", "SIZES", "SPLITS", "DataError", "MedMNISTShardDataset", "MedMNISTShardDescriptor",
    "ShardSetup", "prepare",
]
