"""`make bench`: the federation against the compute it does, measured in one run.

1. The compute limit: exactly the federation's work (the notebook's own model, data interface and tasks, batch
   sizes, shards, passes:
   per round a validation of the global model, EPOCHS training epochs and a validation of the
   local model on every envoy, plus the final validation round), done in-process by one worker
   process per envoy with the envoys' thread share, tensors in memory, weights averaged in between.
2. The real federation: director and envoys as processes and the notebook run headless against them, as
   `make demo` does; timed from the notebook's submission to the end of training (its results.json and
   metrics.csv say when each happened).
3. With WAN=PROFILE (e.g. 20ms,50mbit,0.5%: each way), the same federation again across hosts (localfed.hosts:
   network namespaces, two hospitals whose links carry the profile), to set its round overhead beside loopback's.

The last line printed is one JSON object with the ratios.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import torch

from medfl import pick_device, task_type
from medmnist_shard import DataError, MedMNISTShardDescriptor
from medmnist_shard.spec import file_name, info
from medmnist_shard.synthetic import make_synthetic

from .federation import ROOT
from .notebook import definitions
from .run import local_federation, run_notebook
from .settings import Settings


def bench_data(flag: str, size: int) -> Path:
    """A synthetic file with MedMNIST's real split sizes for the flag, made once."""
    sizes = {s: n for s, n in info(flag)["n_samples"].items()}
    folder = ROOT / "data" / "bench" / "-".join(str(sizes[s]) for s in ("train", "val", "test"))
    if not (folder / file_name(flag, size)).is_file():
        print(f"writing synthetic {flag} {size}px with MedMNIST's split sizes {sizes} ...", flush=True)
        make_synthetic(flag, size, folder, sizes)
    return folder


# --- 1. the compute limit -----------------------------------------------------------------------
_worker: dict = {}


def _init_worker(notebook, parameters, batches, data_dir, rank, envoys, threads):
    torch.set_num_threads(threads)
    defs = definitions(notebook, **parameters)
    flag, size, device = parameters["dataset"], parameters["size"], parameters["device"]
    descriptor = MedMNISTShardDescriptor(flag, size, data_dir, f"{rank},{envoys}", download=False)
    data = defs.MedMNISTData(train_batch_size=batches[0], eval_batch_size=batches[1], device=device)
    data.shard_descriptor = descriptor
    _worker.update(data=data, model=defs.model, optimizer=torch.optim.Adam(defs.model.parameters(), lr=batches[2]),
                   task=task_type(flag), train=defs.train, validate=defs.validate,
                   on={"device_request": device, "bf16": parameters["bf16"]})


def _round(state: dict, epochs: int, train_round: bool) -> dict:
    """One envoy's work in one round, as the federation's tasks do it, on the same device."""
    w = _worker
    w["model"].load_state_dict(state)
    started = time.perf_counter()
    scored = w["validate"](w["model"], w["data"].get_valid_loader(), "cpu", task=w["task"], **w["on"])
    out = {"val_seconds": scored["seconds"]}
    if train_round:
        trained = w["train"](w["model"], w["data"].get_train_loader(), w["optimizer"], "cpu", task=w["task"],
                        epochs=epochs, **w["on"])
        out["train_seconds"] = trained["train_seconds"]
        out["train_images"] = epochs * w["data"].get_train_data_size()
        out["state"] = {k: v.detach().cpu().clone() for k, v in w["model"].state_dict().items()}
        out["weight"] = w["data"].get_train_data_size()
        w["validate"](w["model"], w["data"].get_valid_loader(), "cpu", task=w["task"], **w["on"])
    out["seconds"] = time.perf_counter() - started
    return out


def _worker_report() -> dict:
    """The worker's device, as its tasks resolved it, and its peak memory: what the same work costs outside
    a federation (a CUDA context included)."""
    device = pick_device(_worker["on"]["device_request"])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
    return {"device": str(device), "device_name": name, "peak_rss_mb": _peak_rss_mb(os.getpid())}


def _call(args):
    return _round(*args)


