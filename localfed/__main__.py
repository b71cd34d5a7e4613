"""`make demo`, `make baseline`, `make bench` and `make compare`: python -m localfed {demo,baseline,bench,compare}
[options]."""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from medfl.aggregator import quorum
from medfl.algorithms import describe
from medfl.researcher import DEFAULTS, ParameterError, check_algorithm
from medfl.wire import WIRE_DTYPES
from medmnist_shard import DataError
from medmnist_shard.descriptor import prepare
from medmnist_shard.partition import STRATEGIES
from medmnist_shard.spec import sample_shape, target_shape
from security.certs import DEFAULT_RESEARCHERS
from security.certs import make as make_certs

from . import ROOT, FederationError, LocalFederation, free_port, kill_tree, signals_deferred, tail
from .data import SOURCES, resolve
from .wire import Profile

# Lines of the notebook's output worth showing live: its progress lines (medfl.run.follow) and summary.
PROGRESS = re.compile(r"^(initial model|model after|round \d|final validation|test |best model|no global model|NOTE|"
                      r"FAILED)")
NOTEBOOK = ROOT / "workspace" / "Pytorch_MedMNIST_2D.ipynb"
RESEARCHER = DEFAULT_RESEARCHERS[0]  # whose certificate the demo's notebook uses and signs with
# Once the director has gone, the notebook gets this long to save what it received and stop.
DIRECTOR_GONE_GRACE_S = 60
# The launcher's own defaults, and where make compare's differ: it is about non-IID hospitals, and a median needs
# more than two envoys to differ from the mean.
LAUNCHER_DEFAULTS = {"envoys": 2, "partition": "iid", "alpha": 0.5}
COMMAND_DEFAULTS = {"compare": {"envoys": 3, "partition": "dirichlet", "alpha": 0.3}}
COMPARED = "fedavg fedprox fedadam median"  # make compare's ALGOS


class RunError(RuntimeError):
    """The run failed; the message says where, with the failing component's log."""


