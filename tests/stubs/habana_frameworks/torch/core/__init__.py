"""Stand-in for habana_frameworks.torch.core: records mark_step calls and reports one HPU."""
import types

import torch

calls: list = []


def mark_step() -> None:
    calls.append("mark_step")


# The real module registers the hpu backend with torch; the stand-in only answers availability.
if not hasattr(torch, "hpu"):
    torch.hpu = types.SimpleNamespace(is_available=lambda: True)
