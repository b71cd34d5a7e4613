"""Scanner shift: each hospital's images look their own way, whatever they show.

Hospitals differ first by how they acquire images: scanner vendor, staining, exposure, resolution. The `scanner`
partition simulates that on one public file. Labels are dealt out as in `iid`; then every image a node serves, in
all three splits, passes through that node's own fixed acquisition, drawn from the partition's seed and the node's
rank:

- colour: a gain per channel (RGB datasets only), as a stain or a camera's white balance shifts it;
- gamma, then contrast and brightness about mid-grey, as exposure and display curves differ;
- blur, a Gaussian of up to BLUR_MAX pixels (at 28 px; scaled with the image), as optics and resolution differ;
- noise, one fixed pattern per node (a detector's), added to every image.

The same seed and rank always give the same acquisition, so every node's images stay fixed from run to run, and a
node transforms each image once, as it loads its shard (at 224 px the blur costs about 6 ms an image on one CPU
core: every batch of every epoch would pay it again).
"""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

CONTRAST = (0.6, 1.5)  # multiplies the distance from mid-grey (log-uniform)
BRIGHTNESS = (-0.12, 0.12)  # added, as a share of the full range
GAMMA = (0.6, 1.6)  # intensity ** gamma (log-uniform)
BLUR_MAX = 1.2  # the Gaussian's sigma, in pixels at 28 px
NOISE_MAX = 0.05  # the fixed pattern's standard deviation, as a share of the full range
COLOUR = (0.8, 1.2)  # each RGB channel's gain
VERSION = 1  # part of a transformed shard's cache name: bump it when __call__ changes, and old caches are not read
BLOCK = 64  # images transformed at a time: bounds the float copies (64 x 224 x 224 x 3 float32 is 39 MB)


@dataclass(frozen=True)
class Acquisition:
    """One node's acquisition: what its images pass through before anyone, the node's own training included, sees
    them. Call it on uint8 images (N, H, W, C)."""

    seed: int
    rank: int
    contrast: float
    brightness: float
    gamma: float
    blur: float
    noise: float
    colour: tuple[float, ...]

    def describe(self) -> dict:
        """Its settings, rounded, as the node's description carries them."""
        return {k: (round(v, 3) if isinstance(v, float) else [round(c, 3) for c in v] if isinstance(v, tuple) else v)
                for k, v in asdict(self).items()}

    @property
    def cache_key(self) -> str:
        """What a cache of images transformed by it must match: the code's version and every setting, unrounded."""
        return json.dumps([VERSION, asdict(self)])

    def _pattern(self, shape: tuple[int, int, int]) -> np.ndarray:
        return _fixed_pattern(self.seed, self.rank, self.noise, shape)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.ndim == 3:
            return self._block(images[None])[0]
        out = np.empty_like(images, dtype=np.uint8)
        for start in range(0, len(images), BLOCK):
            out[start:start + BLOCK] = self._block(images[start:start + BLOCK])
        return out

    def _block(self, images: np.ndarray) -> np.ndarray:
        x = images.astype(np.float32) / 255.0
        x *= np.asarray(self.colour, dtype=np.float32)
        np.power(x, self.gamma, out=x)
        x = (x - 0.5) * self.contrast + 0.5 + self.brightness
        if self.blur > 0:
            x = gaussian_filter(x, sigma=(0, self.blur * x.shape[1] / 28, self.blur * x.shape[2] / 28, 0),
                                mode="reflect")
        x += self._pattern(x.shape[1:])
        return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _fixed_pattern(seed: int, rank: int, noise: float, shape: tuple[int, int, int]) -> np.ndarray:
    """A node's noise pattern for images of `shape`: drawn once, added to every image it transforms (read-only)."""
    pattern = (np.random.default_rng([seed, rank, *shape]).standard_normal(shape) * noise).astype(np.float32)
    pattern.flags.writeable = False
    return pattern


def acquisition(seed: int, rank: int, channels: int) -> Acquisition:
    """Node `rank`'s acquisition for images of `channels` channels (colour gains only for RGB), from `seed`."""
    rng = np.random.default_rng([int(seed), int(rank), 0x5CA])

    def log_uniform(low: float, high: float) -> float:
        return float(np.exp(rng.uniform(np.log(low), np.log(high))))

    contrast, brightness = log_uniform(*CONTRAST), float(rng.uniform(*BRIGHTNESS))
    gamma, blur, noise = log_uniform(*GAMMA), float(rng.uniform(0, BLUR_MAX)), float(rng.uniform(0, NOISE_MAX))
    colour = tuple(float(g) for g in rng.uniform(*COLOUR, size=3)) if channels == 3 else (1.0,) * channels
    return Acquisition(int(seed), int(rank), contrast, brightness, gamma, blur, noise, colour)