def parse(argv=None) -> argparse.Namespace:
    """Command-line options; the Makefile passes its variables through them, empty ones meaning the default."""
    parser = argparse.ArgumentParser(prog="python -m localfed", description=__doc__)
    parser.add_argument("command", choices=("demo", "baseline", "bench", "compare"))
    # The notebook's training settings, with the notebook's defaults (medfl.researcher.DEFAULTS).
    for option, key, kind in (("--dataset", "dataset", str), ("--size", "size", int),
                              ("--rounds", "rounds_to_train", int), ("--epochs", "epochs_per_round", int),
                              ("--seed", "seed", int),
                              ("--min-envoys", "min_envoys", count_or_share),
                              ("--round-timeout", "round_timeout", float)):
        parser.add_argument(option, type=_or_default(kind, DEFAULTS[key]), default=DEFAULTS[key])
    parser.add_argument("--algo", type=_or_default(str, DEFAULTS["algorithm"]), default=DEFAULTS["algorithm"])
    parser.add_argument("--mu", type=_or_default(float, DEFAULTS["mu"]), default=DEFAULTS["mu"])
    parser.add_argument("--ntd-beta", type=_or_default(float, DEFAULTS["ntd_beta"]), default=DEFAULTS["ntd_beta"])
    parser.add_argument("--wire-dtype", type=_or_default(str, DEFAULTS["wire_dtype"]), default=DEFAULTS["wire_dtype"],
                        help="float32 (lossless), float16 or bfloat16: what the weights' changes travel as")
    parser.add_argument("--server-lr", type=_or_default(float, DEFAULTS["server_learning_rate"]),
                        default=DEFAULTS["server_learning_rate"], help="empty: the FedOpt paper's for the algorithm")
    parser.add_argument("--algorithms", type=_or_default(str, COMPARED), default=COMPARED,
                        help="make compare: the algorithms to train, separated by spaces or commas")
    parser.add_argument("--device", default="", help="override the notebook's device (auto, cpu, cuda, hpu)")
    parser.add_argument("--bf16", type=_or_default(int, None), default=None, choices=(0, 1, None),
                        help="override the notebook's bf16 (1: bfloat16 autocast on CUDA and HPU envoys)")
    parser.add_argument("--stem", default="", choices=("", "patch", "full"),
                        help="override the notebook's stem (patch or full; see medfl/model.py)")
    parser.add_argument("--dp", type=_or_default(int, 0), default=0, choices=(0, 1),
                        help="1: DP-SGD on every envoy (see medfl/privacy.py)")
    parser.add_argument("--epsilon", type=_or_default(float, DEFAULTS["dp_target_epsilon"]),
                        default=DEFAULTS["dp_target_epsilon"], help="with --dp 1: the privacy budget of the run")
    # Empty or absent: the command's default (COMMAND_DEFAULTS, else LAUNCHER_DEFAULTS).
    parser.add_argument("--envoys", type=_or_default(int, None))
    parser.add_argument("--partition", type=_or_default(str, None))
    parser.add_argument("--alpha", type=_or_default(float, None))
    parser.add_argument("--data", type=_or_default(str, "download"), default="download", choices=SOURCES)
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--runs", default=str(ROOT / "runs"))
    parser.add_argument("--notebook", type=_or_default(str, str(NOTEBOOK)), default=str(NOTEBOOK))
    parser.add_argument("--tls", type=_or_default(int, 1), default=1, choices=(0, 1),
                        help="mutual TLS (certificates in certs/)")
    parser.add_argument("--health-period", type=int, default=0,
                        help="seconds between envoys' health checks; one silent for twice as long is lost "
                             "(0: the director config's)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the run is stopped")
    parser.add_argument("--wan", default="", help="bench: also run across hosts, the hospitals' links shaped by this "
                                                   "profile, e.g. 20ms,50mbit,0.5%% (each way); needs root")
    args = parser.parse_args(argv)
    for name, value in {**LAUNCHER_DEFAULTS, **COMMAND_DEFAULTS.get(args.command, {})}.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def count_or_share(text: str):
    """MIN_ENVOYS: a number of envoys (an int) or a share of them (a float)."""
    return int(text) if text.isdigit() else float(text)


def _or_default(kind, default):
    """An argparse type: `kind` of the text, or `default` for an empty one (a Makefile variable left unset)."""

    def convert(text: str):
        return default if text == "" else kind(text)

    convert.__name__ = kind.__name__  # argparse names it in "invalid ... value"
    return convert


def check(args) -> None:
    """Refuse impossible settings before anything starts."""
    if not Path(args.notebook).is_file():
        raise DataError(f"NOTEBOOK={args.notebook} does not exist")
    for name in ("envoys", "rounds", "epochs"):
        if getattr(args, name) < 1:
            raise DataError(f"{name.upper()}={getattr(args, name)}: must be at least 1")
    try:
        needed = quorum(args.min_envoys, args.envoys)
    except ValueError as exc:
        raise DataError(f"MIN_ENVOYS={args.min_envoys}: {exc}") from None
    if needed > args.envoys:
        raise DataError(f"MIN_ENVOYS={args.min_envoys} is more than ENVOYS={args.envoys}")
    if args.round_timeout < 0:
        raise DataError(f"ROUND_TIMEOUT={args.round_timeout}: give seconds, or 0 for no limit")
    if args.partition not in STRATEGIES:
        raise DataError(f"PARTITION={args.partition}: use {' or '.join(STRATEGIES)}")
    if args.wan:
        try:
            Profile.parse(args.wan)
        except ValueError as exc:
            raise DataError(f"WAN={args.wan}: {exc}") from None
    if args.wire_dtype not in WIRE_DTYPES:
        raise DataError(f"WIRE_DTYPE={args.wire_dtype}: use {', '.join(WIRE_DTYPES)}")
    if args.partition == "dirichlet" and not args.alpha > 0:
        raise DataError(f"ALPHA={args.alpha}: the Dirichlet concentration must be positive")
    algorithms = compared(args) if args.command == "compare" else [args.algo]
    if not algorithms:
        raise DataError("ALGOS is empty: name the algorithms to compare, e.g. fedavg,fedprox")
    try:
        for algorithm in algorithms:
            check_algorithm(algorithm, args.mu, args.server_lr, ntd_beta=args.ntd_beta, dataset=args.dataset)
    except ParameterError as exc:
        # The notebook's parameter names, as the Makefile's variables.
        name, _, rest = str(exc).partition("=")
        make = {"algorithm": "ALGOS" if args.command == "compare" else "ALGO", "mu": "MU",
                "server_learning_rate": "SERVER_LR", "ntd_beta": "NTD_BETA"}
        raise DataError(f"{make.get(name, name)}={rest}") from None


