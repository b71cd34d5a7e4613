"""A federation across hosts on this machine: a LocalFederation whose Placement puts the director, two hospitals'
envoys and the researcher's notebook on the hosts of a localfed.netns.Network.

Each host gets a folder of its own with the repository files docs/across-hosts.md says its role needs and its own
certificates, made on a separate CA machine; every node is started there with that page's commands and the
repository's shipped configs. Used by tests/test_hosts.py and `make bench wan=...`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

import roots
from medfl.researcher import DEFAULTS, RUN
from medmnist_shard.spec import sample_shape, target_shape

from .federation import ROOT, LocalFederation, Placement
from .netns import CLIENT_FIREWALL, HOSPITALS, HostsError, Network, _run, director_firewall
from .run import launch_notebook

DIRECTOR_PORT = RUN["director_port"]  # each host has its own ports: the defaults cannot collide here
AGGREGATOR_PORT = DIRECTOR_PORT + 1  # fixed, for the director's firewall
# What each host needs of the repository (docs/across-hosts.md): the environment's files, the start script
# and config of its role, and the code it runs; nothing of the other roles.
COMMON = ("Makefile", "requirements.txt", "roots.py", "node.py", "security", "openfl_adjustments")
ROLE_FILES = {
    "director": ("director/start_director.sh", "director/director_config.yaml"),
    "hospital": ("envoy/start_envoy.sh", "envoy/medmnist_shard"),
    "researcher": ("workspace/Pytorch_MedMNIST_2D.ipynb", "workspace/medfl"),
}
NODES = {"director": "director", **{envoy: host for host, envoy in HOSPITALS.items()}, "researcher": "researcher"}


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


class OnHosts(Placement):
    """Each node on its host of `network`, in that host's folder under `root`, as its operator starts it."""

    python = "python"  # the host's own, on the PATH of its activated environment

    def __init__(self, network: Network, root: Path, data_file: Path, dataset: str, size: int, env: dict):
        self.network, self.root, self.data_file, self.dataset, self.size, self.extra = \
            network, root, data_file, dataset, size, env

    def host(self, node: str) -> str:
        return NODES[node]

    def folder(self, node: str) -> Path:
        return self.root / self.host(node)

    def command(self, node: str, argv: list[str]) -> list[str]:
        return self.network.command(self.host(node), argv)

    def env(self, node: str, federation: LocalFederation) -> dict:
        """What `source .venv/bin/activate` and docs/across-hosts.md's start line set on that host."""
        folder = self.folder(node)
        # The researcher's `make venv` makes the repository importable (its .pth); here its own copy of it.
        env = {"PATH": f"{folder / '.venv' / 'bin'}:{os.environ.get('PATH', '')}", "VIRTUAL_ENV": str(folder / ".venv"),
               "ALLOW_PLAINTEXT": "",
               "PYTHONPATH": roots.pythonpath("environment", folder) if node == "researcher" else ""}
        if node == "director":  # CERTS=certs DIRECTOR_HOST=0.0.0.0 ./director/start_director.sh
            env.update(CERTS="certs", DIRECTOR_HOST="0.0.0.0", DIRECTOR_PORT=str(DIRECTOR_PORT))
        elif node != "researcher":  # CERTS=certs DIRECTOR_HOST=director ./envoy/start_envoy.sh envoy_N CONFIG
            env.update(CERTS="certs", DIRECTOR_HOST="director", DIRECTOR_PORT=str(DIRECTOR_PORT))
        return {**env, **self.extra}

    def director_config(self, federation: LocalFederation, config: dict) -> Path:
        """The director host's config, edited there as its operator would: shapes, and how soon envoys are lost."""
        path = self.folder("director") / "director" / "director_config.yaml"
        _edit(path, lambda c: c["settings"].update(
            sample_shape=config["settings"]["sample_shape"], target_shape=config["settings"]["target_shape"],
            envoy_health_check_period=config["settings"]["envoy_health_check_period"]))
        return Path("director/director_config.yaml")

    def envoy_config(self, federation: LocalFederation, name: str, params: dict) -> Path:
        """The repository's config for this envoy, for the hospitals' dataset, and its copy of the data file."""
        root = self.folder(name)
        config = root / "envoy" / f"envoy_config_{name.rsplit('_', 1)[1]}.yaml"
        _copy(ROOT / "envoy" / config.name, config)
        if (self.dataset, self.size) != (DEFAULTS["dataset"], DEFAULTS["size"]):  # the shipped configs' dataset
            _edit(config, lambda c: c["shard_descriptor"]["params"].update(flag=self.dataset, size=self.size))
        (root / "envoy" / "data").mkdir(exist_ok=True)
        target = root / "envoy" / "data" / self.data_file.name
        if not target.exists():
            try:
                os.link(self.data_file, target)  # a file of its own to the envoy, without the disk space
            except OSError:
                shutil.copy2(self.data_file, target)
        return Path("envoy") / config.name

    def listening(self, federation: LocalFederation) -> bool:
        return self.network.listening("director", DIRECTOR_PORT)


