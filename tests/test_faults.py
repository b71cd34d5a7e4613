"""Nodes started in any order, and restarted: an envoy waits for a director that is not up yet, and an
envoy restarted after a crash joins the federation's next experiment."""
import os
import signal
import subprocess
import time

import pytest
import yaml
from notebook_cells import run_until, start_experiment

from conftest import ROOT
from localfed.federation import _listening, free_port, tail

pytestmark = pytest.mark.slow


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


def notebook(fed, tmp_path, monkeypatch, **parameters) -> dict:
    """The notebook's cells up to its task definitions, connected to `fed`; start_experiment() submits."""
    monkeypatch.chdir(ROOT / "workspace")  # the notebook's folder, whose code the experiments ship
    return run_until("validate-task", director_host=fed.host, director_port=fed.port, device="cpu",
                     output_dir=str(tmp_path / "runs"), preview_dir=str(tmp_path), **parameters)


def quietly(experiment, rounds, **kwargs):
    """The notebook's follow(), without its progress lines."""
    from medfl.researcher import follow

    return follow(experiment, rounds, echo=kwargs.pop("echo", lambda line: None), **kwargs)


def wait_until(condition, seconds, failure):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, failure
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


def test_an_envoy_restarted_after_a_crash_registers_again_and_takes_part_in_the_next_experiment(tiny_file, tmp_path,
                                                                                              monkeypatch):
    from openfl.interface.interactive_api.federation import Federation

    from localfed.federation import LocalFederation
    from medmnist_shard.spec import sample_shape, target_shape

    data_dir = tiny_file("bloodmnist").parent
    shards = {f"envoy_{r}": {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir), "rank_worldsize": f"{r},2",
                             "download": False} for r in (1, 2)}
    with LocalFederation(tmp_path, shards, sample_shape("bloodmnist", 28), target_shape("bloodmnist"),
                         health_period=1) as fed:
        crashed = next(c for c in fed.components if c.name == "envoy_2")
        os.killpg(crashed.process.pid, signal.SIGKILL)
        crashed.process.wait()
        federation = Federation(client_id="frontend", director_node_fqdn=fed.host, director_port=fed.port, tls=False)
        deadline = time.monotonic() + 30
        while federation.get_shard_registry()["envoy_2"]["is_online"]:  # the director notices it is gone
            assert time.monotonic() < deadline, "the director still shows the killed envoy online"
            time.sleep(0.5)
        fed.restart("envoy_2")
        cells = notebook(fed, tmp_path, monkeypatch)
        assert all(e["online"] for e in cells["envoys"])
        run = quietly(start_experiment(cells, "after-restart", rounds=1), 1)
        assert run.error is None and not run.dropouts
        assert {m["metric_origin"] for m in run.metrics} == {"envoy_1", "envoy_2", "aggregator"}
        assert (tmp_path / "logs" / f"envoy_2.{crashed.process.pid}.log").exists()  # the crashed run's log is kept


def test_an_envoy_frozen_mid_run_is_dropped_and_once_thawed_leaves_that_run_for_the_next(tiny_file, tmp_path,
                                                                                        monkeypatch):
    """SIGSTOP stands for a hung host or a cut cable: the run goes on without the envoy; when it comes back,
    its experiment's aggregator is gone, and instead of retrying forever (OpenFL) it waits for the next one."""
    from localfed.federation import LocalFederation
    from medfl import Best
    from medmnist_shard.spec import sample_shape, target_shape

    monkeypatch.setenv("FX_AGGREGATOR_PATIENCE_S", "3")  # the envoys' patience with a silent aggregator
    data_dir = tiny_file("bloodmnist", 28, {"train": 600, "val": 40, "test": 40}).parent
    shards = {f"envoy_{r}": {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir), "rank_worldsize": f"{r},2",
                             "download": False} for r in (1, 2)}
    with LocalFederation(tmp_path, shards, sample_shape("bloodmnist", 28), target_shape("bloodmnist"),
                         health_period=1) as fed:
        frozen = next(c for c in fed.components if c.name == "envoy_2")
        aggregator_port = free_port()
        cells = notebook(fed, tmp_path, monkeypatch, aggregator_port=aggregator_port)

        def freeze_on_round_1(line):
            if line.startswith("round 1/") and frozen.process.poll() is None:
                os.killpg(frozen.process.pid, signal.SIGSTOP)

        experiment = start_experiment(cells, "frozen", rounds=3)
        try:
            run = quietly(experiment, 3, best=Best(), on_new_best=experiment.get_best_model, echo=freeze_on_round_1)
            assert run.error is None and [d["envoy"] for d in run.dropouts] == ["envoy_2"]
            assert run.best_model is not None and experiment.get_last_model() is not None
            wait_until(lambda: not _listening(fed.host, aggregator_port), 10, "the aggregator did not stop")
        finally:
            os.killpg(frozen.process.pid, signal.SIGCONT)
        wait_until(lambda: "has not answered for 3 s" in frozen.log.read_text(errors="replace"), 30, tail(frozen.log))
        test = quietly(start_experiment(cells, "after-thaw", rounds=1), 1)
        assert test.error is None and {m["metric_origin"] for m in test.metrics} >= {"envoy_1", "envoy_2"}