def compute_limit(settings: Settings, data_dir: Path, threads: int, out: Path) -> dict:
    """Wall time, training throughput and peak memory of the same work with no federation, with the notebook's own
    model, data interface and tasks."""
    s, envoys, rounds, epochs = settings, settings.envoys, settings.rounds, settings.epochs
    parameters = {**s.notebook_parameters(), "dataset": s.dataset, "size": s.size, "device": s.device,
                  "bf16": s.bf16, "run": {"stem": s.stem}}
    batches = (s.train_batch_size, s.eval_batch_size, s.learning_rate)
    ctx = multiprocessing.get_context("spawn")
    pools = [ctx.Pool(1, _init_worker, (s.notebook, parameters, batches, str(data_dir), r, envoys, threads))
             for r in range(1, envoys + 1)]
    try:
        model = definitions(s.notebook, **parameters).model  # as the notebook's model cell builds it, seeded
        state = model.state_dict()
        for pool in pools:  # load the data before the clock starts, as the envoys do before submission
            pool.apply(time.sleep, (0,))
        started = time.perf_counter()
        images = seconds = 0.0
        for r in range(rounds + 1):
            jobs = [pool.apply_async(_call, ((state, epochs, r < rounds),)) for pool in pools]
            results = [job.get() for job in jobs]
            if r < rounds:
                total = sum(x["weight"] for x in results)
                state = {k: sum(x["state"][k].float() * x["weight"] for x in results) / total for k in state}
                images += sum(x["train_images"] for x in results)
                seconds += sum(x["train_seconds"] for x in results)
        wall = time.perf_counter() - started
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()})
        torch.save(model.state_dict(), out)
        workers = [pool.apply(_worker_report) for pool in pools]
        return {"wall_s": wall, "train_images_per_s": images / seconds, "workers": workers}
    finally:
        for pool in pools:
            pool.terminate()


# --- 2. the real federation ---------------------------------------------------------------------
def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def federation_run(settings: Settings, data_dir: Path, workdir: Path) -> dict:
    """The notebook against a real director and envoys: wall time from submission to the end of training,
    per-round overheads, training throughput and peak memory."""
    flag, size, envoys = settings.dataset, int(settings.size), settings.envoys
    shards = {f"envoy_{r}": {"flag": flag, "size": size, "data_dir": str(data_dir), "rank_worldsize": f"{r},{envoys}",
                             "download": False} for r in range(1, envoys + 1)}
    with local_federation(settings, workdir, shards) as fed:
        run_notebook(workdir, fed, settings, "synthetic", time.monotonic() + settings.timeout)
        rss = fed.peak_rss_mb()
    timing = run_timing(workdir)
    rss["notebook"] = timing.pop("notebook_peak_rss_mb")
    train_images = settings.epochs * settings.rounds * info(flag)["n_samples"]["train"]
    train_seconds = timing.pop("train_seconds")
    return {**timing, "train_images_per_s": train_images / train_seconds, "peak_rss_mb": rss}


def run_timing(run_dir: Path) -> dict:
    """A notebook run's wall time from submission to the end of training, and its round overheads: each round's
    wall time (between the aggregator's reports) minus the slowest envoy's compute in it (what its tasks timed)."""
    results = json.loads((run_dir / "results.json").read_text())
    with open(run_dir / "metrics.csv") as rows:
        metrics = [{**m, "round": int(m["round"]), "time": float(m["time"]), "value": float(m["value"])}
                   for m in csv.DictReader(rows) if m["experiment"] == "train"]
    ends, compute, train_s = {}, {}, 0.0
    for m in metrics:
        r = m["round"]
        if m["origin"] == "aggregator":
            ends[r] = max(ends.get(r, 0), m["time"])
        elif m["metric"] in ("seconds", "train_seconds"):
            compute.setdefault(r, {}).setdefault(m["origin"], 0.0)
            compute[r][m["origin"]] += m["value"]
            if m["metric"] == "train_seconds":
                train_s += m["value"]
    overheads = [ends[r] - ends[r - 1] - max(compute[r].values()) for r in sorted(ends) if r > 0]
    timing = results["timing"]
    return {"wall_s": timing["trained"] - timing["submitted"], "round_overhead_s": statistics.median(overheads),
            "round_overheads_s": overheads, "train_seconds": train_s,
            "notebook_peak_rss_mb": timing["notebook_peak_rss_mb"]}


