"""A whole federation as real processes: a director and N envoys, each through the start script a user runs, in
its own process group; logs go to `<workdir>/logs/<name>.log`.

Where each node runs is its Placement's: by default every node on this machine, on a free loopback port, with
configs written to `<workdir>/nodes/<name>/` (make demo, the tests); localfed.hosts places each on a host of its
own, a network namespace (make bench wan=..., tests/test_hosts.py).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
REGISTERED = "Shard was accepted by director"


class FederationError(RuntimeError):
    """A component failed to start or to register; the message ends with its log's tail."""


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl-C and SIGTERM until a started process is recorded, so that none escapes cleanup.

    They are caught and replayed, not blocked: a blocked signal mask would be inherited by the
    process started meanwhile, which could then never be stopped but by SIGKILL.
    """
    caught = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda number, frame: caught.append(number)) for s in held}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, or a note that there is none."""
    if not path.exists():
        return f"(no log at {path})"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Component:
    """One started process: its name, process, and log file."""

    name: str
    process: subprocess.Popen
    log: Path


class Placement:
    """Where and how each node of a LocalFederation runs. This one: every node on this machine, from this
    repository, with its config written to the federation's working folder. A subclass places nodes elsewhere."""

    python = sys.executable  # the interpreter that runs papermill for the notebook

    def folder(self, node: str) -> Path:
        """The folder a node runs in: it holds director/, envoy/ or workspace/ as its role needs."""
        return ROOT

    def command(self, node: str, argv: list[str]) -> list[str]:
        """`argv` as it runs on the node's host."""
        return argv

    def env(self, node: str, federation: LocalFederation) -> dict:
        """The node's environment, beyond this process's: where the director is, the certificates."""
        return {"DIRECTOR_HOST": federation.host, "DIRECTOR_PORT": str(federation.port),
                "CERTS": str(federation.certs or "")}

    def director_config(self, federation: LocalFederation, config: dict) -> Path:
        """Write the director's config (the repository's, with the federation's shapes) where its node reads it."""
        folder = federation.workdir / "nodes" / "director"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "director_config.yaml").write_text(yaml.safe_dump(config))
        return folder / "director_config.yaml"

    def envoy_config(self, federation: LocalFederation, name: str, params: dict) -> Path:
        """Write envoy `name`'s config, serving the shard `params` describe, where its node reads it."""
        folder = federation.workdir / "nodes" / name
        folder.mkdir(parents=True, exist_ok=True)
        config = {"params": {"cuda_devices": [], "install_requirements": False},
                  "shard_descriptor": {"template": "medmnist_shard.MedMNISTShardDescriptor", "params": params},
                  **({"policy": federation.policies[name]} if federation.policies.get(name) else {})}
        (folder / "envoy_config.yaml").write_text(yaml.safe_dump(config))
        return folder / "envoy_config.yaml"

    def listening(self, federation: LocalFederation) -> bool:
        """Whether the director listens yet."""
        return _listening(federation.host, federation.port)


