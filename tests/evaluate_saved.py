"""Evaluate a saved state_dict on shards' val splits, in a process of its own; print JSON.

usage: python evaluate_saved.py MODEL.pt FLAG SIZE DATA_DIR WORLD_SIZE
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "envoy"), str(ROOT / "workspace")]

import torch  # noqa: E402

from medfl import MedMNISTData, build_model, task_type, validate  # noqa: E402
from medmnist_shard import MedMNISTShardDescriptor  # noqa: E402

model_path, flag, size, data_dir, world = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
model = build_model(flag, size)
model.load_state_dict(torch.load(model_path))
shards = []
for rank in range(1, world + 1):
    data = MedMNISTData()
    data.shard_descriptor = MedMNISTShardDescriptor(flag, size, data_dir, f"{rank},{world}", download=False)
    shards.append({"n": data.get_valid_data_size(),
                   **validate(model, data.get_valid_loader(), "cpu", task=task_type(flag))})
print(json.dumps(shards))
