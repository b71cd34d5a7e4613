"""The notebook's look at the task: sample images from a local copy of the dataset, never from the envoys."""
import matplotlib
import numpy as np
import pytest

from medfl.researcher.federation import local_copy, read_rows, sample_grid, show_samples

matplotlib.use("Agg")


@pytest.mark.parametrize("flag", ["bloodmnist", "chestmnist", "pneumoniamnist"])
def test_the_grid_shows_each_class_with_its_name(tiny_file, flag):
    import medmnist

    path = tiny_file(flag, 28, {"train": 8, "val": 8, "test": 40})
    with np.load(path) as npz:
        images, labels = npz["test_images"], npz["test_labels"]
    np.testing.assert_array_equal(read_rows(path, "test_images", 5), images[:5])
    np.testing.assert_array_equal(read_rows(path, "test_labels", 10**6), labels)
    fig = sample_grid(flag, 28, path)
    shown = [ax for ax in fig.axes if ax.images]
    names = set(medmnist.INFO[flag]["label"].values())
    assert len(shown) == 2 * min(8, len(names))
    for ax in shown:
        assert ax.get_title() and all(part.rstrip("…") and any(n.startswith(part.rstrip("…")) for n in names)
                                      for part in ax.get_title().split(", "))


def test_synthetic_envoys_get_the_synthetic_stand_in_and_a_missing_copy_one_line(tiny_file, tmp_path, capsys):
    source = tiny_file("bloodmnist")
    (tmp_path / "synthetic").mkdir()
    (tmp_path / "synthetic" / "bloodmnist.npz").write_bytes(source.read_bytes())
    assert local_copy("bloodmnist", 28, tmp_path, synthetic=True) == tmp_path / "synthetic" / "bloodmnist.npz"
    assert local_copy("bloodmnist", 28, tmp_path, synthetic=False) is None  # never a synthetic file for MedMNIST
    show_samples("bloodmnist", 64, False, tmp_path)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no local copy of MedMNIST bloodmnist 64px" in out
