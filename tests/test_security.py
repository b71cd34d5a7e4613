"""Who can make a node run code: roles in certificates, the director's gates, signed experiments, each envoy's
trusted researchers, and plaintext only on loopback. Every refusal ends in one clear line, never a hang."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from notebook_cells import run_until, start_experiment

import roots
from conftest import ROOT
from localfed.federation import LocalFederation, free_port, tail
from security import certs as pki_tools
from security import signing, trust
from security.plaintext import is_loopback

ENVOYS = ["envoy_1", "envoy_2", "envoy_3"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    pki_tools.make(root / "good", envoys=ENVOYS, researchers=["alice", "bob"])
    pki_tools.make(root / "other", envoys=[], researchers=["alice"])
    return root


# --- certificates and signatures, in one process ------------------------------------------------------------------
def test_every_certificate_carries_its_role_and_check_shows_it(pki, capsys):
    roles = {n: pki_tools.identity(pki_tools.check(None, pki / "good" / f"{n}.crt", pki / "good" / f"{n}.key",
                                                 pki / "good" / "ca.crt"))[1]
             for n in ("director", "envoy_1", "alice", "bob")}
    assert roles == {"director": "director", "envoy_1": "envoy", "alice": "researcher", "bob": "researcher"}
    good = pki / "good"
    assert pki_tools.main(["check", "--role", "researcher", "--cert", str(good / "alice.crt"), "--key",
                          str(good / "alice.key"), "--ca", str(good / "ca.crt")]) == 0
    assert "alice, a researcher's certificate, valid until" in capsys.readouterr().out
    assert pki_tools.main(["check", "--role", "researcher", "--cert", str(good / "envoy_1.crt"), "--key",
                          str(good / "envoy_1.key"), "--ca", str(good / "ca.crt")]) == 2
    assert "is an envoy's certificate, not a researcher's" in capsys.readouterr().err
    with pytest.raises(pki_tools.CertError, match="envoy_1: a researcher needs a name no envoy"):
        pki_tools.make(pki / "good", envoys=ENVOYS, researchers=["envoy_1"])


def _archive(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _ca(pki, which="good"):
    from cryptography import x509

    return x509.load_pem_x509_certificate((pki / which / "ca.crt").read_bytes())


def _signed(tmp_path, pki, signer="alice", experiment="exp", which="good"):
    path = _archive(tmp_path / f"{signer}-{experiment}.zip", {"plan/plan.yaml": b"x: 1", "medfl/tasks.py": b"pass\n"})
    signing.sign(path, experiment, pki / which / f"{signer}.crt", pki / which / f"{signer}.key")
    return path


def test_a_signed_archive_verifies_and_names_its_signer(tmp_path, pki):
    cert = signing.verify(_signed(tmp_path, pki), "exp", _ca(pki))
    assert pki_tools.identity(cert) == ("alice", "researcher")


def test_the_notebook_signs_with_certificate_paths_relative_to_its_folder(tmp_path, pki, monkeypatch):
    """submission() packs in a temporary copy of the folder; `../certs/alice.key` must still mean the notebook's."""
    from openfl.interface.interactive_api.experiment import FLExperiment

    from medfl.researcher.submit import submission

    (tmp_path / "certs").mkdir()
    for name in ("alice.crt", "alice.key"):
        (tmp_path / "certs" / name).write_bytes((pki / "good" / name).read_bytes())
    (tmp_path / "workspace").mkdir()
    monkeypatch.chdir(tmp_path / "workspace")

    def pack(experiment):  # what OpenFL's packing leaves for the signature: the archive, in the staged copy
        experiment.arch_path = str(_archive(Path.cwd().parent / "packed.zip", {"plan/plan.yaml": b"x: 1"}))

    monkeypatch.setattr(FLExperiment, "prepare_workspace_distribution", pack)
    experiment = SimpleNamespace(experiment_name="relative")
    with submission("../certs/alice.crt", "../certs/alice.key"):
        FLExperiment.prepare_workspace_distribution(experiment)
        assert Path.cwd() != tmp_path / "workspace"
        cert = signing.verify(Path(experiment.arch_path), "relative", _ca(pki))
    assert pki_tools.identity(cert) == ("alice", "researcher")


