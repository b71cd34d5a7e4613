"""`make stems`: the network's two stems (medfl.model: "patch" and "full") side by side, on a task that only
full resolution can see, each trained the same way on one device: training images/s and test accuracy.

The task (SYNTHETIC): grayscale images, a smooth random background plus pixel noise, and across the whole
image a faint texture of period 2 px that sets the class: none, a checkerboard, horizontal or vertical
stripes. Each texture averages to zero over any even block, so images brought down to 28 px (any size // 28
that is even) carry nothing of the class: the classes differ only in fine detail.

    make stems size=224 device=cuda [bf16=1] [epochs=3]
    python -m localfed.stems --size 224 --device cuda [--bf16 1] [--epochs 3] [--samples 6000] [--amplitude 4]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import roots

roots.join("launcher")  # python -m localfed.stems: medfl from its root, as the launcher has it

from medfl.device import DeviceError, autocast, pick_device  # noqa: E402
from medfl.model import STEMS, Net  # noqa: E402

TEXTURES = ("none", "checkerboard", "horizontal stripes", "vertical stripes")
WARMUP_STEPS = 3  # untimed: the first steps pay for cuDNN's choices, not the stem


def fine_detail(n: int, size: int, seed: int, amplitude: float = 4.0, noise: float = 8.0
                ) -> tuple[np.ndarray, np.ndarray]:
    """n uint8 images (n, 1, size, size) and their labels; see the module's docstring."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(TEXTURES), size=n)
    coarse = torch.from_numpy(rng.uniform(60, 190, size=(n, 1, 7, 7)).astype(np.float32))
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False).numpy()
    rows, cols = np.indices((size, size))
    patterns = np.stack([np.zeros((size, size)), (-1.0) ** (rows + cols), (-1.0) ** rows, (-1.0) ** cols])
    phase = rng.choice((-1.0, 1.0), size=n)[:, None, None]  # a texture and its negative are the same class
    images[:, 0] += amplitude * phase * patterns[labels]
    images += rng.normal(0, noise, size=images.shape)
    return np.clip(np.rint(images), 0, 255).astype(np.uint8), labels


def run(stem: str, size: int, device: torch.device, bf16: bool, data: dict, epochs: int, batch: int,
        seed: int) -> dict:
    """Train one stem from the same seed; its training images/s (after a warm-up epoch's first steps) and test
    accuracy."""
    torch.manual_seed(seed)
    model = Net(1, len(TEXTURES), size, stem).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_train, y_train = (torch.from_numpy(a).to(device) for a in data["train"])
    x_test, y_test = (torch.from_numpy(a).to(device) for a in data["test"])
    generator = torch.Generator().manual_seed(seed)
    seen, train_s = 0, 0.0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=generator).to(device)
        for i, start in enumerate(range(0, len(order), batch)):
            if i == (WARMUP_STEPS if epoch == 0 else 0):  # the clock starts after the warm-up, then each epoch
                _sync(device)
                began = time.perf_counter()
            index = order[start:start + batch]
            with autocast(device, bf16):
                loss = F.cross_entropy(model(x_train[index].float() / 255), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(index) if epoch or i >= WARMUP_STEPS else 0
        _sync(device)
        train_s += time.perf_counter() - began
    model.eval()
    correct = 0
    with torch.no_grad(), autocast(device, bf16):
        for start in range(0, len(y_test), 4 * batch):
            logits = model(x_test[start:start + 4 * batch].float() / 255)
            correct += int((logits.argmax(1) == y_test[start:start + 4 * batch]).sum())
    return {"stem": stem, "train_images_per_s": round(seen / train_s), "test_acc": round(correct / len(y_test), 4),
            "parameters": sum(p.numel() for p in model.parameters())}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localfed.stems", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224, choices=(56, 112, 224))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", type=int, default=0, choices=(0, 1))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=6000, help="training images; the test set is a quarter")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amplitude", type=float, default=4.0, help="the texture's, in grey levels of 255")
    parser.add_argument("--noise", type=float, default=8.0, help="the pixel noise's standard deviation")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.samples < 4 * args.batch:
        print(f"error: give --epochs of at least 1 and --samples of at least 4 batches ({4 * args.batch})",
              file=sys.stderr)
        return 1
    try:
        device = pick_device(args.device)
    except DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    data = {"train": fine_detail(args.samples, args.size, args.seed, args.amplitude, args.noise),
            "test": fine_detail(args.samples // 4, args.size, args.seed + 1, args.amplitude, args.noise)}
    print(f"fine-detail task (SYNTHETIC), {args.size}px, {args.samples} training images, {args.epochs} epochs, "
          f"batch {args.batch}, texture {args.amplitude:g} in noise {args.noise:g}, on {device.type} ({name}), "
          f"bf16 {'on' if args.bf16 else 'off'}", flush=True)
    results = []
    for stem in STEMS:
        results.append(run(stem, args.size, device, bool(args.bf16), data, args.epochs, args.batch, args.seed))
        r = results[-1]
        print(f"stem {stem:6} {r['train_images_per_s']:>8} training images/s   test ACC {r['test_acc']:.3f}   "
              f"(chance {1 / len(TEXTURES):.2f})", flush=True)
    print(json.dumps({"size": args.size, "amplitude": args.amplitude, "noise": args.noise, "device": device.type,
                      "device_name": name, "bf16": bool(args.bf16), "results": results}))
    return 0


def stems(settings) -> int:
    """make stems: main() with the size, device and bf16 settings, and epochs and seed where given."""
    argv = ["--size", str(settings.size), "--device", settings.device, "--bf16", str(int(settings.bf16))]
    for name in ("epochs", "seed"):
        if name in settings.given:
            argv += [f"--{name}", str(getattr(settings, name))]
    return main(argv)


if __name__ == "__main__":
    sys.exit(main())
