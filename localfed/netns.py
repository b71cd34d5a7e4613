"""Separate hosts on this machine: Linux network namespaces on a bridge of their own, with firewalls and wide-area
links.

Four hosts, `director`, `hospital-a`, `hospital-b` and `researcher`, each a network namespace with its own
address on a private bridge (itself in a fifth namespace, the "switch", so that nothing touches this machine's own
network) and its own /etc/hosts (ip netns exec mounts /etc/netns/NAME/hosts there) and host name. The hospitals'
links carry a wide-area profile: tc's netem where the kernel has it, else localfed.wan, which does the same in
user space. Needs root, iproute2 and nftables. localfed.hosts puts a federation on them.
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
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .federation import ROOT, Component, FederationError, signals_deferred, tail
from .wan import Profile

PREFIX = "flh-"  # every namespace this module makes starts with it, then the owner's pid
SUBNET = "192.0.2"  # TEST-NET-1 (RFC 5737): documentation addresses, routed nowhere
ADDRESSES = {"director": 10, "hospital-a": 11, "hospital-b": 12, "researcher": 13}
HOSPITALS = {"hospital-a": "envoy_1", "hospital-b": "envoy_2"}  # host: the envoy it runs
DEFAULT_PROFILE = "20ms,50mbit,0.5%"  # each way: a 40 ms round trip
NETNS_ETC = Path("/etc/netns")


class HostsError(FederationError):
    """The hosts could not be made, or a node on them failed; the message says which and why."""


def _run(*command: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise HostsError(f"`{' '.join(command)}` failed: {(result.stderr or result.stdout).strip()}")
    return result


def install_nftables(say=print) -> None:
    """nftables, for the firewalls, installed with apt-get when nft is missing and this runs as root (as make
    test-hosts and make bench wan= do); otherwise nothing, and unavailable() says what is missing."""
    if shutil.which("nft") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    say("installing nftables with apt-get (running as root)")
    install = ["apt-get", "install", "-y", "-q", "nftables"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}  # no debconf questions without a terminal
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:  # a fresh image may lack package lists
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        subprocess.run(install, capture_output=True, env=env)


def unavailable() -> str:
    """Why namespaces cannot be made here, in one line; empty if they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"`{tool}` not found: install {package} (apt-get install {package})"
    probe = f"{PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    made = _run("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    try:
        tap = _run("ip", "-n", probe, "tuntap", "add", "dev", "probe", "mode", "tap", check=False)
        if tap.returncode != 0 and not _netem_works(probe):
            return f"neither tc's netem nor TAP devices (for localfed.wan) work here: {tap.stderr.strip()}"
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
        means = "tc netem" if self.link == "netem" else "localfed.wan (user space; this kernel has no netem)"
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
        command = [sys.executable, "-m", "localfed.wan", f"{self.namespace(host)}/eth0", f"{self.switch}/{host}",
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


