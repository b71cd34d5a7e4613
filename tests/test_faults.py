"""Nodes started in any order: an envoy waits for a director that is not up yet."""
import os
import signal
import subprocess
import time

import yaml

from conftest import ROOT
from localfed import free_port


def _start(command, env, log):
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True)


def _wait_for(log, text, process, seconds):
    deadline = time.monotonic() + seconds
    while text not in log.read_text(errors="replace"):
        assert process.poll() is None, f"exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {seconds} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def test_an_envoy_started_first_waits_for_the_director_and_joins(tiny_file, tmp_path):
    port = free_port()
    envoy_dir, director_dir = tmp_path / "envoy_1", tmp_path / "director"
    envoy_dir.mkdir()
    director_dir.mkdir()
    (envoy_dir / "envoy_config.yaml").write_text(yaml.safe_dump({
        "params": {"install_requirements": False},
        "shard_descriptor": {"template": "medmnist_shard.MedMNISTShardDescriptor",
                             "params": {"flag": "bloodmnist", "size": 28, "download": False,
                                        "data_dir": str(tiny_file("bloodmnist").parent)}}}))
    (director_dir / "director_config.yaml").write_text((ROOT / "director" / "director_config.yaml").read_text())
    env = {"DIRECTOR_HOST": "localhost", "DIRECTOR_PORT": str(port), "CERTS": ""}
    processes = []
    try:
        config = str(envoy_dir / "envoy_config.yaml")
        envoy = _start(["bash", str(ROOT / "envoy" / "start_envoy.sh"), "envoy_1", config], env, tmp_path / "envoy.log")
        processes.append(envoy)
        _wait_for(tmp_path / "envoy.log", "No director answers yet (connection refused)", envoy, 60)
        director = _start(["bash", str(ROOT / "director" / "start_director.sh")],
                          {**env, "DIRECTOR_CONFIG": str(director_dir / "director_config.yaml")},
                          tmp_path / "director.log")
        processes.append(director)
        _wait_for(tmp_path / "envoy.log", "Shard was accepted by director", envoy, 60)
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
