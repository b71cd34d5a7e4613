"""Files: the download (against a loopback server), header checks, and loading."""
import hashlib
import http.server
import shutil
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medmnist_shard import files
from medmnist_shard.files import ensure_file, inspect, load_images, load_labels
from medmnist_shard.spec import DataError


class Behaviour:
    """How the loopback server answers: Range honoured or not, responses cut short, errors."""

    def __init__(self):
        self.honour_range = True
        self.cuts = {}  # request number (from 1) -> bytes of its response sent before the connection drops
        self.errors = {}  # request number -> the HTTP error status it gets
        self.requests = []  # (path, Range header or None) of every request


@pytest.fixture
def server(tmp_path):
    """A loopback HTTP server over a folder that understands Range; yields (folder, base URL, behaviour)."""
    root = tmp_path / "served"
    root.mkdir()
    behaviour = Behaviour()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            asked = self.headers.get("Range")
            behaviour.requests.append((self.path, asked))
            number = len(behaviour.requests)
            file = root / self.path.lstrip("/")
            if number in behaviour.errors:
                self.send_error(behaviour.errors[number])
                return
            if not file.is_file():
                self.send_error(404)
                return
            body = file.read_bytes()
            start = int(asked.removeprefix("bytes=").rstrip("-")) if asked and behaviour.honour_range else 0
            if start >= len(body) > 0:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            cut = behaviour.cuts.get(number)
            self.wfile.write(body[start:] if cut is None else body[start:start + cut])
            self.close_connection = True  # HTTP/1.0: a cut response ends with the connection

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", behaviour
    httpd.shutdown()
    httpd.server_close()


def _publish(tiny_file, root: Path) -> tuple[str, bytes]:
    payload = tiny_file("bloodmnist").read_bytes()
    (root / "bloodmnist.npz").write_bytes(payload)
    return hashlib.md5(payload).hexdigest(), payload


def test_download_verifies_md5_and_writes_the_file(server, tiny_file, tmp_path, monkeypatch):
    root, base, _ = server
    md5, payload = _publish(tiny_file, root)
    monkeypatch.setattr(files, "url_and_md5", lambda flag, size: (f"{base}/bloodmnist.npz", md5))
    target = ensure_file("bloodmnist", 28, tmp_path / "data")
    assert target == tmp_path / "data" / "bloodmnist.npz"
    assert target.read_bytes() == payload
    assert sorted(p.name for p in target.parent.iterdir()) == ["bloodmnist.npz"]  # no partial left
    assert ensure_file("bloodmnist", 28, tmp_path / "data") == target  # present: no second download


def test_md5_mismatch_leaves_nothing_behind(server, tiny_file, tmp_path, monkeypatch):
    root, base, _ = server
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
    _, base, _ = server
    monkeypatch.setattr(files, "url_and_md5", lambda flag, size: (f"{base}/nothing.npz", "x"))
    with pytest.raises(DataError, match="cannot download .*nothing.npz.*HTTP 404"):
        ensure_file("bloodmnist", 28, tmp_path / "data")


def _serve(server, tiny_file, monkeypatch, md5=None) -> tuple[bytes, Behaviour, str]:
    root, base, behaviour = server
    real_md5, payload = _publish(tiny_file, root)
    monkeypatch.setattr(files, "url_and_md5", lambda flag, size: (f"{base}/bloodmnist.npz", md5 or real_md5))
    monkeypatch.setattr(files, "RETRY_PAUSE_S", 0.01)
    return payload, behaviour, real_md5


def _only_the_file(folder: Path):
    assert sorted(p.name for p in folder.iterdir()) == ["bloodmnist.npz"]  # no partial file left


def test_a_dropped_connection_resumes_with_a_range_request(server, tiny_file, tmp_path, monkeypatch):
    payload, behaviour, _ = _serve(server, tiny_file, monkeypatch)
    half = len(payload) // 2
    behaviour.cuts = {1: half}
    target = ensure_file("bloodmnist", 28, tmp_path / "data")
    assert target.read_bytes() == payload  # and its MD5 was checked, or ensure_file would have raised
    assert behaviour.requests == [("/bloodmnist.npz", None), ("/bloodmnist.npz", f"bytes={half}-")]
    _only_the_file(target.parent)


