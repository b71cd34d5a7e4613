"""Checks of a run's results.json that the notebook test and the launcher test share."""
import math


def check_results(results: dict, *, envoys: list[str], rounds: int) -> None:
    """Assert the documented schema and that every metric lies in its range."""
    for key in ("status", "error", "dataset", "size", "data_source", "partition", "envoys", "rounds", "dropouts",
                "test", "wall_seconds", "best_model", "last_model", "best", "tls", "attempt", "restarts", "refusals",
                "held"):
        assert key in results, key
    assert (results["status"], results["error"], results["dropouts"], results["restarts"], results["refusals"],
            results["held"], results["rejected_updates"], results["clipped_updates"]) == \
        ("completed", None, [], [], [], [], [], [])  # an honest federation: nothing rejected or clipped
    assert results["data_source"] in ("download", "file", "synthetic", "medmnist")
    assert [e["name"] for e in results["envoys"]] == envoys
    for e in results["envoys"]:
        assert min(e["train"], e["val"], e["test"]) > 0 and sum(e["label_histogram"]["train"]) > 0
    assert [e["round"] for e in results["rounds"]] == list(range(rounds + 1))
    for entry in results["rounds"]:
        for values in [entry["aggregated"], *entry["envoys"].values()]:
            assert {"val_loss", "val_acc", "val_auc"} <= set(values)
            assert ("train_loss" in values) == (entry["round"] > 0)
            assert 0 <= values["val_acc"] <= 1 and 0 <= values["val_auc"] <= 1
            assert all(math.isfinite(v) and v >= 0 for v in values.values())
        assert sorted(entry["envoys"]) == envoys
    test = results["test"]
    assert sorted(test["per_envoy"]) == envoys
    for block in [test, *test["per_envoy"].values()]:
        assert 0 <= block["acc"] <= 1 and 0 <= block["auc"] <= 1 and block["loss"] >= 0
        for metric in ("acc", "auc", "loss"):  # every test score with its 95 % interval (run["bootstrap"] > 0)
            low, high = block["ci"][metric]
            assert low <= block[metric] <= high, metric
    assert 0 <= results["best"]["round"] <= rounds
    traffic = results["traffic"]
    assert [t["round"] for t in traffic] == list(range(rounds + 1))
    for t in traffic:
        assert sorted(t["per_envoy"]) == envoys
        for what in ("received_bytes", "sent_bytes", "connections"):
            assert t[what] == sum(share[what] for share in t["per_envoy"].values()), what
    assert results["wall_seconds"] > 0
    timing = results["timing"]
    assert timing["submitted"] < timing["trained"] <= timing["tested"] and timing["notebook_peak_rss_mb"] > 0
