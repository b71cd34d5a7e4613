"""Evaluate a saved state_dict on every shard's split, in a process of its own; print JSON.

usage: python evaluate_saved.py MODEL.pt SPLIT FLAG SIZE DATA_DIR WORLD_SIZE [PARTITION ALPHA SEED]
"""
import json
import os
import sys

import roots

roots.join("launcher")

import torch  # noqa: E402

from medfl import MedMNISTData, build_model, task_type, validate  # noqa: E402
from medmnist_shard import MedMNISTShardDescriptor  # noqa: E402

model_path, split, flag, size, data_dir, world, *skew = sys.argv[1:]
# As many threads as each envoy of a local federation gets (localfed.federation): a sum in another order can flip
# the order of two nearly tied scores, and so an AUC
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(world)))
partition, alpha, seed = skew or ("iid", "0.5", "0")
model = build_model(flag, int(size))
model.load_state_dict(torch.load(model_path))
shards = {}
for rank in range(1, int(world) + 1):
    data = MedMNISTData(eval_split=split)
    data.shard_descriptor = MedMNISTShardDescriptor(flag, int(size), data_dir, f"{rank},{world}", partition,
                                                    float(alpha), int(seed), download=False)
    shards[f"envoy_{rank}"] = {"n": data.get_valid_data_size(),
                               **validate(model, data.get_valid_loader(), "cpu", task=task_type(flag))}
print(json.dumps(shards))
