"""Across hosts, for real: a director, two hospitals and a researcher, each a network namespace with its own address,
name, files and certificates, on a bridge of their own; a firewall on the director that admits two ports; a
wide-area profile on the hospitals' links; one hospital's cable cut in the middle of a round, then plugged back.

Runs when CI=true or HOSTS_TEST=1 (`make test-hosts`). Needs root and iproute2, and installs
nftables with apt-get when it runs as root and nft is missing; skips in one line where namespaces cannot be made.
"""
import contextlib
import csv
import json
import os
import statistics
import subprocess
import threading
import time

import pytest

from localfed import netns as hosts
from localfed.bench import run_timing
from localfed.hosts import AGGREGATOR_PORT, DIRECTOR_PORT, HostsFederation
from localfed.netns import HOSPITALS, Network
from medmnist_shard.synthetic import make_synthetic, split_sizes
from openfl_adjustments.network import KEEPALIVE_S

if os.environ.get("CI") != "true" and os.environ.get("HOSTS_TEST") != "1":
    pytest.skip("multi-host test: runs when CI=true or HOSTS_TEST=1 (make test-hosts, as root)",
                allow_module_level=True)
pytestmark = pytest.mark.slow  # make test-pythons leaves it to the default Python

CUT = "hospital-b"  # whose cable is cut
CUT_ENVOY = HOSPITALS[CUT]
CUT_ROUND = 2  # counted from 1, as the notebook shows rounds
PATIENCE_S = 5  # FX_AGGREGATOR_PATIENCE_S: how long an envoy back from the cut retries its lost aggregator
REPORT: list[str] = []
BEFORE: dict[str, int] = {}  # the director's firewall counters before the first experiment


def _install_nftables(request) -> None:
    """nftables, for the firewalls (localfed.netns installs it as root, as in CI), said on the terminal."""
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def say(line):
        with capture.global_and_fixture_disabled():
            print(f"\n{line}")
    hosts.install_nftables(say)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, request):
    _install_nftables(request)
    reason = hosts.unavailable()
    if reason:
        pytest.skip(reason)
    workdir = tmp_path_factory.mktemp("hosts")
    # The README's offline stand-in (make-synthetic bloodmnist: 1,196 training images), one file for both hospitals.
    data = make_synthetic("bloodmnist", 28, workdir / "data", split_sizes("bloodmnist", 0.1), seed=0)
    network = Network(logs=workdir / "logs")
    request.addfinalizer(lambda: _print_report(request))
    network.create()
    fed = HostsFederation(workdir, network, data, env={"FX_AGGREGATOR_PATIENCE_S": str(PATIENCE_S)})
    try:
        REPORT.append(network.describe())
        fed.prepare()
        started = time.monotonic()
        fed.start()
        REPORT.append(f"director and 2 envoys up and registered in {time.monotonic() - started:.0f} s")
        yield fed
    finally:
        fed.stop()
        REPORT.extend(f"wire {host}: {counts}" for host, counts in network.wire_counts().items())
        network.remove()
    assert not any(n.startswith(hosts.PREFIX + network.run_id) for n in _namespaces()), "a namespace was left"
    assert not list(hosts.NETNS_ETC.glob(f"{hosts.PREFIX}{network.run_id}-*")), "an /etc/netns folder was left"


def _namespaces() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()


def _print_report(request) -> None:
    plugins = request.config.pluginmanager
    reporter, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter and REPORT:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line("")
            for line in REPORT:
                reporter.write_line(f"across hosts: {line}")


def _on(fed, host: str, code: str) -> str:
    """Run Python code on a host, in its folder; return what it printed."""
    env = {**os.environ, "PATH": f"{fed.folder(host) / '.venv' / 'bin'}:{os.environ['PATH']}"}  # activated there
    result = subprocess.run(fed.network.command(host, ["python", "-c", code]), capture_output=True, text=True,
                            timeout=60, env=env, cwd=fed.folder(host))
    assert result.returncode == 0, result.stderr
    return result.stdout


CONNECT_TIMES = """import socket, time
times = []
for _ in range(5):
    started = time.perf_counter()
    socket.create_connection(("director", {port}), timeout=5).close()
    times.append(time.perf_counter() - started)
print(min(times))
"""


def test_each_host_has_its_name_its_files_and_only_its_own_certificates(federation):
    fed = federation
    assert _on(fed, "hospital-a", "import socket; print(socket.gethostname(), socket.gethostbyname('director'))") \
        .split() == ["hospital-a", fed.network.address("director")]
    assert not list((fed.workdir / "hosts").rglob("ca.key")), "ca.key left the CA machine"
    own = {"director": "director", **HOSPITALS, "researcher": "researcher"}
    for host, name in own.items():
        certs = sorted(p.name for p in (fed.folder(host) / "certs").iterdir())
        assert certs == sorted(["ca.crt", f"{name}.crt", f"{name}.key"]), host
    roles = {"director": {"director"}, "hospital-a": {"envoy"}, "hospital-b": {"envoy"}, "researcher": {"workspace"}}
    for host, folders in roles.items():
        assert {p for p in ("director", "envoy", "workspace") if (fed.folder(host) / p).exists()} == folders, host