def wire_figures(run_dir: Path) -> dict:
    """What one envoy moved in a training round (the median over envoys and training rounds) and how many
    connections each envoy opened to the aggregator in the training experiment, from results.json's traffic."""
    results = json.loads((run_dir / "results.json").read_text())
    training = [t for t in results["traffic"] if t["round"] < results["params"]["rounds"]]
    shares = [share for t in training for share in t["per_envoy"].values()]
    envoys = sorted({name for t in results["traffic"] for name in t["per_envoy"]})
    return {"up_bytes": statistics.median(s["received_bytes"] for s in shares),
            "down_bytes": statistics.median(s["sent_bytes"] for s in shares),
            "connections": {name: sum(t["per_envoy"].get(name, {}).get("connections", 0) for t in results["traffic"])
                            for name in envoys}}


def model_bytes(state: dict) -> int:
    """A state dict's tensors as float32, as OpenFL puts them on the wire (BatchNorm's counters included)."""
    return 4 * sum(t.numel() for t in state.values())


# The round trips a round cannot do without: the envoy learns of its tasks, fetches the model, delivers its results.
ROUND_TRIPS = 3


def physical_limit(figures: dict, profile) -> float:
    """A round's least overhead on the link: one envoy's bytes down and up at the link's rate, plus ROUND_TRIPS."""
    on_the_line = (figures["down_bytes"] + figures["up_bytes"]) * 8 / profile.rate if profile.rate else 0.0
    return on_the_line + ROUND_TRIPS * 2 * profile.delay


def _wire_line(figures: dict, weights: int) -> str:
    connections = ", ".join(f"{name} {n}" for name, n in figures["connections"].items())
    return (f"per envoy and training round: up {figures['up_bytes'] / 1e6:.3f} MB (the model's {weights / 1e6:.3f} MB "
            f"x {figures['up_bytes'] / weights:.2f}), down {figures['down_bytes'] / 1e6:.3f} MB; connections to the "
            f"aggregator in the experiment: {connections}")


def hosts_run(settings: Settings, data_dir: Path, workdir: Path) -> dict:
    """The same notebook run across hosts (localfed.hosts): two hospitals whose links carry the WAN profile."""
    from .hosts import HOSPITALS, HostsFederation
    from .netns import Network, install_nftables, unavailable
    from .wan import Profile

    wan = settings.wan
    if settings.envoys != len(HOSPITALS):
        raise DataError(f"wan={wan} runs {len(HOSPITALS)} envoys, one per hospital host: envoys={len(HOSPITALS)}")
    install_nftables(lambda line: print(f"across hosts: {line}", flush=True))
    reason = unavailable()
    if reason:
        raise DataError(f"wan={wan}: {reason}")
    flag, size = settings.dataset, int(settings.size)
    with Network(Profile.parse(wan), logs=workdir / "logs") as network:
        print(f"across hosts: {network.describe()}", flush=True)
        # The director config's own health period (10 s): nothing is cut here.
        fed = HostsFederation(workdir, network, data_dir / file_name(flag, size), flag, size, health_period=10)
        try:
            fed.prepare()
            fed.start()
            parameters = settings.notebook_parameters()
            parameters["run"] = {**parameters.get("run", {}), "data_source": "synthetic"}
            run_dir = fed.notebook("bench", parameters, timeout=settings.timeout)
        finally:
            fed.stop()
        return {**run_timing(run_dir), **wire_figures(run_dir), "link": network.describe(), "profile": network.profile,
                "run_dir": run_dir}


# Beyond the same work in a bare process (the limit's workers, CUDA context included): OpenFL, gRPC, the
# experiment's own copies of model and plan. Measured here at 28 px: 230 to 260 MB.
FEDERATION_MB = 400