def test_an_envoy_restarted_during_an_experiment_leaves_it_and_joins_the_next(tiny_file, tmp_path, monkeypatch):
    """Back before the director missed it, a restarted envoy has lost its part of the running experiment:
    the experiment goes on without it at once, and the envoy takes part in the next one."""
    from localfed.federation import LocalFederation
    from medmnist_shard.spec import sample_shape, target_shape

    data_dir = tiny_file("bloodmnist", 28, {"train": 600, "val": 40, "test": 40}).parent
    shards = {f"envoy_{r}": {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir), "rank_worldsize": f"{r},2",
                             "download": False} for r in (1, 2)}
    # A long health period (lost after 60 s): the restarted envoy is back long before it would count as lost, even
    # on a loaded machine where starting one takes 20 s.
    with LocalFederation(tmp_path, shards, sample_shape("bloodmnist", 28), target_shape("bloodmnist"),
                         health_period=30) as fed:
        cells = notebook(fed, tmp_path, monkeypatch)
        restarted = []

        def crash_and_restart_in_round_2(line):
            if line.startswith("round 2/") and not restarted:
                crashed = next(c for c in fed.components if c.name == "envoy_2")
                os.killpg(crashed.process.pid, signal.SIGKILL)
                crashed.process.wait()
                restarted.append(time.monotonic())
                fed.restart("envoy_2")

        run = quietly(start_experiment(cells, "restart", rounds=4), 4, echo=crash_and_restart_in_round_2)
        assert restarted and run.error is None
        assert [(d["envoy"], d["reason"]) for d in run.dropouts] == \
            [("envoy_2", "it restarted during the experiment; it joins the next one")]
        assert run.dropouts[0]["round"] in (2, 3)
        test = quietly(start_experiment(cells, "after-restart", rounds=1), 1)
        assert test.error is None and {m["metric_origin"] for m in test.metrics} >= {"envoy_1", "envoy_2"}


def _interrupt(component, seconds=5):
    """Ctrl-C a node as a terminal would (SIGINT); return how long it took to exit, and the end of its log."""
    started = time.monotonic()
    component.process.send_signal(signal.SIGINT)
    component.process.wait(timeout=30)
    return time.monotonic() - started, component.log.read_text(errors="replace")


def test_one_ctrl_c_stops_an_idle_envoy_a_busy_one_and_the_director_in_one_line(tiny_file, tmp_path, monkeypatch):
    from localfed.federation import LocalFederation
    from medmnist_shard.spec import sample_shape, target_shape

    data_dir = tiny_file("bloodmnist", 28, {"train": 2000, "val": 40, "test": 40}).parent
    shards = {f"envoy_{r}": {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir), "rank_worldsize": f"{r},3",
                             "download": False} for r in (1, 2, 3)}
    with LocalFederation(tmp_path, shards, sample_shape("bloodmnist", 28), target_shape("bloodmnist"),
                         health_period=1) as fed:
        idle = next(c for c in fed.components if c.name == "envoy_3")
        took, log = _interrupt(idle)
        assert took < 5 and log.rstrip().endswith("envoy envoy_3 stopped (Ctrl-C)") and "Traceback" not in log
        assert idle.process.returncode == 130
        busy = next(c for c in fed.components if c.name == "envoy_2")
        cells = notebook(fed, tmp_path, monkeypatch, min_envoys=1)
        interrupted = []

        def interrupt_in_round_2(line):
            if line.startswith("round 2/") and not interrupted:
                interrupted.append(_interrupt(busy))

        quietly(start_experiment(cells, "busy", rounds=3), 3, echo=interrupt_in_round_2)
        (took, log), = interrupted
        assert took < 5 and log.rstrip().endswith("envoy envoy_2 stopped (Ctrl-C)") and "Traceback" not in log
        took, log = _interrupt(fed.director)
        assert took < 5 and log.rstrip().endswith("director stopped (Ctrl-C)") and "Traceback" not in log
