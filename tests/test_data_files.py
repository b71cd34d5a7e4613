"""Files: the download (against a loopback server), header checks, and loading."""
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from medmnist_shard import files
from medmnist_shard.files import ensure_file, inspect, load_images, load_labels
from medmnist_shard.spec import DataError


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over a folder; yields the base URL."""
    root = tmp_path / "served"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _publish(tiny_file, root: Path) -> tuple[str, bytes]:
    payload = tiny_file("bloodmnist").read_bytes()
    (root / "bloodmnist.npz").write_bytes(payload)
    return hashlib.md5(payload).hexdigest(), payload


def test_download_verifies_md5_and_writes_the_file(server, tiny_file, tmp_path, monkeypatch):
    root, base = server
    md5, payload = _publish(tiny_file, root)
    monkeypatch.setattr(files, "url_and_md5", lambda flag, size: (f"{base}/bloodmnist.npz", md5))
    target = ensure_file("bloodmnist", 28, tmp_path / "data")
    assert target == tmp_path / "data" / "bloodmnist.npz"
    assert target.read_bytes() == payload
    assert sorted(p.name for p in target.parent.iterdir()) == ["bloodmnist.npz"]  # no partial left
    assert ensure_file("bloodmnist", 28, tmp_path / "data") == target  # present: no second download


def test_md5_mismatch_leaves_nothing_behind(server, tiny_file, tmp_path, monkeypatch):
    root, base = server
    _publish(tiny_file, root)
    monkeypatch.setattr(files, "url_and_md5", lambda flag, size: (f"{base}/bloodmnist.npz", "0" * 32))
    with pytest.raises(DataError, match="corrupt .*MD5.*expected 0000"):
        ensure_file("bloodmnist", 28, tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []


def test_offline_error_names_url_path_and_synthetic_option(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/bloodmnist_64.npz"
    monkeypatch.setattr(files, "url_and_md5", lambda flag, size: (url, "x"))
    with pytest.raises(DataError) as err:
        ensure_file("bloodmnist", 64, tmp_path / "data")
    message = str(err.value)
    assert url in message
    assert str(tmp_path / "data" / "bloodmnist_64.npz") in message
    assert "make-synthetic bloodmnist --size 64" in message
    assert list((tmp_path / "data").iterdir()) == []


def test_http_error_is_a_clear_error(server, tmp_path, monkeypatch):
    _, base = server
    monkeypatch.setattr(files, "url_and_md5", lambda flag, size: (f"{base}/nothing.npz", "x"))
    with pytest.raises(DataError, match="cannot download .*nothing.npz.*HTTP 404"):
        ensure_file("bloodmnist", 28, tmp_path / "data")


def test_missing_file_without_download(tmp_path):
    with pytest.raises(DataError, match="missing .*bloodmnist.npz.*make-synthetic"):
        ensure_file("bloodmnist", 28, tmp_path, allow_download=False)


def test_inspect_reads_split_sizes_from_headers(tiny_file):
    assert inspect(tiny_file("octmnist"), "octmnist", 28) == {"train": 24, "val": 12, "test": 12}


def _write(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _arrays(n=4, size=28, channels=3, width=1):
    shape = (n, size, size, channels) if channels > 1 else (n, size, size)
    out = {}
    for split in ("train", "val", "test"):
        out[f"{split}_images"] = np.zeros(shape, np.uint8)
        out[f"{split}_labels"] = np.zeros((n, width), np.uint8)
    return out


def test_missing_keys_are_named(tmp_path):
    arrays = _arrays()
    del arrays["val_labels"], arrays["test_images"]
    with pytest.raises(DataError, match="lacks val_labels, test_images"):
        inspect(_write(tmp_path / "b.npz", **arrays), "bloodmnist", 28)


def test_image_and_label_counts_must_agree(tmp_path):
    arrays = _arrays()
    arrays["train_labels"] = np.zeros((3, 1), np.uint8)
    with pytest.raises(DataError, match="train has 4 images but 3 labels"):
        inspect(_write(tmp_path / "b.npz", **arrays), "bloodmnist", 28)


def test_wrong_image_size_suggests_checking_the_size(tmp_path):
    with pytest.raises(DataError, match="expected uint8 .*64, 64, 3.*is the size right"):
        inspect(_write(tmp_path / "b.npz", **_arrays(size=28)), "bloodmnist", 64)


def test_wrong_label_width(tmp_path):
    with pytest.raises(DataError, match=r"labels has shape \(4, 1\), expected \(N, 14\)"):
        inspect(_write(tmp_path / "c.npz", **_arrays(channels=1)), "chestmnist", 28)


def test_truncated_file_is_reported_as_corrupt(tiny_file, tmp_path):
    payload = tiny_file("bloodmnist").read_bytes()
    broken = tmp_path / "bloodmnist.npz"
    broken.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError, match="corrupt or truncated.*delete it"):
        inspect(broken, "bloodmnist", 28)


def test_loading_adds_the_channel_axis_and_keeps_uint8(tiny_file):
    images = load_images(tiny_file("pneumoniamnist"), "val")
    labels = load_labels(tiny_file("pneumoniamnist"), "val", "pneumoniamnist")
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.uint8
    assert labels.shape == (12, 1)
