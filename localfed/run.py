"""What every command that runs the notebook against a local federation shares: checking the settings, the envoys'
shards, the federation itself, and the notebook run, headless, with its progress shown live."""
from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from pathlib import Path

import yaml

from medfl.researcher import ParameterError, check_algorithm, check_parameters
from medfl.selection import quorum
from medmnist_shard import DataError
from medmnist_shard.descriptor import prepare
from medmnist_shard.partition import STRATEGIES
from medmnist_shard.spec import sample_shape, target_shape
from security import policy as policy_rules
from security.certs import DEFAULT_RESEARCHERS
from security.certs import make as make_certs

from .data import resolve
from .federation import ROOT, LocalFederation, free_port, kill_tree, signals_deferred, tail
from .settings import Settings, own_folders
from .wan import Profile

# Lines of the notebook's output worth showing live: its progress lines (medfl.researcher.follow) and summary.
PROGRESS = re.compile(r"^(initial model|model after|round \d|final validation|test |best model|no global model|NOTE|"
                      r"waiting|FAILED)")
RESEARCHER = DEFAULT_RESEARCHERS[0]  # whose certificate the local notebook uses and signs with
# Once the director has gone, the notebook gets this long to save what it received and stop.
DIRECTOR_GONE_GRACE_S = 60


class RunError(RuntimeError):
    """The run failed; the message says where, with the failing component's log."""


def compared(settings: Settings) -> list[str]:
    """make compare's algorithms, in the order given."""
    return [name for name in re.split(r"[\s,]+", settings.algorithms) if name]


def check(settings: Settings) -> None:
    """Refuse impossible settings before anything starts, each in one line naming the setting."""
    if not Path(settings.notebook).is_file():
        raise DataError(f"notebook={settings.notebook} does not exist")
    if settings.envoys < 1:
        raise DataError(f"envoys={settings.envoys}: must be at least 1")
    if settings.data_dirs:
        folders = own_folders(settings.data_dirs)
        if "envoys" in settings.given and settings.envoys != len(folders):
            raise DataError(f"envoys={settings.envoys} but data_dirs names {len(folders)} folders: one envoy per "
                            "folder (leave envoys out)")
        if settings.data_dir or "partition" in settings.given:
            raise DataError("data_dirs gives each envoy its own whole file: leave data_dir and partition out (they "
                            "cut one shared file into shards)")
    if settings.partition not in STRATEGIES:
        raise DataError(f"partition={settings.partition}: use {' or '.join(STRATEGIES)}")
    if settings.partition == "dirichlet" and not settings.alpha > 0:
        raise DataError(f"alpha={settings.alpha}: the Dirichlet concentration must be positive")
    if settings.envoy_policy and "researchers" in envoy_policy(settings.envoy_policy) and not settings.tls:
        raise DataError(f"envoy_policy={settings.envoy_policy} names researchers, whom only mutual TLS identifies: "
                        "leave tls=0 out")
    if settings.wan:
        try:
            Profile.parse(settings.wan)
        except ValueError as exc:
            raise DataError(f"wan={settings.wan}: {exc}") from None
    algorithms = compared(settings) if settings.command == "compare" else [settings.algorithm]
    if not algorithms:
        raise DataError("algorithms is empty: name the algorithms to compare, e.g. algorithms=fedavg,fedprox")
    notebook = settings.notebook_parameters()
    parameters = {**{name: getattr(settings, name) for name in ("dataset", "size", "rounds", "epochs",
                                                               "train_batch_size", "eval_batch_size",
                                                               "learning_rate")}, **notebook}
    try:
        for algorithm in algorithms:
            check_algorithm(algorithm, notebook.get("algorithm_options"), settings.dataset)
        check_parameters(**{**parameters, "algorithm": algorithms[0]})
    except ParameterError as exc:
        raise DataError(str(exc)) from None
    if quorum(settings.min_envoys, settings.envoys) > settings.envoys:
        raise DataError(f"min_envoys={settings.min_envoys} is more than envoys={settings.envoys}")