@pytest.mark.parametrize("case,message", [
    ("unsigned", "the archive is not signed"),
    ("altered", "does not match its content: it was altered after signing"),
    ("added", "does not match its content"),
    ("renamed", "signed for another experiment"),
    ("other CA", "whose certificate is not from this federation's CA"),
    ("envoy", "whose certificate is not a researcher's"),
    ("traversal", "a path outside its folder"),
    ("not a zip", "cannot be read as a signed zip"),
])
def test_archives_that_must_not_run_are_refused_unopened(tmp_path, pki, case, message):
    path, name = _signed(tmp_path, pki), "exp"
    if case == "unsigned":
        path = _archive(tmp_path / "plain.zip", {"plan/plan.yaml": b"x: 1"})
    elif case in ("altered", "added", "traversal"):
        with zipfile.ZipFile(path) as archive:
            members = {i.filename: archive.read(i) for i in archive.infolist()}
        if case == "altered":
            members["medfl/tasks.py"] += b"import os\n"
        else:
            members["../outside.py" if case == "traversal" else "medfl/extra.py"] = b"import os\n"
        path = _archive(tmp_path / "rewritten.zip", members)
    elif case == "renamed":
        name = "another-experiment"
    elif case == "other CA":
        path = _signed(tmp_path, pki, which="other")
    elif case == "envoy":
        path = _signed(tmp_path, pki, signer="envoy_1")
    else:
        path.write_bytes(b"not a zip")
    with pytest.raises(signing.Refused, match=message):
        signing.verify(path, name, _ca(pki))


def test_an_archive_is_hashed_as_it_arrives_and_a_broken_chunk_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parts = [b"PK\x03\x04", os.urandom(5000), b"", b"end"]
    path, sha256, size = trust._received(SimpleNamespace(npbytes=p, size=len(p)) for p in parts)
    assert path.read_bytes() == b"".join(parts) and size == len(b"".join(parts))
    assert sha256 == hashlib.sha256(b"".join(parts)).hexdigest()
    broken = [SimpleNamespace(npbytes=b"abc", size=3), SimpleNamespace(npbytes=b"de", size=5)]
    with pytest.raises(trust.Refused, match="the archive arrived broken"):
        trust._received(iter(broken))
    assert [f.name for f in tmp_path.iterdir()] == [path.name]  # the broken one is gone


