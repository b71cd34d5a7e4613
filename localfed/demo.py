"""`make demo`: a director and its envoys on this machine, the notebook run headless against them, and a summary."""
from __future__ import annotations

import json
import time
from pathlib import Path

from medfl.algorithms import describe
from medfl.researcher.checkpoint import FILE
from medfl.researcher.report import with_interval
from medmnist_shard import DataError

from .run import data_for, envoy_policy, local_federation, run_notebook, shard_params
from .settings import GIVEN_FILE, Settings


def demo(settings: Settings) -> int:
    """Bring up a director and its envoys, run the notebook, stop everything; 0 on success."""
    started = time.monotonic()
    deadline = started + settings.timeout
    if settings.envoy_policy and not settings.envoy_state and \
            (envoy_policy(settings.envoy_policy) or {}).get("approval") == "manual":
        # The nodes keep what their operators approved across runs, as a hospital's envoy does
        settings = settings.replace(envoy_state=str(Path(settings.runs) / "node-state"))
        print(f"approval: manual: the envoys keep their approvals in {settings.envoy_state} (envoy_state=)")
    data_dir, data_source = data_for(settings)
    print(f"data: {data_source} ({data_dir or settings.data_dirs})")
    shards = shard_params(settings, data_dir)
    if settings.resume_from:  # the run's folder, which its first make demo wrote (localfed.settings)
        run_dir = Path(settings.resume_from)
        if not (run_dir / FILE).is_file():
            raise DataError(f"resume_from={run_dir}: no {FILE} there (a run writes one after each round it completes): "
                            "nothing to resume; start a new run with make demo")
        print(f"resuming the run in {run_dir} from its checkpoint")
    else:
        run_dir = Path(settings.runs) / f"{time.strftime('%Y%m%d-%H%M%S')}-{settings.dataset}-{settings.size}"
        run_dir.mkdir(parents=True, exist_ok=True)
        given = {name: settings.values[name] for name in sorted(settings.given) if name != "timeout"}
        (run_dir / GIVEN_FILE).write_text(json.dumps(given, indent=1))
    federation = local_federation(settings, run_dir, shards)
    print(f"run folder: {run_dir}")
    print(f"starting a director and {settings.envoys} envoys on {federation.host}:{federation.port} ...")
    with federation:
        print(f"all {settings.envoys} envoys registered; running the notebook "
              f"({settings.rounds} rounds x {settings.epochs} epochs)")
        run_notebook(run_dir, federation, settings, data_source, deadline)
        memory = federation.peak_rss_mb()
    results = json.loads((run_dir / "results.json").read_text())
    test = results["test"]
    for restart in results["restarts"]:
        print(f"resumed after round {restart['after_round']} ({restart['why']})")
    print(f"\ndone in {time.monotonic() - started:.0f} s"
          + (" -- SYNTHETIC data, not MedMNIST" if results["synthetic"] else ""))
    for dropout in results["dropouts"]:
        print(f"{dropout['envoy']} dropped out of {dropout['experiment']} in round {dropout['round']}: "
              f"{dropout['reason']}")
    print(f"algorithm: {describe(results['algorithm'])}")
    print(f"best model: after {results['best']['round']} rounds (val {results['best']['metric']} "
          f"{results['best']['value']:.4f}); test ACC {with_interval(test, 'acc')}, AUC {with_interval(test, 'auc')}")
    personal = test.get("personalized")
    if personal:
        epochs = f"{personal['epochs']} epoch{'s' if personal['epochs'] != 1 else ''}"
        print(f"each envoy's model, fine-tuned {epochs} on its own data: test ACC "
              + ", ".join(f"{name} {e['acc']:.4f} (federated {test['per_envoy'][name]['acc']:.4f})"
                          for name, e in sorted(personal["per_envoy"].items())))
    if results["privacy"]:
        print(f"DP-SGD: {results['privacy']['summary']}")
    print("peak memory (MB): " + ", ".join(f"{name} {mb:.0f}" for name, mb in memory.items()))
    print(f"results: {run_dir}  (runs/latest points there)")
    return 0