def researcher_run(researcher: str = "researcher") -> dict:
    """The notebook's `run` on the researcher's host: docs/across-hosts.md's papermill line (a test keeps them the
    same), with the director's host name and the certificates of that host's certs/ folder."""
    return {"director_host": "director", "director_port": DIRECTOR_PORT, "aggregator_port": AGGREGATOR_PORT,
            "ca_cert": "../certs/ca.crt", "api_cert": f"../certs/{researcher}.crt",
            "api_key": f"../certs/{researcher}.key"}


class HostsFederation(LocalFederation):
    """A director, two hospitals' envoys and a researcher's notebook on a Network, each in its own folder under
    `workdir/hosts/`, with certificates made on a separate `workdir/ca-machine/`."""

    def __init__(self, workdir: Path, network: Network, data_file: Path, dataset: str = DEFAULTS["dataset"],
                 size: int = DEFAULTS["size"], health_period: int = 2, env: dict | None = None):
        placement = OnHosts(network, workdir / "hosts", data_file, dataset, size, env or {})
        shards = {envoy: {} for envoy in HOSPITALS.values()}  # the hospitals serve their shipped configs' shards
        super().__init__(workdir, shards, sample_shape(dataset, size), target_shape(dataset), certs=Path("certs"),
                         health_period=health_period, host="director", port=DIRECTOR_PORT, placement=placement)
        self.network = network

    def folder(self, host: str) -> Path:
        return self.workdir / "hosts" / host

    def prepare(self) -> None:
        """Certificates on the CA machine; each host's folder with its files and certificates; the firewalls."""
        ca_machine = self.workdir / "ca-machine" / "certs"
        # docs/across-hosts.md's `make certs director_hosts=director envoys=2`, written to the CA machine's folder.
        _run(sys.executable, "-m", "security.certs", "make", "--out", str(ca_machine), "--director-host",
             "director", *[a for e in HOSPITALS.values() for a in ("--envoy", e)], "--researcher", "researcher")
        for node, host in NODES.items():
            root = self.folder(host)
            role = "hospital" if host in HOSPITALS else host
            for path in COMMON + ROLE_FILES[role]:
                _copy(ROOT / path, root / path)
            # `make venv` on that host; here every host shares this machine's environment.
            (root / ".venv").symlink_to(Path(sys.prefix))
            (root / "certs").mkdir()
            for file in ("ca.crt", f"{node}.crt", f"{node}.key"):  # ca.key stays on the CA machine
                shutil.copy2(ca_machine / file, root / "certs" / file)
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.network.nft("director", director_firewall(DIRECTOR_PORT, AGGREGATOR_PORT, {
            host: self.network.address(host) for host in (*HOSPITALS, "researcher")}))
        for host in (*HOSPITALS, "researcher"):
            self.network.nft(host, CLIENT_FIREWALL)

    def component(self, name: str):
        return next(c for c in reversed(self.components) if c.name == name)

    def notebook(self, experiment: str, parameters: dict, on_line=None, timeout: float = 300.0) -> Path:
        """Run the notebook headless on the researcher's host (docs/across-hosts.md's papermill line, with the
        across-hosts parameters); `on_line` sees each line it prints. Return its run folder; RunError if it failed."""
        root = self.folder("researcher")
        (root / "runs").mkdir(exist_ok=True)
        run = {**researcher_run(), "experiment_name": experiment, "output_dir": "../runs", **parameters.get("run", {})}
        launch_notebook(self, root / "workspace" / "Pytorch_MedMNIST_2D.ipynb", root / "runs" / f"{experiment}.ipynb",
                        {**parameters, "run": run}, time.monotonic() + timeout,
                        self.workdir / "logs" / f"notebook-{experiment}.log", on_line=on_line or (lambda line: None))
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
        result = subprocess.run(self.placement.command("researcher", ["python", "-c", script, *envoys]),
                                cwd=self.folder("researcher") / "workspace",
                                env={**os.environ, **self.placement.env("researcher", self)},
                                capture_output=True, text=True, timeout=timeout + 60)
        if result.returncode != 0:
            raise HostsError(f"waiting for {', '.join(envoys)} to be online: {result.stderr.strip()[-2000:]}")
        return result.stdout.split()