def test_plaintext_is_for_loopback_only(tmp_path):
    assert is_loopback("localhost") and is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("no-such-host.invalid")
    config = tmp_path / "director_config.yaml"
    config.write_text((ROOT / "director" / "director_config.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("CERTS", "ALLOW_PLAINTEXT")}
    for script, args, extra in (("director/start_director.sh", [], {"DIRECTOR_HOST": "0.0.0.0",
                                                                     "DIRECTOR_CONFIG": str(config)}),
                                ("envoy/start_envoy.sh", ["envoy_1", str(ROOT / "envoy" / "envoy_config_1.yaml")],
                                 {"DIRECTOR_HOST": "10.1.2.3"})):
        result = subprocess.run(["bash", str(ROOT / script), *args], env={**env, **extra}, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
        assert "without TLS" in result.stderr and "make certs" in result.stderr and "ALLOW_PLAINTEXT=1" in result.stderr
    # With the escape hatch the check passes, warning (the start scripts run it first).
    allowed = subprocess.run([sys.executable, "-m", "security", "check-plaintext", "envoy", "10.1.2.3"],
                             env={**env, "ALLOW_PLAINTEXT": "1"}, capture_output=True, text=True, timeout=60,
                             cwd=ROOT)
    assert allowed.returncode == 0 and allowed.stderr.startswith("WARNING: the envoy will connect to the director")


# --- a federation of three envoys under mutual TLS: envoy_3 trusts only bob ----------------------------------------
@pytest.fixture(scope="module")
def federation(pki, tmp_path_factory, tiny_file):
    data_dir = tiny_file("bloodmnist", 28, {"train": 90, "val": 30, "test": 30}).parent
    shards = {name: {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir), "rank_worldsize": f"{r},3",
                     "download": False} for r, name in enumerate(ENVOYS, 1)}
    with LocalFederation(tmp_path_factory.mktemp("secure"), shards, [28, 28, 3], [1], pki / "good",
                         policies={"envoy_3": {"researchers": ["bob"]}}) as fed:
        yield fed


def notebook_as(who, fed, pki, tmp_path, **parameters):
    """The notebook's cells up to its tasks, with `who`'s certificate and key."""
    good = pki / "good"
    return run_until("validate-task", director_host=fed.host, director_port=fed.port, ca_cert=str(good / "ca.crt"),
                     api_cert=str(good / f"{who}.crt"), api_key=str(good / f"{who}.key"), device="cpu",
                     output_dir=str(tmp_path / "runs"), preview_dir=str(tmp_path), **parameters)


@pytest.fixture(scope="module")
def alice_run(federation, pki, tmp_path_factory):
    """alice submits a 1-round experiment with the notebook's own cells; envoy_3 does not trust her."""
    from medfl.researcher import follow

    tmp = tmp_path_factory.mktemp("alice")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT / "workspace")
        cells = notebook_as("alice", federation, pki, tmp)
        run = follow(start_experiment(cells, "alice-exp", rounds=1), 1, echo=lambda line: None)
    return cells, run


@pytest.mark.slow
def test_a_researcher_runs_an_experiment_on_the_envoys_that_trust_her(alice_run, federation):
    _, run = alice_run
    assert run.error is None
    assert {m["metric_origin"] for m in run.metrics} == {"envoy_1", "envoy_2", "aggregator"}
    for name in ("envoy_1", "envoy_2"):
        log = next(c for c in federation.components if c.name == name).log.read_text()
        assert "Accepted experiment alice-exp from alice: archive SHA-256" in log


@pytest.mark.slow
def test_an_envoy_refuses_a_researcher_it_does_not_trust_before_unpacking_anything(alice_run, federation):
    _, run = alice_run
    (dropout,) = run.dropouts
    assert dropout["envoy"] == "envoy_3"
    assert dropout["reason"] == "refused: envoy_3 refuses experiment alice-exp: it is signed by 'alice', and its " \
                                "policy admits only bob"
    envoy_3 = next(c for c in federation.components if c.name == "envoy_3")
    assert "Refused experiment alice-exp" in envoy_3.log.read_text() and envoy_3.process.poll() is None
    leftovers = [p.name for p in envoy_3.log.parent.parent.joinpath("nodes", "envoy_3").iterdir()
                 if p.name not in ("envoy_config.yaml", "state")]
    assert leftovers == [], "envoy_3 kept or unpacked some of the refused experiment"


@pytest.mark.slow
def test_a_second_researcher_cannot_read_the_first_ones_experiment(alice_run, federation, pki, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(ROOT / "workspace")
    bob = notebook_as("bob", federation, pki, tmp_path)["federation"].dir_client
    started = time.monotonic()
    for call in (lambda: bob.get_best_model("alice-exp"), lambda: list(bob.stream_metrics("alice-exp")),
                 lambda: bob.get_experiment_status("alice-exp")):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert refused.value.details() == \
            "experiment alice-exp is not 'bob''s: a researcher sees only the experiments it submitted"
    assert "alice-exp" not in str(bob.get_experiments_list())
    assert time.monotonic() - started < 10
    assert "Refused GetTrainedModel from bob: experiment alice-exp is not 'bob''s" in tail(federation.director.log, 200)


@pytest.mark.slow
@pytest.mark.parametrize("who", ["envoy_1", "director"])
def test_a_node_certificate_cannot_use_the_researcher_api(federation, pki, who):
    from openfl.interface.interactive_api.federation import Federation

    good = pki / "good"
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        Federation(client_id="frontend", director_node_fqdn=federation.host, director_port=federation.port,
                   tls=True, cert_chain=str(good / "ca.crt"), api_cert=str(good / f"{who}.crt"),
                   api_private_key=str(good / f"{who}.key"))
    role = "an envoy's" if who == "envoy_1" else "the director's"
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED and time.monotonic() - started < 10
    assert refused.value.details().startswith(f"GetDatasetInfo is for researchers, and '{who}''s certificate is {role}")
    assert f"Refused GetDatasetInfo from {who}" in tail(federation.director.log, 200)
    # What IPython shows for it: one line.
    assert refused.value._render_traceback_() == [f"DirectorRefused: PERMISSION_DENIED: {refused.value.details()}"]


@pytest.mark.slow
def test_an_envoys_certificate_cannot_submit_an_experiment(federation, pki, tmp_path, monkeypatch):
    import numpy as np
    from openfl.transport.grpc.director_client import DirectorClient

    good = pki / "good"
    client = DirectorClient(client_id="envoy_1", director_host=federation.host, director_port=federation.port,
                            tls=True, root_certificate=str(good / "ca.crt"), private_key=str(good / "envoy_1.key"),
                            certificate=str(good / "envoy_1.crt"))
    archive = _signed(tmp_path, pki, signer="alice", experiment="by-envoy")
    with pytest.raises(grpc.RpcError) as refused:
        client.set_new_experiment("by-envoy", ["envoy_1"], archive, initial_tensor_dict={"w": np.zeros(3, np.float32)})
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details().startswith("SetNewExperiment is for researchers, and 'envoy_1''s certificate")


@pytest.mark.slow
def test_the_director_refuses_an_unsigned_submission(federation, pki, tmp_path, monkeypatch):
    import contextlib

    import medfl.researcher.submit

    monkeypatch.chdir(ROOT / "workspace")
    cells = notebook_as("bob", federation, pki, tmp_path)
    monkeypatch.setattr(medfl.researcher.submit, "signing", lambda cert, key: contextlib.nullcontext())
    with pytest.raises(grpc.RpcError) as refused:
        start_experiment(cells, "unsigned", rounds=1)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "the director refused experiment unsigned: the archive is not signed"


# --- a compromised director: it rewrites the archive the researcher signed ------------------------------------------
def _start(command, env, log, cwd=None):
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True, cwd=cwd)


def _wait_for(log, text, process, seconds=90):
    deadline = time.monotonic() + seconds
    while text not in log.read_text(errors="replace"):
        assert process.poll() is None, f"exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {seconds} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize("mode,message", [("alter", "its signature by 'alice' does not match its content"),
                                          ("strip", "the archive is not signed")])
