"""A federation of separate hosts on this machine: Linux network namespaces on a bridge of their own.

Four hosts, `director`, `hospital-a`, `hospital-b` and `researcher`, each a network namespace with its own
address on a private bridge (itself in a fifth namespace, the "switch", so that nothing touches this machine's own
network) and its own /etc/hosts (ip netns exec mounts /etc/netns/NAME/hosts there) and host name. The hospitals'
links carry a wide-area profile: tc's netem where the kernel has it, else localfed.wire, which does the same in
user space. Each host gets a folder of its own with the repository files the README says it needs and its own
certificates; every node is started with the README's commands. Needs root, iproute2 and nftables.
Used by tests/test_hosts.py and `make bench WAN=...`.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from medmnist_shard.spec import sample_shape, target_shape

from . import REGISTERED, ROOT, Component, FederationError, kill_tree, signals_deferred, tail
from .wire import Profile

PREFIX = "flh-"  # every namespace this module makes starts with it, then the owner's pid
SUBNET = "192.0.2"  # TEST-NET-1 (RFC 5737): documentation addresses, routed nowhere
ADDRESSES = {"director": 10, "hospital-a": 11, "hospital-b": 12, "researcher": 13}
HOSPITALS = {"hospital-a": "envoy_1", "hospital-b": "envoy_2"}  # host: the envoy it runs
DIRECTOR_PORT, AGGREGATOR_PORT = 50051, 50052  # each host has its own ports: fixed ones cannot collide
DEFAULT_PROFILE = "20ms,50mbit,0.5%"  # each way: a 40 ms round trip
NETNS_ETC = Path("/etc/netns")


class HostsError(FederationError):
    """The hosts could not be made, or a node on them failed; the message says which and why."""


def _run(*command: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise HostsError(f"`{' '.join(command)}` failed: {(result.stderr or result.stdout).strip()}")
    return result


def unavailable() -> str:
    """Why namespaces cannot be made here, in one line; empty if they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: install {package}"
    probe = f"{PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    try:
        tap = _run("ip", "-n", probe, "tuntap", "add", "dev", "probe", "mode", "tap", check=False)
        if tap.returncode != 0 and not _netem_works(probe):
            return f"neither tc's netem nor TAP devices (for localfed.wire) work here: {tap.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return ""


def _netem_works(namespace: str) -> bool:
    """Whether this kernel has netem (a veth pair in `namespace` tries it)."""
    made = _run("ip", "-n", namespace, "link", "add", "nprobe0", "type", "veth", "peer", "name", "nprobe1",
                check=False)
    if made.returncode != 0:
        return False
    try:
        return _run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", "nprobe0", "root", "netem",
                    "delay", "1ms", check=False).returncode == 0
    finally:
        _run("ip", "-n", namespace, "link", "del", "nprobe0", check=False)


def _owner(namespace: str) -> int | None:
    parts = namespace[len(PREFIX):].split("-", 1)
    return int(parts[0]) if namespace.startswith(PREFIX) and parts[0].isdigit() else None


def remove_stale() -> list[str]:
    """Remove what runs of this module left behind when their process died: namespaces, the processes in them,
    /etc/netns folders. Returns the namespaces removed."""
    listed = _run("ip", "netns", "list", check=False).stdout.split("\n")
    removed = []
    for namespace in sorted({line.split()[0] for line in listed if line.strip()}):
        owner = _owner(namespace)
        if owner is None or psutil.pid_exists(owner):
            continue
        _remove_namespace(namespace)
        removed.append(namespace)
    if NETNS_ETC.is_dir():
        for folder in NETNS_ETC.iterdir():
            owner = _owner(folder.name)
            if owner is not None and not psutil.pid_exists(owner):
                shutil.rmtree(folder, ignore_errors=True)
    return removed


def _remove_namespace(namespace: str) -> None:
    # A namespace outlives `ip netns del` while a process is inside it: end those first (all started by us).
    pids = _run("ip", "netns", "pids", namespace, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _run("ip", "netns", "del", namespace, check=False)
    shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)