def bench(settings: Settings) -> int:
    """Run both sides on the same device, print a table and, last, one JSON line."""
    # Both sides run with the same device, bf16 and stem, given to the notebook even where they are its defaults.
    settings = settings.replace(device=settings.device, bf16=settings.bf16, stem=settings.stem)
    flag, size = settings.dataset, int(settings.size)
    envoys, rounds, epochs = settings.envoys, settings.rounds, settings.epochs
    device, bf16, stem = settings.device, settings.bf16, settings.stem
    threads = max(1, (os.cpu_count() or 1) // envoys)
    data_dir = bench_data(flag, size)
    workdir = Path(settings.runs) / f"bench-{time.strftime('%Y%m%d-%H%M%S')}-{flag}-{size}"
    workdir.mkdir(parents=True)
    print(f"workload: {flag} {size}px, {info(flag)['n_samples']}, {envoys} envoys x {threads} threads, "
          f"{rounds} rounds x {epochs} epochs, batch {settings.train_batch_size}, device {device}, "
          f"bf16 {'on' if bf16 else 'off'}, stem {stem} (SYNTHETIC data)", flush=True)
    limit = compute_limit(settings, data_dir, threads, workdir / "limit_model.pt")
    measured = limit["workers"][0]
    print(f"compute limit: {limit['wall_s']:.1f} s on {measured['device']} ({measured['device_name']})", flush=True)
    fed = federation_run(settings, data_dir, workdir)
    result = {
        "device": measured["device"], "device_name": measured["device_name"], "bf16": bf16, "stem": stem,
        "wall_s": round(fed["wall_s"], 2),
        "limit_s": round(limit["wall_s"], 2),
        "wall_over_limit": round(fed["wall_s"] / limit["wall_s"], 3),
        "train_throughput_over_limit": round(fed["train_images_per_s"] / limit["train_images_per_s"], 3),
        "round_overhead_s": round(fed["round_overhead_s"], 3),
        "peak_rss_mb": {k: round(v) for k, v in fed["peak_rss_mb"].items()},
        "limit_peak_rss_mb": [round(w["peak_rss_mb"]) for w in limit["workers"]],
    }
    rows = [("wall, submission to trained model", f"{fed['wall_s']:.1f} s", f"{limit['wall_s']:.1f} s",
             f"{result['wall_over_limit']:.2f}", "<= 1.2"),
            ("training images/s per envoy", f"{fed['train_images_per_s']:.0f}", f"{limit['train_images_per_s']:.0f}",
             f"{result['train_throughput_over_limit']:.2f}", ">= 0.9"),
            ("round overhead (median)", f"{fed['round_overhead_s']:.2f} s", "", "", "<= 1.0 s")]
    print(f"\nmeasured on {measured['device']} ({measured['device_name']}), bf16 {'on' if bf16 else 'off'}, "
          f"stem {stem}")
    print(f"{'':34}{'federation':>12}{'limit':>10}{'ratio':>8}{'target':>10}")
    for row in rows:
        print(f"{row[0]:34}{row[1]:>12}{row[2]:>10}{row[3]:>8}{row[4]:>10}")
    print("round overheads: " + ", ".join(f"{x:.2f} s" for x in fed["round_overheads_s"]))
    for i, worker in enumerate(limit["workers"], 1):
        name, bare = f"envoy_{i}", worker["peak_rss_mb"]
        print(f"{name} peak RSS {result['peak_rss_mb'][name]} MB; target <= the same work in a bare process, "
              f"{bare:.0f} MB, + {FEDERATION_MB} MB = {bare + FEDERATION_MB:.0f} MB")
    print(f"director peak RSS {result['peak_rss_mb']['director']} MB; notebook {result['peak_rss_mb']['notebook']} MB")
    weights = model_bytes(torch.load(workdir / "limit_model.pt"))
    loopback = wire_figures(workdir)
    test = json.loads((workdir / "results.json").read_text())["test"]
    result.update(model_bytes=weights, up_bytes=loopback["up_bytes"], down_bytes=loopback["down_bytes"],
                  connections=loopback["connections"], wire_dtype=settings.wire_dtype, test_acc=round(test["acc"], 4),
                  test_auc=round(test["auc"], 4))
    print(f"on the wire ({settings.wire_dtype}), {_wire_line(loopback, weights)}")
    print(f"the best model on the envoys' test splits (SYNTHETIC data): ACC {test['acc']:.4f}, AUC {test['auc']:.4f}")
    if settings.secure_aggregation:
        result["secure_aggregation"] = secure_against_plain(settings, data_dir, workdir, fed, loopback)
    if settings.wan:
        hosts = hosts_run(settings, data_dir, workdir / "hosts")
        limit = physical_limit(hosts, hosts["profile"])
        result["hosts"] = {"link": hosts["link"], "wall_s": round(hosts["wall_s"], 2),
                           "wall_over_loopback": round(hosts["wall_s"] / fed["wall_s"], 3),
                           "round_overhead_s": round(hosts["round_overhead_s"], 3),
                           "round_overheads_s": [round(x, 3) for x in hosts["round_overheads_s"]],
                           "physical_limit_s": round(limit, 3),
                           # An unshaped link (WAN=0ms) has no limit to compare with.
                           "overhead_over_limit": round(hosts["round_overhead_s"] / limit, 3) if limit else None,
                           "up_bytes": hosts["up_bytes"], "down_bytes": hosts["down_bytes"],
                           "connections": hosts["connections"]}
        h, p = result["hosts"], hosts["profile"]
        print(f"\nacross hosts, {hosts['link']}")
        print(f"{'':34}{'loopback':>12}{'across hosts':>14}{'ratio':>8}{'target':>10}")
        print(f"{'wall, submission to trained model':34}{fed['wall_s']:>10.1f} s{hosts['wall_s']:>12.1f} s"
              f"{h['wall_over_loopback']:>8.2f}{'<= 1.3':>10}")
        print(f"{'round overhead (median)':34}{fed['round_overhead_s']:>10.2f} s{hosts['round_overhead_s']:>12.2f} s"
              f"{'':>8}{'<= 1.0 s':>10}")
        ratio = f"{h['overhead_over_limit']:.2f}" if limit else "-"
        print(f"{'its physical limit':34}{'':>12}{limit:>12.2f} s{ratio:>8}{'<= 2':>10}")
        rate = f"{p.rate / 1e6:g} Mbit/s" if p.rate else "an unlimited rate"
        moved, trips = (h["down_bytes"] + h["up_bytes"]) / 1e6, ROUND_TRIPS * 2 * p.delay
        print(f"the limit: {moved:.2f} MB down and up per envoy at {rate} each way ({limit - trips:.2f} s), plus "
              f"{ROUND_TRIPS} round trips of {2 * p.delay * 1000:g} ms (tasks, model, results); an envoy's upload "
              "overlaps its local validation, so a round can beat it")
        print("round overheads across hosts: " + ", ".join(f"{x:.2f} s" for x in hosts["round_overheads_s"]))
        print(f"across hosts, {_wire_line(hosts, weights)}")
        if settings.secure_aggregation:
            result["hosts"]["protocol_s"] = round(_protocol_s(hosts["run_dir"]), 3)
            print(f"across hosts, the secure aggregation protocol took {result['hosts']['protocol_s']:.2f} s a round "
                  "(median)")
    print(json.dumps(result))
    return 0


def _protocol_s(run_dir: Path) -> float:
    """The median round's secure aggregation protocol, keys to unmasking, as the director timed it."""
    rounds = json.loads((run_dir / "results.json").read_text())["secure_aggregation"]["rounds"]
    return statistics.median(r["seconds"] for r in rounds)


def secure_against_plain(settings: Settings, data_dir: Path, workdir: Path, secure: dict, wire: dict) -> dict:
    """SECAGG=1: the same federation once more without secure aggregation, and what secure aggregation cost."""
    plain = federation_run(settings.replace(secure_aggregation=False), data_dir, workdir / "plain")
    plain_wire = wire_figures(workdir / "plain")
    tests = [json.loads((d / "results.json").read_text())["test"] for d in (workdir, workdir / "plain")]
    figures = {"wall_over_plain": round(secure["wall_s"] / plain["wall_s"], 3),
               "plain_wall_s": round(plain["wall_s"], 2), "protocol_s": round(_protocol_s(workdir), 3),
               "up_over_plain": round(wire["up_bytes"] / plain_wire["up_bytes"], 3),
               "down_over_plain": round(wire["down_bytes"] / plain_wire["down_bytes"], 3),
               "test_acc_difference": round(tests[0]["acc"] - tests[1]["acc"], 6)}
    print(f"\nsecure aggregation against plain {settings.algorithm}, on loopback:")
    print(f"{'':34}{'secure':>12}{'plain':>10}{'ratio':>8}{'target':>10}")
    print(f"{'wall, submission to trained model':34}{secure['wall_s']:>10.1f} s{plain['wall_s']:>8.1f} s"
          f"{figures['wall_over_plain']:>8.2f}{'<= 1.2':>10}")
    print(f"{'up per envoy and round':34}{wire['up_bytes'] / 1e6:>9.3f} MB{plain_wire['up_bytes'] / 1e6:>7.3f} MB"
          f"{figures['up_over_plain']:>8.2f}")
    print(f"{'down per envoy and round':34}{wire['down_bytes'] / 1e6:>9.3f} MB{plain_wire['down_bytes'] / 1e6:>7.3f} MB"
          f"{figures['down_over_plain']:>8.2f}")
    print(f"{'test ACC':34}{tests[0]['acc']:>12.4f}{tests[1]['acc']:>10.4f}")
    print(f"the protocol (keys, shares, masked inputs, unmasking) took {figures['protocol_s']:.2f} s a round (median)")
    return figures