def data_for(settings: Settings) -> tuple[Path | None, str]:
    """(the folder of the file the envoys' shards are cut from, or None for data_dirs; data_source)."""
    if settings.data_dirs:  # each envoy's own file, as hospitals have
        return None, "own files"
    return resolve(settings.dataset, settings.size, settings.data, settings.data_dir, command=settings.command)


def shard_params(settings: Settings, data_dir: Path | None) -> dict[str, dict]:
    """Every envoy's shard descriptor params, each checked (and its samples chosen) up front: shards of the file in
    data_dir, or with data_dirs each envoy's own whole file, read where it is and never written to."""
    if settings.data_dirs:
        return own_files(settings)
    shards = {}
    for rank in range(1, settings.envoys + 1):
        params = {"flag": settings.dataset, "size": int(settings.size), "data_dir": str(data_dir),
                  "rank_worldsize": f"{rank},{settings.envoys}", "partition": settings.partition,
                  "alpha": settings.alpha, "seed": settings.seed, "download": False}
        setup = prepare(**params)
        print(f"  envoy_{rank}: {setup.summary()['text']}")
        shards[f"envoy_{rank}"] = params
    return shards


def own_files(settings: Settings) -> dict[str, dict]:
    """envoy_i serves the whole file in data_dirs' folder i, as a hospital serves its own; checked up front."""
    shards = {}
    for rank, folder in enumerate(own_folders(settings.data_dirs), 1):
        name = f"envoy_{rank}"
        params = {"flag": settings.dataset, "size": int(settings.size), "data_dir": str(folder), "download": False}
        try:
            setup = prepare(**params)
        except DataError as exc:
            raise DataError(f"{name}'s folder {folder} (data_dirs entry {rank}): {exc}") from None
        print(f"  {name}: {setup.summary()['text']}")
        shards[name] = params
    return shards


def local_federation(settings: Settings, run_dir: Path, shards: dict[str, dict]) -> LocalFederation:
    """A director and an envoy per shard (not started yet), with mutual TLS unless tls=0: the certificates in
    certs/, made where missing."""
    certs = None
    if settings.tls:
        certs = ROOT / "certs"
        written = make_certs(certs, envoys=list(shards))
        print(f"mutual TLS with certificates in {certs}" + (f" ({len(written)} files made)" if written else ""))
    policy = envoy_policy(settings.envoy_policy) if settings.envoy_policy else None
    return LocalFederation(run_dir, shards, sample_shape(settings.dataset, settings.size),
                           target_shape(settings.dataset), certs, health_period=settings.health_period or None,
                           policies=dict.fromkeys(shards, policy) if policy else {},
                           state=Path(settings.envoy_state).resolve() if settings.envoy_state else None)


def envoy_policy(path: str) -> dict:
    """envoy_policy=FILE: the policy every envoy gets (YAML, the keys of an envoy config's policy section, or a
    whole envoy config); DataError in one line if it cannot be read or its policy is wrong."""
    try:
        text = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"envoy_policy={path}: cannot read it ({type(exc).__name__}: {exc})") from None
    section = text.get("policy", text) if isinstance(text, dict) else text
    try:
        policy_rules.parse(section, f"envoy_policy={path}")
    except policy_rules.PolicyError as exc:
        raise DataError(str(exc)) from None
    return section


def tracking_uri(settings: Settings) -> str:
    """The MLflow store of the launcher's runs: tracking_uri, or one for every run, runs/mlruns."""
    return settings.tracking_uri or (Path(settings.runs) / "mlruns").as_uri()


def notebook_parameters(settings: Settings, federation: LocalFederation, run_dir: Path, data_source: str) -> dict:
    """What the notebook is given: the notebook settings given, and `run` with where the director is, the
    certificates, where the results go, and the data source."""
    parameters = settings.notebook_parameters()
    run = {**parameters.get("run", {}), "director_host": federation.host, "director_port": federation.port,
           "aggregator_port": free_port(), "experiment_name": run_dir.name, "output_dir": str(run_dir.parent),
           "data_source": data_source}
    if settings.resume_from:
        run["resume_from"] = str(run_dir)
    if settings.tracking:
        run["tracking_uri"] = tracking_uri(settings)
    if federation.certs:
        researcher = federation.certs / RESEARCHER
        run.update(ca_cert=str(federation.certs / "ca.crt"), api_cert=f"{researcher}.crt",
                   api_key=f"{researcher}.key")
    return {**parameters, "run": run}