@dataclass
class Network:
    """The hosts, their bridge and their links; `profile` shapes each hospital's link in both directions."""

    profile: Profile = field(default_factory=lambda: Profile.parse(DEFAULT_PROFILE))
    link: str = "auto"  # "netem", "wire" (user space), or "auto": netem where the kernel has it
    run_id: str = field(default_factory=lambda: f"{os.getpid()}-{secrets.token_hex(2)}")
    logs: Path | None = None  # where the wires' logs go
    wires: dict[str, Component] = field(default_factory=dict)
    made: list[str] = field(default_factory=list)

    def namespace(self, host: str) -> str:
        return f"{PREFIX}{self.run_id}-{host}"

    @property
    def switch(self) -> str:
        return self.namespace("switch")

    def address(self, host: str) -> str:
        return f"{SUBNET}.{ADDRESSES[host]}"

    def create(self) -> Network:
        """Make the switch, the hosts and their links; on failure remove what was made."""
        remove_stale()
        try:
            self._namespace(self.switch)
            _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.switch, "link", "set", "br0", "up")
            if self.link == "auto":
                self.link = "netem" if _netem_works(self.switch) else "wire"
            for host in ADDRESSES:
                self._namespace(self.namespace(host))
                self._hosts_file(host)
                self._connect(host, shaped=host in HOSPITALS)
        except BaseException:
            self.remove()
            raise
        return self

    def describe(self) -> str:
        """What the hospitals' links do, honestly: by which means, and what the profile is."""
        means = "tc netem" if self.link == "netem" else "localfed.wire (user space; this kernel has no netem)"
        return f"hospital links: {self.profile}, by {means}; director and researcher links unshaped"

    def _namespace(self, namespace: str) -> None:
        _run("ip", "netns", "add", namespace)
        self.made.append(namespace)
        _run("ip", "-n", namespace, "link", "set", "lo", "up")
        # IPv4 only: no router solicitations or other stray packets for the firewalls to count.
        for scope in ("all", "default"):
            _run("ip", "netns", "exec", namespace, "sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1",
                 check=False)

    def _hosts_file(self, host: str) -> None:
        folder = NETNS_ETC / self.namespace(host)
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{self.address(h)} {h}" for h in ADDRESSES]
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def _connect(self, host: str, shaped: bool) -> None:
        ns, port = self.namespace(host), host  # the switch's port is named after its host
        if shaped and self.link == "wire":
            _run("ip", "-n", self.switch, "tuntap", "add", "dev", port, "mode", "tap")
            _run("ip", "-n", ns, "tuntap", "add", "dev", "eth0", "mode", "tap")
        else:
            _run("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        if not shaped:
            return
        if self.link == "netem":
            p = self.profile
            netem = ["netem", "delay", f"{p.delay * 1000:g}ms", "loss", f"{p.loss * 100:g}%",
                     *(["rate", f"{p.rate / 1e6:g}mbit"] if p.rate else [])]
            for namespace, device in ((ns, "eth0"), (self.switch, port)):  # both directions
                _run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root", *netem)
        else:
            self._start_wire(host)

    def _start_wire(self, host: str) -> None:
        log = (self.logs or Path("/tmp")) / f"wire-{host}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "localfed.wire", f"{self.namespace(host)}/eth0", f"{self.switch}/{host}",
                   f"{self.profile.delay * 1000:g}ms,{self.profile.rate / 1e6:g}mbit,{self.profile.loss * 100:g}%",
                   "--seed", str(ADDRESSES[host])]
        with open(log, "wb") as out, signals_deferred():
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=ROOT, start_new_session=True)
            self.wires[host] = Component(f"wire-{host}", process, log)
        deadline = time.monotonic() + 30
        while "ready" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise HostsError(f"the link of {host} did not come up: {tail(log, 5)}")
            time.sleep(0.05)

    def wire_counts(self) -> dict[str, str]:
        """Each wire's counts (frames, lost, cut), after stopping it; empty where netem shapes the links."""
        counts = {}
        for host, wire in self.wires.items():
            if wire.process.poll() is None:
                wire.process.send_signal(signal.SIGTERM)
                wire.process.wait(timeout=10)
            lines = wire.log.read_text().replace(f"{PREFIX}{self.run_id}-", "").splitlines()[1:]
            counts[host] = " | ".join(lines)
        return counts

    def cut(self, host: str) -> None:
        """Cut `host`'s cable at the switch: its port goes down; the host itself notices nothing."""
        _run("ip", "-n", self.switch, "link", "set", host, "down")

    def restore(self, host: str) -> None:
        """Plug `host`'s cable back in."""
        _run("ip", "-n", self.switch, "link", "set", host, "up")

    def nft(self, host: str, ruleset: str) -> None:
        """Load an nftables ruleset on `host`."""
        _run("ip", "netns", "exec", self.namespace(host), "nft", "-f", "-", stdin=ruleset)

    def counters(self, host: str) -> dict[str, int]:
        """Packets counted by each named nftables counter on `host`."""
        listed = json.loads(_run("ip", "netns", "exec", self.namespace(host), "nft", "-j", "list", "counters").stdout)
        return {c["counter"]["name"]: c["counter"]["packets"] for c in listed["nftables"] if "counter" in c}

    def command(self, host: str, argv: list[str]) -> list[str]:
        """`argv` run on `host`: in its namespace, with its /etc/hosts and its host name."""
        return ["ip", "netns", "exec", self.namespace(host), "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', host, *argv]

    def listening(self, host: str, port: int) -> bool:
        """Whether something on `host` listens on TCP `port`."""
        found = _run("ip", "netns", "exec", self.namespace(host), "ss", "-Hltn", f"sport = :{port}", check=False)
        return bool(found.stdout.strip())

    def remove(self) -> None:
        """Stop the wires and every process in the hosts; remove the namespaces and their /etc/netns folders."""
        for wire in self.wires.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(wire.process.pid, signal.SIGKILL)
            wire.process.wait()
        for namespace in reversed(self.made):
            _remove_namespace(namespace)
        self.made.clear()

    def __enter__(self) -> Network:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.remove()


def director_firewall(director_port: int, aggregator_port: int, sources: dict[str, str] | None = None) -> str:
    """The director host's nftables ruleset: in, new connections to these two ports only; out, replies only.
    Named counters count the new TCP connections admitted per port, those refused, and those the director tried;
    and, for each of `sources` ({host: address}), the new connections from that host to each port, named
    <host>_director and <host>_aggregator (a hyphen in the host's name becomes an underscore)."""
    sources = {host.replace("-", "_"): address for host, address in (sources or {}).items()}
    counters = "".join(f"  counter {host}_{port} {{}}\n" for host in sources for port in ("director", "aggregator"))
    per_source = "".join(
        f"    ip saddr {address} tcp dport {number} ct state new counter name {host}_{port}\n"
        for host, address in sources.items() for port, number in (("director", director_port),
                                                                   ("aggregator", aggregator_port)))
    return f"""table inet federation {{
  counter director_port {{}}
  counter aggregator_port {{}}
  counter refused {{}}
  counter opened {{}}
{counters}  chain input {{
    type filter hook input priority filter; policy drop;
    iif "lo" accept
    ct state established,related accept
{per_source}    tcp dport {director_port} ct state new counter name director_port accept
    tcp dport {aggregator_port} ct state new counter name aggregator_port accept
    meta l4proto tcp ct state new counter name refused drop
  }}
  chain output {{
    type filter hook output priority filter; policy drop;
    oif "lo" accept
    ct state established,related accept
    meta l4proto tcp ct state new counter name opened drop
  }}
}}
"""


# A data host and the researcher's host accept no connections at all: they only connect out.
CLIENT_FIREWALL = """table inet federation {
  counter refused {}
  chain input {
    type filter hook input priority filter; policy drop;
    iif "lo" accept
    ct state established,related accept
    meta l4proto tcp ct state new counter name refused drop
  }
}
"""


def _edit(path: Path, change) -> None:
    """Apply change(config) to a YAML file."""
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


# What each host needs of the repository (the README's "Across hosts"): the environment's files, the start script
# and config of its role, and the code it runs; nothing of the other roles.
COMMON = ("Makefile", "requirements.txt", "security", "openfl_adjustments")
ROLE_FILES = {
    "director": ("director/start_director.sh", "director/director_config.yaml"),
    "hospital": ("envoy/start_envoy.sh", "envoy/medmnist_shard"),
    "researcher": ("workspace/Pytorch_MedMNIST_2D.ipynb", "workspace/medfl"),
}


@dataclass
class HostsFederation:
    """A director, two hospitals' envoys and a researcher's notebook on a Network, each in its own folder under
    `workdir/hosts/`, with certificates made on a separate `workdir/ca-machine/`."""

    workdir: Path
    network: Network
    data_file: Path  # the dataset file every hospital holds in envoy/data (its shards come from it by rank)
    dataset: str = "bloodmnist"  # what the hospitals serve: the data file's flag and size
    size: int = 28
    health_period: int = 2  # the director config's envoy_health_check_period on the director host
    env: dict = field(default_factory=dict)  # more environment for every node
    components: list[Component] = field(default_factory=list)

    def folder(self, host: str) -> Path:
        return self.workdir / "hosts" / host

    def prepare(self) -> None:
        """Certificates on the CA machine, each host's folder with its files, data and certificates, firewalls."""
        ca_machine = self.workdir / "ca-machine" / "certs"
        # The README's `make certs DIRECTOR_HOSTS=director ENVOYS=2`, written to the CA machine's folder.
        _run(sys.executable, "-m", "security.certs", "make", "--out", str(ca_machine), "--director-host",
             "director", *[a for e in HOSPITALS.values() for a in ("--envoy", e)], "--researcher", "researcher")
        own = {"director": "director", **HOSPITALS, "researcher": "researcher"}
        for host, name in own.items():
            root = self.folder(host)
            role = "hospital" if host in HOSPITALS else host
            for path in COMMON + ROLE_FILES[role]:
                _copy(ROOT / path, root / path)
            # `make venv` on that host; here every host shares this machine's environment.
            (root / ".venv").symlink_to(Path(sys.prefix))
            (root / "certs").mkdir()
            for file in ("ca.crt", f"{name}.crt", f"{name}.key"):  # ca.key stays on the CA machine
                shutil.copy2(ca_machine / file, root / "certs" / file)
            if host in HOSPITALS:
                self._hospital(root, name)
        # The director host's config, edited there as its operator would: shapes, and how soon envoys count as lost.
        _edit(self.folder("director") / "director" / "director_config.yaml", lambda config: config["settings"].update(
            sample_shape=[str(d) for d in sample_shape(self.dataset, self.size)],
            target_shape=[str(d) for d in target_shape(self.dataset)], envoy_health_check_period=self.health_period))
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.network.nft("director", director_firewall(DIRECTOR_PORT, AGGREGATOR_PORT, {
            host: self.network.address(host) for host in (*HOSPITALS, "researcher")}))
        for host in (*HOSPITALS, "researcher"):
            self.network.nft(host, CLIENT_FIREWALL)

    def _hospital(self, root: Path, name: str) -> None:
        """A data host's config (the repository's, for this dataset) and its copy of the dataset file."""
        config = root / "envoy" / f"envoy_config_{name.rsplit('_', 1)[1]}.yaml"
        _copy(ROOT / "envoy" / config.name, config)
        if (self.dataset, self.size) != ("bloodmnist", 28):  # the shipped configs' dataset
            _edit(config, lambda c: c["shard_descriptor"]["params"].update(flag=self.dataset, size=self.size))
        (root / "envoy" / "data").mkdir()
        target = root / "envoy" / "data" / self.data_file.name
        try:
            os.link(self.data_file, target)  # a file of its own to the envoy, without the disk space
        except OSError:
            shutil.copy2(self.data_file, target)

    def environment(self, host: str, **extra) -> dict:
        """A node's environment on `host`: this one, activated in its folder, without the start scripts' settings."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("CERTS", "ALLOW_PLAINTEXT", "DIRECTOR_HOST", "DIRECTOR_PORT", "PYTHONPATH")}
        # What `source .venv/bin/activate` does on that host.
        env.update(PATH=f"{self.folder(host) / '.venv' / 'bin'}:{env.get('PATH', '')}", VIRTUAL_ENV=str(
            self.folder(host) / ".venv"), **self.env, **extra)
        return env

    def _spawn(self, host: str, name: str, argv: list[str], cwd: Path, env: dict) -> Component:
        log = self.workdir / "logs" / f"{name}.log"
        with open(log, "ab") as out, signals_deferred():
            process = subprocess.Popen(self.network.command(host, argv), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True)
            component = Component(name, process, log)
            self.components.append(component)
        return component

    def start(self, timeout: float = 180.0) -> HostsFederation:
        """Start the director and both envoys with the README's commands; return once both envoys registered."""
        deadline = time.monotonic() + timeout
        # On the director host: CERTS=certs DIRECTOR_HOST=0.0.0.0 ./director/start_director.sh
        director = self._spawn("director", "director", ["./director/start_director.sh"], self.folder("director"),
                               self.environment("director", CERTS="certs", DIRECTOR_HOST="0.0.0.0"))
        self._wait(director, lambda: self.network.listening("director", DIRECTOR_PORT), deadline,
                   "did not open its port")
        envoys = []
        for host, name in HOSPITALS.items():
            # On each data host: CERTS=certs DIRECTOR_HOST=director ./envoy/start_envoy.sh envoy_N envoy/...yaml
            config = f"envoy/envoy_config_{name.rsplit('_', 1)[1]}.yaml"
            envoys.append(self._spawn(host, name, ["./envoy/start_envoy.sh", name, config], self.folder(host),
                                      self.environment(host, CERTS="certs", DIRECTOR_HOST="director",
                                                OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // 2)))))
        for envoy in envoys:
            self._wait(envoy, lambda e=envoy: REGISTERED in e.log.read_text(errors="replace"), deadline,
                       "did not register with the director")
        return self

    def _wait(self, component: Component, ready, deadline: float, what: str) -> None:
        while not ready():
            if component.process.poll() is not None:
                raise FederationError(f"{component.name} exited with status {component.process.returncode}; "
                                      f"its log ends with:\n{tail(component.log)}")
            if time.monotonic() > deadline:
                raise FederationError(f"{component.name} {what}; its log ends with:\n{tail(component.log)}")
            time.sleep(0.2)

    def component(self, name: str) -> Component:
        return next(c for c in reversed(self.components) if c.name == name)

    def notebook(self, experiment: str, parameters: dict, on_line=None, timeout: float = 300.0) -> Path:
        """Run the notebook headless on the researcher's host (the README's papermill line, with the across-hosts
        parameters); `on_line` sees each line it prints. Return its run folder; raise HostsError if it failed."""
        root = self.folder("researcher")
        (root / "runs").mkdir(exist_ok=True)
        values = {"director_host": "director", "director_port": DIRECTOR_PORT, "aggregator_port": AGGREGATOR_PORT,
                  "ca_cert": "../certs/ca.crt", "api_cert": "../certs/researcher.crt",
                  "api_key": "../certs/researcher.key", "experiment_name": experiment, "output_dir": "../runs",
                  **parameters}
        argv = ["papermill", "Pytorch_MedMNIST_2D.ipynb", f"../runs/{experiment}.ipynb", "--log-output",
                "--no-progress-bar"]
        for name, value in values.items():
            argv += ["-p", name, str(value)]
        log = self.workdir / "logs" / f"notebook-{experiment}.log"
        # The researcher's `make venv` makes the repository importable; here its own copy of it.
        env = self.environment("researcher", PYTHONPATH=str(root))
        with open(log, "w") as out:
            with signals_deferred():
                process = subprocess.Popen(self.network.command("researcher", argv), stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                           cwd=root / "workspace", env=env, start_new_session=True)
            reader = threading.Thread(target=_relay, args=(process.stdout, out, on_line), daemon=True)
            reader.start()
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise HostsError(f"the notebook took longer than {timeout:.0f} s; its log: {log}") from None
            finally:
                kill_tree(process)
                reader.join(timeout=10)
        if process.returncode != 0:
            lines = [line for line in log.read_text().splitlines() if line.strip()]
            raise HostsError(f"the notebook failed: {lines[-1] if lines else 'no output'} (log: {log})\n"
                             f"the director's log ends with:\n{tail(self.component('director').log, 15)}")
        return root / "runs" / experiment

    def wait_online(self, envoys: list[str], timeout: float = 60.0) -> list[str]:
        """Return the envoys online once the director shows all of `envoys` online, as the researcher sees it."""
        script = f"""import sys, time
from openfl.interface.interactive_api.federation import Federation
federation = Federation(client_id="frontend", director_node_fqdn="director", director_port={DIRECTOR_PORT},
                        tls=True, cert_chain="../certs/ca.crt", api_cert="../certs/researcher.crt",
                        api_private_key="../certs/researcher.key")
deadline = time.monotonic() + {timeout}
while True:
    online = sorted(name for name, info in federation.get_shard_registry().items() if info["is_online"])
    if set(sys.argv[1:]) <= set(online):
        print(" ".join(online))
        break
    if time.monotonic() > deadline:
        sys.exit(f"after {timeout:.0f} s only these envoys are online: {{online}}")
    time.sleep(0.5)
"""
        root = self.folder("researcher")
        result = subprocess.run(self.network.command("researcher", ["python", "-c", script, *envoys]),
                                cwd=root / "workspace", env=self.environment("researcher", PYTHONPATH=str(root)),
                                capture_output=True, text=True, timeout=timeout + 60)
        if result.returncode != 0:
            raise HostsError(f"waiting for {', '.join(envoys)} to be online: {result.stderr.strip()[-2000:]}")
        return result.stdout.split()

    def stop(self, grace: float = 10.0) -> None:
        """Stop every node's process group: SIGTERM, then SIGKILL after `grace` seconds."""
        for c in self.components:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.components:
            try:
                c.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                kill_tree(c.process)


def _relay(stream, out, on_line) -> None:
    for line in stream:
        out.write(line)
        out.flush()
        if on_line:
            on_line(line.rstrip("\n"))