def compared(args) -> list[str]:
    """make compare's algorithms, in the order given."""
    return [name for name in re.split(r"[\s,]+", args.algorithms) if name]


def shard_params(args, data_dir: Path) -> dict[str, dict]:
    """Every envoy's shard descriptor params, each checked (and its samples chosen) up front."""
    shards = {}
    for rank in range(1, args.envoys + 1):
        params = {"flag": args.dataset, "size": int(args.size), "data_dir": str(data_dir),
                  "rank_worldsize": f"{rank},{args.envoys}", "partition": args.partition, "alpha": args.alpha,
                  "seed": args.seed, "download": False}
        setup = prepare(**params)
        print(f"  envoy_{rank}: {setup.summary()['text']}")
        shards[f"envoy_{rank}"] = params
    return shards


def local_federation(args, run_dir: Path, shards: dict[str, dict]) -> LocalFederation:
    """A director and an envoy per shard (not started yet), with mutual TLS unless TLS=0: the certificates in
    certs/, made where missing."""
    certs = None
    if args.tls:
        certs = ROOT / "certs"
        written = make_certs(certs, envoys=list(shards))
        print(f"mutual TLS with certificates in {certs}" + (f" ({len(written)} files made)" if written else ""))
    return LocalFederation(run_dir, shards, sample_shape(args.dataset, args.size), target_shape(args.dataset),
                           certs, health_period=args.health_period or None)


def run_notebook(run_dir: Path, federation: LocalFederation, args, data_source: str, deadline: float,
                 algorithm: str | None = None) -> None:
    """Execute the notebook headless against the federation, showing its progress lines live; `algorithm`
    overrides ALGO (make compare)."""
    notebook_path = Path(args.notebook).resolve()
    command = [sys.executable, "-m", "papermill", str(notebook_path), str(run_dir / "notebook.ipynb"),
               "--cwd", str(notebook_path.parent), "--log-output", "--no-progress-bar",
               "-p", "dataset", args.dataset, "-p", "size", str(args.size), "-p", "rounds_to_train", str(args.rounds),
               "-p", "epochs_per_round", str(args.epochs), "-p", "seed", str(args.seed),
               "-p", "director_host", federation.host, "-p", "director_port", str(federation.port),
               "-p", "aggregator_port", str(free_port()),
               "-p", "experiment_name", run_dir.name, "-p", "output_dir", str(run_dir.parent),
               "-p", "data_source", data_source, "-p", "min_envoys", str(args.min_envoys),
               "-p", "round_timeout", str(args.round_timeout), *(["-p", "device", args.device] if args.device else []),
               *(["-p", "bf16", str(bool(args.bf16))] if args.bf16 is not None else []),
               *(["-p", "stem", args.stem] if args.stem else []),
               *(["-p", "dp", "True", "-p", "dp_target_epsilon", str(args.epsilon)] if args.dp else []),
               "-p", "algorithm", algorithm or args.algo, "-p", "mu", str(args.mu),
               "-p", "ntd_beta", str(args.ntd_beta), "-p", "wire_dtype", args.wire_dtype,
               *(["-p", "server_learning_rate", str(args.server_lr)] if args.server_lr is not None else [])]
    if federation.certs:
        researcher = federation.certs / RESEARCHER
        command += ["-p", "ca_cert", str(federation.certs / "ca.crt"), "-p", "api_cert", f"{researcher}.crt",
                    "-p", "api_key", f"{researcher}.key"]
    log = run_dir / "logs" / "notebook.log"
    with open(log, "w") as out:
        with signals_deferred():
            notebook = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            reader = threading.Thread(target=_relay, args=(notebook.stdout, out), daemon=True)
            reader.start()
            watch(notebook, federation, deadline, log)
        except BaseException:
            kill_tree(notebook)
            raise
        reader.join(timeout=5)
    if notebook.returncode != 0:
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
            raise RunError(f"the run took longer than --timeout; stopped it. Notebook log: {log}")
        time.sleep(0.5)


