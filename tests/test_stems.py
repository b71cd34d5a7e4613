"""make stems: the fine-detail task hides its classes below full resolution, and the comparison runs and reports."""
import json

import numpy as np
import torch
import torch.nn.functional as F

from localfed.stems import TEXTURES, fine_detail, main


def test_the_classes_differ_only_in_fine_detail():
    textured, labels = fine_detail(64, 56, seed=3, amplitude=6)
    plain, same_labels = fine_detail(64, 56, seed=3, amplitude=0)
    assert textured.dtype == np.uint8 and textured.shape == (64, 1, 56, 56)
    assert (labels == same_labels).all() and set(labels) == set(range(len(TEXTURES)))
    # Brought down to 28 px, an image is its untextured twin (up to rounding): nothing of the class is left.
    pooled = [F.avg_pool2d(torch.from_numpy(x).float(), 2) for x in (textured, plain)]
    assert (pooled[0] - pooled[1]).abs().max() <= 0.5
    # At full resolution each texture is there: the difference from the twin is the class's pattern.
    difference = textured.astype(float) - plain.astype(float)
    for label, texture in enumerate(TEXTURES):
        d = difference[labels == label, 0]
        horizontal, vertical = np.abs(d[:, :, 1:] + d[:, :, :-1]).mean(), np.abs(d[:, 1:] + d[:, :-1]).mean()
        if texture == "none":
            assert np.abs(d).max() <= 1
        else:
            assert np.abs(d).mean() > 5
            # Stripes flip sign across rows (horizontal stripes) or columns, a checkerboard across both.
            assert (horizontal < 2) == (texture in ("checkerboard", "vertical stripes")), texture
            assert (vertical < 2) == (texture in ("checkerboard", "horizontal stripes")), texture


def test_make_stems_trains_both_stems_and_prints_what_it_measured(capsys):
    assert main(["--size", "56", "--samples", "256", "--epochs", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["device"] == "cpu" and result["size"] == 56
    assert [r["stem"] for r in result["results"]] == ["patch", "full"]
    for r in result["results"]:
        assert r["train_images_per_s"] > 0 and 0 <= r["test_acc"] <= 1
        assert f"stem {r['stem']}" in out
    assert "SYNTHETIC" in out


def test_bad_settings_are_refused_in_one_line(capsys):
    assert main(["--size", "56", "--samples", "100", "--device", "cpu"]) == 1
    assert capsys.readouterr().err.strip() == ("error: give --epochs of at least 1 and --samples of at least "
                                               "4 batches (256)")
    assert main(["--size", "56", "--device", "tpu"]) == 1
    assert "unknown device 'tpu'" in capsys.readouterr().err