def test_envoys_refuse_what_a_compromised_director_rewrote(pki, tiny_file, tmp_path, monkeypatch, mode, message):
    import yaml

    from medfl.researcher import follow

    good, port = pki / "good", free_port()
    (tmp_path / "director").mkdir()
    config = tmp_path / "director" / "director_config.yaml"
    config.write_text((ROOT / "director" / "director_config.yaml").read_text())
    envoy_dir = tmp_path / "envoy_1"
    envoy_dir.mkdir()
    (envoy_dir / "envoy_config.yaml").write_text(yaml.safe_dump({
        "params": {"install_requirements": False},
        "shard_descriptor": {"template": "medmnist_shard.MedMNISTShardDescriptor",
                             "params": {"flag": "bloodmnist", "size": 28, "download": False,
                                        "data_dir": str(tiny_file("bloodmnist").parent)}}}))
    env = {"PYTHONPATH": roots.pythonpath("node"), "DYNACONF_SETTINGS__LISTEN_PORT": str(port),
           "DIRECTOR_PORT": str(port), "CERTS": str(good)}
    tls = ["--root-cert-path", str(good / "ca.crt")]
    processes = []
    try:
        director = _start([sys.executable, str(ROOT / "tests" / "compromised_director.py"), mode, "director", "start",
                           *tls, "--private-key-path", str(good / "director.key"), "--public-cert-path",
                           str(good / "director.crt"), "--director-config-path", "director_config.yaml"],
                          env, tmp_path / "director.log", cwd=tmp_path / "director")
        processes.append(director)
        envoy = _start(["bash", str(ROOT / "envoy" / "start_envoy.sh"), "envoy_1",
                        str(envoy_dir / "envoy_config.yaml")], env, tmp_path / "envoy.log")
        processes.append(envoy)
        _wait_for(tmp_path / "envoy.log", "Shard was accepted by director", envoy)
        monkeypatch.chdir(ROOT / "workspace")
        fed = type("Fed", (), {"host": "localhost", "port": port})
        cells = notebook_as("alice", fed, pki, tmp_path, min_envoys=1)
        started = time.monotonic()
        run = follow(start_experiment(cells, f"rewritten-{mode}", rounds=1), 1, echo=lambda line: None)
        assert time.monotonic() - started < 60
        assert run.error.startswith("only 0 of 1 envoys remain") and message in run.error
        _wait_for(tmp_path / "envoy.log", f"Refused experiment rewritten-{mode}, unpacking nothing of it", envoy)
        assert not (envoy_dir / "COMPROMISED").exists()
        # Only its config, and its state: the audit log that records the refusal.
        assert [p.name for p in envoy_dir.iterdir() if p.name not in ("envoy_config.yaml", "state")] == []
        (arrived,) = [json.loads(line) for line in (envoy_dir / "state" / "envoy_1" / "audit.jsonl").open()]
        assert (arrived["decision"], arrived["rule"], arrived["signature"]) == ("refused", "signature", False)
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