def _relay(stream, out) -> None:
    for line in stream:
        out.write(line)
        out.flush()
        if PROGRESS.match(line):
            print(f"  {line.rstrip()}", flush=True)


def demo(args) -> int:
    """Bring up a director and ENVOYS envoys, run the notebook, stop everything; 0 on success."""
    started = time.monotonic()
    deadline = started + args.timeout
    data_dir, data_source = resolve(args.dataset, args.size, args.data, args.data_dir)
    print(f"data: {data_source} ({data_dir})")
    shards = shard_params(args, data_dir)
    run_dir = Path(args.runs).resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.dataset}-{args.size}"
    federation = local_federation(args, run_dir, shards)
    print(f"run folder: {run_dir}")
    print(f"starting a director and {args.envoys} envoys on {federation.host}:{federation.port} ...")
    with federation:
        print(f"all {args.envoys} envoys registered; running the notebook "
              f"({args.rounds} rounds x {args.epochs} epochs)")
        run_notebook(run_dir, federation, args, data_source, deadline)
        memory = federation.peak_rss_mb()
    results = json.loads((run_dir / "results.json").read_text())
    test = results["test"]
    print(f"\ndone in {time.monotonic() - started:.0f} s"
          + (" -- SYNTHETIC data, not MedMNIST" if results["synthetic"] else ""))
    for dropout in results["dropouts"]:
        print(f"{dropout['envoy']} dropped out of {dropout['experiment']} in round {dropout['round']}: "
              f"{dropout['reason']}")
    print(f"algorithm: {describe(results['algorithm'])}")
    print(f"best model: after {results['best']['round']} rounds (val {results['best']['metric']} "
          f"{results['best']['value']:.4f}); test ACC {test['acc']:.4f}, AUC {test['auc']:.4f}")
    if results["privacy"]:
        print(f"DP-SGD: {results['privacy']['summary']}")
    print("peak memory (MB): " + ", ".join(f"{name} {mb:.0f}" for name, mb in memory.items()))
    print(f"results: {run_dir}  (runs/latest points there)")
    return 0


def _interrupt(signum, frame):
    # SIGTERM (a CI runner, `kill`) stops the run as Ctrl-C does: every process we started ends.
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """Run a command; a failure prints one clear message (and the failing log) and exits non-zero."""
    args = parse(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        check(args)
        if args.command == "demo":
            return demo(args)
        if args.command == "bench":
            from .bench import bench

            return bench(args)
        if args.command == "compare":
            from .compare import compare

            return compare(args)
        from .baseline import baseline

        return baseline(args)
    except KeyboardInterrupt:
        print("\ninterrupted: stopped the director, the envoys and the notebook", file=sys.stderr)
        return 130
    except (DataError, FederationError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # localfed.compare imports this launcher's helpers as localfed.__main__: let that be this module, not a copy.
    sys.modules.setdefault("localfed.__main__", sys.modules[__name__])
    sys.exit(main())
