"""`make demo`: a director and its envoys on this machine, the notebook run headless against them, and a summary."""
from __future__ import annotations

import json
import time
from pathlib import Path

from medfl.algorithms import describe

from .data import resolve
from .run import local_federation, run_notebook, shard_params
from .settings import Settings


def demo(settings: Settings) -> int:
    """Bring up a director and its envoys, run the notebook, stop everything; 0 on success."""
    started = time.monotonic()
    deadline = started + settings.timeout
    data_dir, data_source = resolve(settings.dataset, settings.size, settings.data, settings.data_dir)
    print(f"data: {data_source} ({data_dir})")
    shards = shard_params(settings, data_dir)
    run_dir = Path(settings.runs) / f"{time.strftime('%Y%m%d-%H%M%S')}-{settings.dataset}-{settings.size}"
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