def test_a_server_that_ignores_range_still_gives_the_right_file(server, tiny_file, tmp_path, monkeypatch):
    payload, behaviour, _ = _serve(server, tiny_file, monkeypatch)
    behaviour.honour_range = False
    behaviour.cuts = {1: len(payload) // 3}
    target = ensure_file("bloodmnist", 28, tmp_path / "data")
    assert target.read_bytes() == payload
    assert [r for _, r in behaviour.requests] == [None, f"bytes={len(payload) // 3}-"]  # answered with 200
    _only_the_file(target.parent)


def test_an_interrupted_download_is_kept_and_the_next_run_resumes_it(server, tiny_file, tmp_path, monkeypatch):
    payload, behaviour, md5 = _serve(server, tiny_file, monkeypatch)
    half = len(payload) // 2
    behaviour.cuts, behaviour.errors = {1: half}, {2: 503}  # the reconnection after the cut fails too
    with pytest.raises(DataError) as err:
        ensure_file("bloodmnist", 28, tmp_path / "data")
    partial = tmp_path / "data" / f".bloodmnist.npz.{md5}.part"
    assert "HTTP 503" in str(err.value) and f"kept in {partial}; run again to resume" in str(err.value)
    assert partial.read_bytes() == payload[:half] and not (tmp_path / "data" / "bloodmnist.npz").exists()
    target = ensure_file("bloodmnist", 28, tmp_path / "data")
    assert target.read_bytes() == payload
    assert behaviour.requests[-1] == ("/bloodmnist.npz", f"bytes={half}-")
    _only_the_file(target.parent)


def test_resumed_bytes_that_spoil_the_md5_are_fetched_again(server, tiny_file, tmp_path, monkeypatch):
    payload, behaviour, md5 = _serve(server, tiny_file, monkeypatch)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / f".bloodmnist.npz.{md5}.part").write_bytes(b"x" * 100)  # not the file's first bytes
    target = ensure_file("bloodmnist", 28, tmp_path / "data")
    assert target.read_bytes() == payload
    assert [r for _, r in behaviour.requests] == ["bytes=100-", None]
    _only_the_file(target.parent)


def test_a_partial_file_as_long_as_the_file_starts_over(server, tiny_file, tmp_path, monkeypatch):
    payload, behaviour, md5 = _serve(server, tiny_file, monkeypatch)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / f".bloodmnist.npz.{md5}.part").write_bytes(b"x" * len(payload))
    target = ensure_file("bloodmnist", 28, tmp_path / "data")
    assert target.read_bytes() == payload
    assert [r for _, r in behaviour.requests] == [f"bytes={len(payload)}-", None]  # 416, then the whole file


def test_too_little_disk_space_stops_before_any_byte_is_written(server, tiny_file, tmp_path, monkeypatch):
    payload, behaviour, _ = _serve(server, tiny_file, monkeypatch)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: SimpleNamespace(free=1000))
    with pytest.raises(DataError) as err:
        ensure_file("bloodmnist", 28, tmp_path / "data")
    assert str(err.value).splitlines() == [
        f"not enough disk space to download bloodmnist.npz into {tmp_path / 'data'}: it needs {len(payload)} "
        "bytes, 1000 bytes is free. Free some space there or choose another data_dir"]
    assert list((tmp_path / "data").iterdir()) == []


def test_the_progress_bar_shows_bytes_and_rate(server, tiny_file, tmp_path, monkeypatch, capsys):
    _serve(server, tiny_file, monkeypatch)
    files.download("bloodmnist", 28, tmp_path / "data", progress=True)
    shown = capsys.readouterr().err
    assert "downloading http://127.0.0.1:" in shown and "bloodmnist.npz" in shown
    assert "100%" in shown and "B/s" in shown


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