def run_notebook(run_dir: Path, federation: LocalFederation, settings: Settings, data_source: str, deadline: float,
                 **overrides) -> None:
    """Execute the settings' notebook headless against the federation into run_dir, showing its progress lines live;
    `overrides` replace notebook parameters (make compare's algorithm), and keys of `run` given as a dict."""
    parameters = notebook_parameters(settings, federation, run_dir, data_source)
    parameters = {**parameters, **overrides, "run": {**parameters["run"], **overrides.get("run", {})}}
    attempt = len(list(run_dir.glob("notebook*.ipynb")))  # a resumed run keeps each attempt's notebook and log
    name = f"notebook-resume{attempt}" if attempt else "notebook"
    launch_notebook(federation, Path(settings.notebook), run_dir / f"{name}.ipynb", parameters, deadline,
                    run_dir / "logs" / f"{name}.log")


def launch_notebook(federation: LocalFederation, notebook: Path, output: Path, parameters: dict, deadline: float,
                    log: Path, on_line=None, cwd: Path | None = None) -> None:
    """Run `notebook` with papermill where the federation places its researcher, the parameters injected, in `cwd`
    (default: the notebook's folder), its output to `log`; `on_line` sees each line (default: the progress lines are
    shown). RunError if it fails."""
    placement = federation.placement
    argv = [placement.python, "-m", "papermill", str(notebook), str(output), "--cwd", str(cwd or notebook.parent),
            "--log-output", "--no-progress-bar", "-y", yaml.safe_dump(parameters, default_flow_style=True,
                                                                          width=1_000_000)]
    on_line = on_line or _show_progress
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        with signals_deferred():
            notebook_process = subprocess.Popen(
                placement.command("researcher", argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                stdin=subprocess.DEVNULL, cwd=placement.folder("researcher"),
                env={**os.environ, **placement.env("researcher", federation)}, start_new_session=True)
        try:
            reader = threading.Thread(target=_relay, args=(notebook_process.stdout, out, on_line), daemon=True)
            reader.start()
            watch(notebook_process, federation, deadline, log)
        except BaseException:
            kill_tree(notebook_process)
            raise
        reader.join(timeout=5)
    if notebook_process.returncode != 0:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        raise RunError(f"the notebook failed: {lines[-1] if lines else 'no output'}\n(full log: {log})\n"
                       f"the director's log ends with:\n{tail(federation.director.log, 15)}")


def watch(notebook: subprocess.Popen, federation: LocalFederation, deadline: float, log: Path) -> None:
    """Wait for the notebook, saying when a node exits. A lost envoy is the experiment's to handle (it
    goes on without it, or fails); a lost director gives the notebook a grace period to save and stop."""
    director_gone = None
    while notebook.poll() is None:
        for component in federation.newly_exited():
            status = component.process.returncode
            if component is federation.director:
                director_gone = time.monotonic()
                print(f"  the director exited (status {status}); the notebook saves what it received and stops",
                      flush=True)
            else:
                print(f"  {component.name} exited (status {status}): once the director misses its health checks "
                      f"the experiment goes on without it, or fails (log: {component.log})", flush=True)
        if director_gone and time.monotonic() > director_gone + DIRECTOR_GONE_GRACE_S:
            raise RunError(f"the director exited and the notebook had not stopped {DIRECTOR_GONE_GRACE_S} s later; "
                           f"stopped it. Notebook log: {log}\nthe director's log ends with:\n"
                           f"{tail(federation.director.log, 15)}")
        if time.monotonic() > deadline:
            raise RunError(f"the run took longer than its timeout (the timeout setting); stopped it. Notebook log: "
                           f"{log}")
        time.sleep(0.5)


def _relay(stream, out, on_line) -> None:
    for line in stream:
        out.write(line)
        out.flush()
        on_line(line.rstrip("\n"))


def _show_progress(line: str) -> None:
    if PROGRESS.match(line):
        print(f"  {line}", flush=True)