@dataclass
class LocalFederation:
    """Director plus envoys under `workdir`; `shard_params` gives each envoy's shard descriptor params."""

    workdir: Path
    shard_params: dict[str, dict]
    sample_shape: list
    target_shape: list
    certs: Path | None = None  # a folder from security.certs make: mutual TLS; None: plaintext
    health_period: int | None = None  # seconds between envoys' health checks; None: the director config's
    policies: dict[str, dict] = field(default_factory=dict)  # envoy: its config's policy section (default: none)
    state: Path | None = None  # the nodes' state folders: state/<node>/; None: beside each node's config
    host: str = "localhost"
    port: int = field(default_factory=free_port)
    placement: Placement = field(default_factory=Placement)
    components: list[Component] = field(default_factory=list)
    _reported: list[Component] = field(default_factory=list, init=False, repr=False)  # see newly_exited

    def _spawn(self, name: str, argv: list[str], env: dict) -> Component:
        """Start node `name` (the director or an envoy) on its host, in its folder, logging to logs/<name>.log."""
        log = self.workdir / "logs" / f"{name}.log"
        with open(log, "ab") as out, signals_deferred():
            process = subprocess.Popen(self.placement.command(name, argv), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, cwd=self.placement.folder(name),
                                       env={**os.environ, **self.placement.env(name, self), **env},
                                       start_new_session=True)
            component = Component(name, process, log)
            self.components.append(component)
        return component

    def _fail(self, component: Component, what: str) -> FederationError:
        return FederationError(f"{component.name} {what}; its log ends with:\n{tail(component.log)}")

    def start(self, timeout: float = 120.0) -> LocalFederation:
        """Start the director and every envoy; return once all envoys are registered.

        The envoys start beside the director rather than after it: their imports and shard checks overlap its own
        start-up, and an envoy that finds no director yet retries (openfl_adjustments.startup)."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        director = self._start_director()
        deadline = time.monotonic() + timeout
        envoys = [self._start_envoy(name, params) for name, params in self.shard_params.items()]
        self._wait(director, lambda: self.placement.listening(self), deadline, "did not open its port")
        for envoy in envoys:
            self.wait_registered(envoy, deadline)
        return self

    def _start_director(self) -> Component:
        config = yaml.safe_load((ROOT / "director" / "director_config.yaml").read_text())
        config["settings"].update(sample_shape=[str(d) for d in self.sample_shape],
                                  target_shape=[str(d) for d in self.target_shape])
        if self.health_period:
            config["settings"]["envoy_health_check_period"] = self.health_period
        path = self.placement.director_config(self, config)
        return self._spawn("director", ["bash", "director/start_director.sh"],
                           {"DIRECTOR_CONFIG": str(path), **self._state_env("director", "MEDFL_DIRECTOR_STATE")})

    def _start_envoy(self, name: str, params: dict) -> Component:
        config = self.placement.envoy_config(self, name, params)
        threads = str(max(1, (os.cpu_count() or 1) // len(self.shard_params)))
        return self._spawn(name, ["bash", "envoy/start_envoy.sh", name, str(config)],
                           {"OMP_NUM_THREADS": threads, **self._state_env(name, "MEDFL_ENVOY_STATE")})

    def _state_env(self, node: str, variable: str) -> dict:
        # Given a state folder, each node keeps its ledger and audit log in its own subfolder, across runs.
        return {variable: str(Path(self.state) / node)} if self.state else {}

    def wait_registered(self, envoy: Component, deadline: float) -> None:
        """Return once `envoy` has registered with the director (its log says so)."""
        self._wait(envoy, lambda: REGISTERED in envoy.log.read_text(errors="replace"), deadline,
                   "did not register with the director")

    def restart(self, name: str, timeout: float = 60.0) -> Component:
        """Start node `name` again (after it stopped), as its host would, on the same port for the director; return
        once it has registered, or for the director once every running envoy has registered with it again."""
        old = next(c for c in reversed(self.components) if c.name == name)
        if old.process.poll() is None:
            raise FederationError(f"{name} is still running")
        old.log = old.log.rename(old.log.with_suffix(f".{old.process.pid}.log"))  # keep the crashed run's log
        deadline = time.monotonic() + timeout
        if name != "director":
            envoy = self._start_envoy(name, self.shard_params[name])
            self.wait_registered(envoy, deadline)
            return envoy
        envoys = [c for c in self.components if c.name != "director" and c.process.poll() is None]
        registered = {c.name: c.log.read_text(errors="replace").count(REGISTERED) for c in envoys}
        director = self._start_director()
        self._wait(director, lambda: self.placement.listening(self), deadline, "did not open its port")
        for envoy in envoys:  # each registers again at its next health check
            self._wait(envoy, lambda e=envoy: e.log.read_text(errors="replace").count(REGISTERED) > registered[e.name],
                       deadline, "did not register with the restarted director")
        return director

    def _wait(self, component: Component, ready, deadline: float, what: str) -> None:
        while not ready():
            if component.process.poll() is not None:
                raise self._fail(component, f"exited with status {component.process.returncode}")
            if time.monotonic() > deadline:
                raise self._fail(component, what)
            time.sleep(0.2)

    @property
    def director(self) -> Component:
        return next(c for c in reversed(self.components) if c.name == "director")

    def newly_exited(self) -> list[Component]:
        """The components that have exited since the last call (a restarted envoy counts afresh)."""
        exited = [c for c in self.components if c.process.poll() is not None and c not in self._reported]
        self._reported.extend(exited)
        return exited

    def peak_rss_mb(self) -> dict[str, float]:
        """Peak resident memory of each running component's process so far, in MB (Linux)."""
        peaks = {}
        for c in self.components:
            try:
                status = Path(f"/proc/{c.process.pid}/status").read_text()
            except OSError:
                continue
            peaks[c.name] = next(int(line.split()[1]) / 1024 for line in status.splitlines()
                                 if line.startswith("VmHWM:"))
        return peaks

    def stop(self, grace: float = 10.0) -> None:
        """Stop every component's process group: SIGTERM, then SIGKILL after `grace` seconds."""
        for component in self.components:
            _signal_group(component.process, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for component in self.components:
            try:
                component.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(component.process, signal.SIGKILL)
                component.process.wait()
        for component in self.components:
            _signal_group(component.process, signal.SIGKILL)  # leftovers in the group, if any

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(process: subprocess.Popen) -> None:
    """Kill a process, its group and its descendants, and reap it: papermill's kernel runs in a session of its own
    (left alone, it would go on for a moment and might write a run folder after an interrupt)."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
