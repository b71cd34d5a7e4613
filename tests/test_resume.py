"""A run that survives its director, end to end: a real director and envoys, the notebook headless.

The director is SIGKILLed after round 2 of 4 (tests/saboteur holds it there, so that no envoy is mid-way through
round 3 when it dies) and the run resumes from its checkpoint: on the same port with the same envoys, which stay up
and register again by themselves, or with `make demo resume_from=...` on a new federation. The resumed run must
train the same models as one never interrupted: bit for bit for FedAvg and FedAdam on CPU; under DP-SGD (whose
noise is not seeded) with the same privacy spent, per envoy.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.slow
SIZES = {"train": 300, "val": 60, "test": 60}
ROUNDS, KILL_AFTER = 4, 2
SABOTEUR = str(ROOT / "tests" / "saboteur")
CI = os.environ.get("CI") == "true"


@pytest.fixture(scope="module")
def data_dir(tiny_file):
    return tiny_file("bloodmnist", 28, SIZES).parent


def _checkpoint_round(run_dir: Path) -> int:
    try:
        return torch.load(run_dir / "checkpoint.pt", weights_only=True)["round"]
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0  # none yet


class _KillWhenCheckpointed(threading.Thread):
    """SIGKILL the director (kill()) once run_dir's checkpoint is of round KILL_AFTER; join() raises what kill()
    raised."""

    def __init__(self, run_dir: Path, kill, timeout: float = 240):
        super().__init__(daemon=True)
        self.run_dir, self.kill, self.timeout, self.error = run_dir, kill, timeout, None
        self.start()

    def run(self):
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and _checkpoint_round(self.run_dir) < KILL_AFTER:
            time.sleep(0.2)
        try:
            self.kill()
        except BaseException as exc:  # noqa: BLE001 -- handed to the test's thread
            self.error = exc

    def join(self, timeout=None):
        super().join(timeout)
        if self.error is not None:
            raise self.error


def _same_model(a: Path, b: Path) -> bool:
    first, second = torch.load(a), torch.load(b)
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _scores(results: dict) -> list:
    """Every aggregated metric of every round but the seconds things took."""
    return [{k: v for k, v in e["aggregated"].items() if "seconds" not in k} for e in results["rounds"]]


# --- the director restarted on its port, the envoys staying up ------------------------------------------------
@pytest.fixture(scope="module")
def same_port(data_dir, tmp_path_factory):
    """{algorithm: (reference results, resumed results, resumed run folder, notebook log)}, each pair from one
    federation whose director is killed and restarted."""
    from localfed.run import RunError, local_federation, run_notebook, shard_params
    from localfed.settings import parse

    # FedAdam with local_norms (FedBN's idea: each envoy keeps its BatchNorm layers at home) is one federation for
    # two things a resume must carry over: the server optimizer's moments and each envoy's own layers.
    algorithms = {"fedavg": [], "fedadam_local_norms": ["algorithm=fedadam", "local_norms=true", "partition=scanner"],
                  "dp": ["dp=1", "target_epsilon=8"]}
    done = {}
    for name, extra in algorithms.items():
        if name != "fedavg" and not CI:
            continue
        out = tmp_path_factory.mktemp(f"same-port-{name}")
        settings = parse(["demo", f"data_dir={data_dir}", f"rounds={ROUNDS}", "tls=0", "health_period=2",
                          f"runs={out}", *extra])
        env = {"PYTHONPATH": SABOTEUR, "MEDFL_TEST_DIRECTOR_HOLD": f"killed:{KILL_AFTER}",
               "FX_AGGREGATOR_PATIENCE_S": "5"}  # an envoy leaves the dead director's experiment after 5 s
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            federation = local_federation(settings, out, shard_params(settings, data_dir))
            with federation:
                deadline = time.monotonic() + 600
                run_notebook(out / "reference", federation, settings, "synthetic", deadline)
                killed = out / "killed"
                director = federation.director.process
                watcher = _KillWhenCheckpointed(killed, lambda p=director: os.killpg(p.pid, signal.SIGKILL))
                with pytest.raises(RunError, match="lost the director"):
                    run_notebook(killed, federation, settings, "synthetic", deadline)
                watcher.join()
                federation.restart("director")  # same port; returns once the envoys registered again
                run_notebook(killed, federation, settings.replace(resume_from=str(killed)), "synthetic", deadline)
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        done[name] = tuple(json.loads((out / run / "results.json").read_text()) for run in ("reference", "killed")) \
            + (killed, (killed / "logs" / "notebook-resume1.log").read_text())
    return done


def test_killed_after_round_2_the_run_resumes_on_the_restarted_director_and_trains_the_same_model(same_port):
    reference, resumed, run_dir, log = same_port["fedavg"]
    assert resumed["status"] == "completed" and resumed["error"] is None
    assert [e["round"] for e in resumed["rounds"]] == list(range(ROUNDS + 1))  # 4 training rounds in all
    (restart,) = resumed["restarts"]
    assert restart["after_round"] == KILL_AFTER and "lost the director" in restart["why"]
    assert restart["experiment"] == resumed["attempt"] and resumed["attempt"].startswith("killed-resumed-")
    assert f"resumed: {KILL_AFTER} of {ROUNDS} rounds were trained before" in log
    # The same model, bit for bit, and the same metrics as the run that was never interrupted.
    assert _same_model(Path(resumed["last_model"]), Path(reference["last_model"]))
    assert _same_model(Path(resumed["best_model"]), Path(reference["best_model"]))
    assert _scores(resumed) == _scores(reference)
    assert {k: resumed["test"][k] for k in ("acc", "auc")} == {k: reference["test"][k] for k in ("acc", "auc")}
    assert resumed["best"]["round"] == reference["best"]["round"]
    # The checkpoint went on with the resumed run; each attempt's notebook is kept.
    assert _checkpoint_round(run_dir) == ROUNDS
    assert (run_dir / "notebook.ipynb").is_file() and (run_dir / "notebook-resume1.ipynb").is_file()


@pytest.mark.skipif(not CI, reason="a federation of its own (about a minute): runs when CI=true")
def test_each_envoy_s_own_normalization_layers_survive_the_restart_on_its_disk(same_port):
    reference, resumed, run_dir, _ = same_port["fedadam_local_norms"]
    assert resumed["status"] == "completed" and resumed["restarts"][0]["after_round"] == KILL_AFTER
    # Each envoy started the resumed experiment from its own layers of round 2, kept on its disk.
    for envoy in ("envoy_1", "envoy_2"):
        log = next(run_dir.parent.glob(f"**/logs/{envoy}.log")).read_text()
        assert f"starts its held-back tensors from its own, of round {KILL_AFTER} of run killed" in log, envoy
    assert {k: resumed["test"][k] for k in ("acc", "auc")} == {k: reference["test"][k] for k in ("acc", "auc")}


@pytest.mark.skipif(not CI, reason="a federation of its own (about a minute): runs when CI=true")
def test_fedadam_s_moments_survive_the_restart(same_port):
    reference, resumed, _, _ = same_port["fedadam_local_norms"]
    assert resumed["algorithm"]["name"] == "fedadam" and resumed["algorithm"]["local_norms"] is True
    assert resumed["restarts"][0]["after_round"] == KILL_AFTER
    # Bit for bit: the moments the director keeps, and the layers each envoy keeps, both came back.
    assert _same_model(Path(resumed["last_model"]), Path(reference["last_model"]))
    assert _scores(resumed) == _scores(reference)


@pytest.mark.skipif(not CI, reason="a federation of its own (about a minute): runs when CI=true")
def test_under_dp_sgd_each_envoy_reports_the_privacy_spent_over_both_attempts(same_port):
    reference, resumed, _, log = same_port["dp"]
    assert resumed["status"] == "completed"
    spent, expected = resumed["privacy"]["per_envoy"], reference["privacy"]["per_envoy"]
    assert sorted(spent) == sorted(expected) == ["envoy_1", "envoy_2"]
    for envoy in expected:
        # What the envoy's ledger kept from the first attempt, plus the rounds resumed: the uninterrupted run's.
        assert spent[envoy]["epsilon"] == pytest.approx(expected[envoy]["epsilon"], rel=1e-9)
        assert 0 < spent[envoy]["epsilon_before"] < spent[envoy]["epsilon"]
        # Round by round too: never lower than the uninterrupted run's.
        for mine, theirs in zip(resumed["rounds"][1:], reference["rounds"][1:], strict=True):
            assert mine["envoys"][envoy]["epsilon"] >= theirs["envoys"][envoy]["epsilon"] * (1 - 1e-9)
    assert "over all attempts of this run" in resumed["privacy"]["summary"]


# --- make demo resume_from=... on a new federation ---------------------------------------------------------------
def _director_of(pid: int) -> int:
    """The process id of the director that the make demo process `pid` started (its descendant)."""
    table = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]),
                                      (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (ValueError, OSError):
            continue  # not a process, or gone
    frontier, found = [pid], []
    while frontier:
        parent = frontier.pop()
        for child, (ppid, command) in table.items():
            if ppid == parent:
                frontier.append(child)
                if "node director start" in command:
                    found.append(child)
    assert len(found) == 1, found
    return found[0]


def _demo(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "localfed", "demo", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.skipif(not CI, reason="two federations of its own (about 45 s): runs when CI=true")
def test_make_demo_resume_finishes_a_run_whose_director_was_killed(data_dir, same_port, tmp_path):
    reference = same_port["fedavg"][0]
    given = [f"data_dir={data_dir}", f"rounds={ROUNDS}", "tls=0", "health_period=2", "timeout=300"]
    runs, output = tmp_path / "runs", tmp_path / "demo.err"
    with open(output, "w") as err:  # files, not pipes: nothing reads a pipe while the test waits
        demo = subprocess.Popen([sys.executable, "-m", "localfed", "demo", *given, f"runs={runs}"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                                env={**os.environ, "PYTHONPATH": SABOTEUR,
                                     "MEDFL_TEST_DIRECTOR_HOLD": f"*:{KILL_AFTER}"})
    try:
        deadline = time.monotonic() + 240
        while not list(runs.glob("*/checkpoint.pt")) and time.monotonic() < deadline:
            time.sleep(0.2)
        (run_dir,) = [p.parent for p in runs.glob("*/checkpoint.pt")]
        _KillWhenCheckpointed(run_dir, lambda: os.kill(_director_of(demo.pid), signal.SIGKILL)).join()
        demo.wait(timeout=180)
    finally:
        if demo.poll() is None:  # SIGTERM: it stops its director, envoys and notebook, as on Ctrl-C
            demo.terminate()
            demo.wait(timeout=60)
    stderr = output.read_text()
    assert demo.returncode == 1
    assert f"make demo resume_from={run_dir}" in stderr  # the failure says how to go on
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"

    result = _demo(f"RESUME={run_dir}")  # every other setting as the run was started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming the run in {run_dir}" in result.stdout
    assert f"resumed after round {KILL_AFTER} (" in result.stdout
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed" and results["restarts"][0]["after_round"] == KILL_AFTER
    assert [e["round"] for e in results["rounds"]] == list(range(ROUNDS + 1))
    # Same data, seed and envoys on a new federation: the model the uninterrupted run trained.
    assert _same_model(Path(results["last_model"]), Path(reference["last_model"]))
    assert _scores(results) == _scores(reference)


def test_make_demo_resume_refuses_what_it_cannot_resume_in_one_line(tmp_path, capsys):
    from localfed.__main__ import main

    def refused(*argv) -> str:
        assert main(list(argv)) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "not a run folder of make demo" in refused("demo", f"resume_from={tmp_path / 'nowhere'}")
    assert "not a run folder of make demo" in refused("demo", f"RESUME={tmp_path}")
    (tmp_path / "launcher.json").write_text(json.dumps({"data": "synthetic", "tls": False}))
    assert "no checkpoint.pt there" in refused("demo", f"resume_from={tmp_path}")  # it never finished a round
    assert sorted(p.name for p in tmp_path.iterdir()) == ["launcher.json"]  # nothing written
    assert "resume_from is make demo's" in refused("compare", f"resume_from={tmp_path}")