# What OpenFL 1.6's envoy does before each call to the aggregator: a new channel, TCP's and TLS's handshakes.
TLS_CONNECT_TIMES = """import grpc, time
read = lambda path: open(path, "rb").read()
credentials = grpc.ssl_channel_credentials(read("certs/ca.crt"), read("certs/envoy_1.key"), read("certs/envoy_1.crt"))
times = []
for _ in range(5):
    started = time.perf_counter()
    channel = grpc.secure_channel("director:{port}", credentials, options=[("grpc.use_local_subchannel_pool", 1)])
    grpc.channel_ready_future(channel).result(timeout=10)
    times.append(time.perf_counter() - started)
    channel.close()
print(min(times))
"""


def test_the_hospitals_links_carry_the_wide_area_profile(federation):
    fed = federation
    round_trip = 2 * fed.network.profile.delay
    code = CONNECT_TIMES.format(port=DIRECTOR_PORT)
    hospital, researcher = float(_on(fed, "hospital-a", code)), float(_on(fed, "researcher", code))
    REPORT.append(f"TCP connect to the director: {hospital * 1000:.0f} ms from hospital-a, "
                  f"{researcher * 1000:.1f} ms from the researcher")
    # A TCP handshake takes one round trip: the profile's from the hospitals, almost none from the researcher.
    assert round_trip * 0.95 <= hospital < round_trip + 0.1
    assert researcher < round_trip / 2
    tls = float(_on(fed, "hospital-a", TLS_CONNECT_TIMES.format(port=DIRECTOR_PORT)))
    REPORT.append(f"a new TLS channel from hospital-a to the director, ready for calls: {tls * 1000:.0f} ms, "
                  f"{tls / round_trip:.1f} round trips")
    assert tls >= 2 * round_trip * 0.95  # TCP's handshake, then TLS's


def _watch_for(log, text: str, action, stop: threading.Event) -> threading.Thread:
    """Call `action()` once `text` appears in `log`, watching from another thread until `stop` is set."""

    def watch():
        while not stop.is_set():
            if text in log.read_text(errors="replace"):
                action()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv") as rows:
        return [{**m, "round": int(m["round"])} for m in csv.DictReader(rows) if m["experiment"] == "train"]


@pytest.fixture(scope="module")
def cut_run(federation):
    """3 rounds; hospital-b's cable is cut as it starts round 2's training (its envoy says it sends round 2's
    validation of the global model, then trains for 2 epochs)."""
    fed = federation
    cut_at, stop, lines = [], threading.Event(), []
    envoy_log = fed.component(CUT_ENVOY).log
    signal = f"Round {CUT_ROUND - 1}, collaborator {CUT_ENVOY} is sending metric for task aggregated_model_validate"

    def cut():
        fed.network.cut(CUT)
        cut_at.append(time.time())

    BEFORE.update(fed.network.counters("director"))  # the probes above connected too: count from here
    watcher = _watch_for(envoy_log, signal, cut, stop)
    try:
        run_dir = fed.notebook("cut", {"rounds": 3, "epochs": 2, "device": "cpu", "run": {"min_envoys": 1}},
                               on_line=lines.append)
    finally:
        stop.set()
        watcher.join()
    assert cut_at, f"{CUT_ENVOY} never started round {CUT_ROUND}"
    return run_dir, json.loads((run_dir / "results.json").read_text()), lines, cut_at[0]


def test_a_cable_cut_mid_round_drops_that_hospital_and_the_run_finishes_with_the_other(cut_run, federation):
    run_dir, results, lines, cut_at = cut_run
    assert results["status"] == "completed", results["error"]
    (dropout,) = results["dropouts"]
    assert dropout["envoy"] == CUT_ENVOY and dropout["round"] == CUT_ROUND
    assert "the director has not heard from it" in dropout["reason"]
    REPORT.append(f"cut {CUT} in round {CUT_ROUND}: dropped {dropout['time'] - cut_at:.1f} s later "
                  f"({dropout['reason']})")
    assert any(f"{CUT_ENVOY:<11} DROPPED" in line for line in lines)
    trained = {(m["origin"], m["round"]) for m in _metrics(run_dir) if m["task"] == "train"}
    # Rounds count from 0 in OpenFL's metrics: the cut round's and later training came from hospital-a alone.
    assert {("envoy_1", r) for r in range(3)} <= trained
    assert (CUT_ENVOY, CUT_ROUND - 2) in trained and not {(CUT_ENVOY, r) for r in range(CUT_ROUND - 1, 3)} & trained
    assert {("aggregator", r) for r in range(3)} <= trained
    assert list(results["test"]["per_envoy"]) == ["envoy_1"]  # tested while hospital-b was still cut off
    assert federation.component(CUT_ENVOY).process.poll() is None, "the cut hospital's envoy must still run"


@pytest.fixture(scope="module")
def after_restore(cut_run, federation):
    """The cable plugged back in; once the director sees hospital-b again, the next experiment needs both
    envoys (min_envoys=2) for 2 rounds."""
    fed = federation
    # Keep the cable out until keepalive has certainly closed hospital-b's connection to the director (a ping is
    # due within KEEPALIVE_S and gets KEEPALIVE_S to answer). Plugged back sooner, the same TCP connection would
    # simply carry on, and there would be no reconnect to count.
    time.sleep(max(0.0, cut_run[3] + 2 * KEEPALIVE_S + 5 - time.time()))
    fed.network.restore(CUT)
    restored = time.monotonic()
    online = fed.wait_online(list(HOSPITALS.values()), timeout=90)
    REPORT.append(f"{CUT} online again {time.monotonic() - restored:.0f} s after its cable was plugged back in")
    run_dir = fed.notebook("after", {"rounds": 2, "device": "cpu", "run": {"min_envoys": 2}})
    return online, run_dir, json.loads((run_dir / "results.json").read_text())


def test_the_hospital_back_online_takes_part_in_the_next_experiment(after_restore, federation):
    online, run_dir, results = after_restore
    assert online == ["envoy_1", "envoy_2"]
    assert results["status"] == "completed" and not results["dropouts"]
    trained = {(m["origin"], m["round"]) for m in _metrics(run_dir) if m["task"] == "train"}
    assert {(e, r) for e in HOSPITALS.values() for r in range(2)} <= trained
    assert sorted(results["test"]["per_envoy"]) == ["envoy_1", "envoy_2"]
    log = federation.component(CUT_ENVOY).log.read_text(errors="replace")
    assert f"has not answered for {PATIENCE_S} s" in log  # it left the experiment it was cut from, then came back
    timing = run_timing(run_dir)
    REPORT.append(f"round overhead across hosts (rounds 2 and final validation, both hospitals): "
                  f"{', '.join(f'{x:.2f} s' for x in timing['round_overheads_s'])}; "
                  f"median {statistics.median(timing['round_overheads_s']):.2f} s")


PROBE = """import socket
try:
    socket.create_connection(("director", {port}), timeout=2).close()
    print("connected")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
"""


def test_everything_went_through_the_two_ports_the_readme_lists(after_restore, federation):
    fed = federation
    director = fed.network.counters("director")
    REPORT.append(f"director firewall: new connections admitted to {DIRECTOR_PORT}: {director['director_port']}, "
                  f"to {AGGREGATOR_PORT}: {director['aggregator_port']}; refused: {director['refused']}; "
                  f"opened by the director: {director['opened']}")
    assert director["director_port"] > 0 and director["aggregator_port"] > 0
    # From the first experiment on, per host: an envoy opens one connection to the aggregator per experiment it
    # takes part in, and none to the director but after a failure (the cut); the researcher one per notebook run
    # (and one for wait_online). OpenFL 1.6's envoys opened one per call: 692 to the aggregator in this test.
    # hospital-a took part in all 4 experiments (2 notebook runs: training and test); hospital-b in 3 (it was cut
    # off during the first run's test), and its channel to the director reconnected after the cut.
    made = {name: count - BEFORE.get(name, 0) for name, count in director.items()}
    expected = {"hospital-a": (4, 0), "hospital-b": (3, 1), "researcher": (0, 3)}  # (aggregator, director)
    for host, (experiments, reconnects) in expected.items():
        key = host.replace("-", "_")
        aggregator, to_director = made[f"{key}_aggregator"], made[f"{key}_director"]
        REPORT.append(f"{host}, new connections during the 4 experiments: to the aggregator {aggregator} "
                      f"({experiments} expected), to the director {to_director} ({reconnects} expected)")
        # A SYN lost on the 0.5 %-loss link counts twice: one more of each is allowed.
        assert experiments <= aggregator <= experiments + 1, host
        assert reconnects <= to_director <= reconnects + 1, host
    assert director["refused"] == 0, "a node tried a port the README does not list"
    assert director["opened"] == 0, "the director opened a connection of its own"
    for host in (*HOSPITALS, "researcher"):
        assert fed.network.counters(host)["refused"] == 0, f"something tried to connect to {host}"
    # The firewall is what kept it so: another port on the director is silently dropped, not even refused.
    assert _on(fed, "hospital-a", PROBE.format(port=DIRECTOR_PORT + 100)).strip() == "timeout"
    assert fed.network.counters("director")["refused"] > 0
