"""The pieces of a run that survives its director, in one process: the checkpoint file and its refusals, the server
optimizer's state across the wire, the best model and metrics replayed, each envoy's shuffling resumed, and the
restarts results.json lists. tests/test_resume.py kills real directors."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from openfl.utilities import LocalTensor

from medfl import Best, MedMNISTData, build_model
from medfl.algorithms import ServerOptimizer
from medfl.events import ROUND_KEY, STATE_PREFIX, TRAFFIC, VALIDATE_GLOBAL, pack, unpack
from medfl.researcher import (
    Checkpoint,
    Checkpointer,
    ParameterError,
    attempt_name,
    follow,
    load_checkpoint,
    restarts,
)
from medfl.researcher.checkpoint import FILE, save
from medmnist_shard import MedMNISTShardDescriptor

PARAMS = {"dataset": "bloodmnist", "size": 28, "rounds": 4, "epochs": 1, "train_batch_size": 64,
          "eval_batch_size": 256, "learning_rate": 1e-3, "algorithm": "fedavg", "algorithm_options": {},
          "dp": False, "dp_options": {}, "seed": 0, "stem": "patch", "wire_dtype": "float32",
          "secure_aggregation": False, "max_update_ratio": 10.0, "max_rejections": 2, "rejection_window": 5}
ONLINE = [{"envoy": "envoy_1", "online": True}, {"envoy": "envoy_2", "online": True}]


def _checkpoint(model=None, **changes) -> Checkpoint:
    model = model or build_model("bloodmnist", 28)
    fields = dict(round=2, model=model.state_dict(), aggregation={}, best_model=None, metrics=[], params=PARAMS,
                  envoys=["envoy_1", "envoy_2"], experiments=["run"])
    return Checkpoint(**{**fields, **changes})


def test_a_checkpoint_is_written_atomically_and_read_back_whole(tmp_path):
    checkpoint = _checkpoint(aggregation={"x/w": torch.arange(3, dtype=torch.float64)},
                             metrics=[{"round": 0, "metric_origin": "aggregator", "task_name": VALIDATE_GLOBAL,
                                       "metric_name": "auc", "metric_value": 0.5, "time": 1.0}])
    save(tmp_path / FILE, checkpoint)
    save(tmp_path / FILE, checkpoint)  # over the last one
    assert [p.name for p in tmp_path.iterdir()] == [FILE]  # no temporary file left
    loaded = load_checkpoint(str(tmp_path), PARAMS, ONLINE)
    assert loaded.round == 2 and loaded.metrics == checkpoint.metrics and loaded.envoys == checkpoint.envoys
    assert all(torch.equal(loaded.model[k], v) for k, v in checkpoint.model.items())
    assert torch.equal(loaded.aggregation["x/w"], checkpoint.aggregation["x/w"])
    assert load_checkpoint("", PARAMS, ONLINE) is None  # not resuming


def test_results_json_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from medfl.researcher.checkpoint import write_atomically

    target = tmp_path / "results.json"
    write_atomically(target, b'{"status": "completed"}')

    def power_cut(fd):
        raise OSError("no space left on device")

    monkeypatch.setattr("os.fsync", power_cut)
    with pytest.raises(OSError, match="no space left"):
        write_atomically(target, b'{"status": "fai')
    assert json.loads(target.read_text()) == {"status": "completed"}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # and no temporary file left


def _refused(tmp_path, params=PARAMS, envoys=ONLINE, where=None) -> str:
    with pytest.raises(ParameterError) as refused:
        load_checkpoint(str(where or tmp_path), params, envoys)
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_a_missing_damaged_or_foreign_checkpoint_is_refused_in_one_line_and_nothing_changes(tmp_path):
    assert "no checkpoint.pt there" in _refused(tmp_path)
    assert "no checkpoint.pt there" in _refused(tmp_path, where=tmp_path / "nowhere")
    (tmp_path / FILE).write_bytes(b"not a checkpoint at all")
    assert "checkpoint.pt is damaged" in _refused(tmp_path) and "nothing was changed" in _refused(tmp_path)
    assert (tmp_path / FILE).read_bytes() == b"not a checkpoint at all"
    torch.save({"format": 1, "round": 2}, tmp_path / FILE)  # cut short: fields missing
    assert "checkpoint.pt is damaged" in _refused(tmp_path)
    save(tmp_path / FILE, _checkpoint())
    assert ("a checkpoint of another run: dataset='bloodmnist' (now 'pathmnist'); seed=0 (now 1)"
            in _refused(tmp_path, {**PARAMS, "dataset": "pathmnist", "seed": 1}))
    assert "algorithm='fedavg' (now 'fedadam')" in _refused(tmp_path, {**PARAMS, "algorithm": "fedadam"})
    # Secure aggregation and the update checks are part of the run: a resume may not switch them.
    assert "secure_aggregation=False (now True)" in _refused(tmp_path, {**PARAMS, "secure_aggregation": True})
    assert "rejection_window=5 (now 50)" in _refused(tmp_path, {**PARAMS, "rejection_window": 50})
    assert "has done 2 rounds, more than rounds=1" in _refused(tmp_path, {**PARAMS, "rounds": 1})
    message = _refused(tmp_path, envoys=[ONLINE[0], {"envoy": "envoy_2", "online": False}])
    assert "the run's envoys are envoy_1, envoy_2, online now: envoy_1" in message
    assert "envoy_3" in _refused(tmp_path, envoys=[*ONLINE, {"envoy": "envoy_3", "online": True}])
    # More rounds than planned is fine without DP; DP's noise was set for the planned rounds.
    assert load_checkpoint(str(tmp_path), {**PARAMS, "rounds": 6}, ONLINE).round == 2
    save(tmp_path / FILE, _checkpoint(params={**PARAMS, "dp": True}))
    assert "rounds=4 (now 6)" in _refused(tmp_path, {**PARAMS, "dp": True, "rounds": 6})
    # An envoy whose shard is not the one it trained on in the run is refused, naming what changed.
    described = [{**e, "name": e["envoy"], "train": 399, "val": 57} for e in ONLINE]
    save(tmp_path / FILE, _checkpoint(shards={e["envoy"]: {"name": e["envoy"], "train": 399, "val": 57}
                                              for e in ONLINE}))
    assert load_checkpoint(str(tmp_path), PARAMS, described).round == 2
    message = _refused(tmp_path, envoys=[described[0], {**described[1], "train": 410}])
    assert "an envoy serves other data than in the run: envoy_2's train 399 (now 410)" in message
    # An envoy that dropped out of the run may stay away.
    save(tmp_path / FILE, _checkpoint(dropouts=[{"envoy": "envoy_2", "round": 1}]))
    assert load_checkpoint(str(tmp_path), PARAMS, ONLINE[:1]).round == 2


def test_a_resumed_run_keeps_out_an_envoy_dropped_for_its_rejected_updates_and_takes_back_a_lost_one(tmp_path,
                                                                                                      capsys):
    from types import SimpleNamespace

    from medfl.researcher.checkpoint import keep_out, kept_out_of

    envoys = ["envoy_1", "envoy_2", "envoy_3"]
    liar = {"envoy": "envoy_3", "round": 3, "reason": "its update was rejected in 2 of the last 5 rounds "
            "(max_rejections=2); last: its update failed the direction check: ..."}
    lost = {"envoy": "envoy_2", "round": 2, "reason": "the director has not heard from it for 21 s"}
    save(tmp_path / FILE, _checkpoint(envoys=envoys, dropouts=[lost, liar]))
    online = [{"envoy": e, "online": True} for e in envoys]
    checkpoint = load_checkpoint(str(tmp_path), PARAMS, online)  # all three back: the liar is not counted
    assert kept_out_of(checkpoint) == {"envoy_3": liar["reason"]}
    registry = {e: {"is_online": True, "shard_info": {}} for e in envoys}
    federation = SimpleNamespace(get_shard_registry=lambda: registry)
    table = keep_out(federation, online, kept_out_of(checkpoint))
    # OpenFL's experiment.start sends the experiment to the envoys its registry shows online: not envoy_3.
    assert [n for n, e in federation.get_shard_registry().items() if e["is_online"]] == ["envoy_1", "envoy_2"]
    assert [e["envoy"] for e in table if e["online"]] == ["envoy_1", "envoy_2"]
    assert "resumed: envoy_3 stays out of this run (its update was rejected in 2 of the last 5 rounds" in \
        capsys.readouterr().out
    assert load_checkpoint(str(tmp_path), PARAMS, online[:2]).round == 2  # and it may stay offline


def test_restoring_into_another_model_is_refused_in_one_line(tmp_path):
    checkpoint = _checkpoint()
    with pytest.raises(ParameterError, match=r"the checkpoint's model is not this notebook's \(.* here, .* in the "
                                             r"checkpoint, and \d+ more\): resume with the model cell"):
        checkpoint.restore(build_model("dermamnist", 28))  # 7 classes, not 8
    model = build_model("bloodmnist", 28)
    checkpoint.restore(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint.model.items())


def _round(optimizer, tensors, fl_round):
    weights = {"envoy_1": 3.0, "envoy_2": 1.0}
    return {name: optimizer.call([LocalTensor(col_name=envoy, tensor=value[envoy], weight=weights[envoy])
                                  for envoy in weights], None, name, fl_round, ("trained",))
            for name, value in tensors.items()}


def test_a_server_optimizer_goes_on_bit_for_bit_from_its_state_after_the_float32_wire():
    rng = np.random.default_rng(0)
    model = build_model("bloodmnist", 28)
    names = [name for name, _ in model.named_parameters()][:3]
    rounds = [{name: {e: rng.normal(size=dict(model.named_parameters())[name].shape).astype(np.float32)
                      for e in ("envoy_1", "envoy_2")} for name in names} for _ in range(4)]
    uninterrupted = ServerOptimizer("adam", model, 1e-2)
    expected = [_round(uninterrupted, tensors, r) for r, tensors in enumerate(rounds)]
    first = ServerOptimizer("adam", model, 1e-2)
    for r in range(2):
        _round(first, rounds[r], r)
    # What the director sends with the last model, and the checkpoint keeps: float64 packed into float32 arrays.
    state = {name: unpack(pack(value).astype(np.float32)) for name, value in first.state().items()}
    resumed = ServerOptimizer("adam", build_model("bloodmnist", 28), 1e-2)  # built from another initial model
    resumed.load_state(state)
    for r in (2, 3):
        got = _round(resumed, rounds[r], r - 2)  # the resumed experiment counts its rounds from 0
        assert all(np.array_equal(got[name], expected[r][name]) for name in names)


def test_pack_keeps_every_float64_bit():
    values = np.random.default_rng(1).normal(size=(7, 5)) * 10.0 ** np.arange(-3, 4)[:, None]
    assert np.array_equal(unpack(pack(values)), values.reshape(-1)) and pack(values).dtype == np.float32


class _Director:
    """A director as the notebook's client sees it: metrics to stream, and the last model with its round."""

    def __init__(self, metrics, last: dict):
        self.metrics, self.last, self.fetched = metrics, last, 0

    def stream_metrics(self, name):
        yield from self.metrics

    def get_last_model(self, name):
        self.fetched += 1
        return self.last


def _m(r, origin, task, name, value):
    return {"round": r, "metric_origin": origin, "task_name": task, "metric_name": name, "metric_value": value}


def test_a_resumed_run_goes_on_counting_rounds_with_its_earlier_metrics_and_best_model(tmp_path):
    model = build_model("bloodmnist", 28)
    earlier_best = build_model("bloodmnist", 28)
    with torch.no_grad():
        next(earlier_best.parameters()).zero_()  # another model than `model`
    earlier = [_m(r, "aggregator", VALIDATE_GLOBAL, "auc", auc) | {"time": 1.0} for r, auc in ((0, 0.5), (1, 0.9))]
    resumed = _checkpoint(model, metrics=earlier, best_model=earlier_best.state_dict(),
                          dropouts=[{"envoy": "envoy_3", "round": 1}], restarts=[{"after_round": 1}])
    # The resumed experiment's round 0 validates the model after 2 rounds; round 0's end brings the model after 3.
    last = {**{k: v.numpy() for k, v in model.state_dict().items()}, ROUND_KEY: np.array([1.0], np.float32),
            STATE_PREFIX + "steps": pack(np.array([3.0]))}
    stream = [_m(0, "aggregator", VALIDATE_GLOBAL, "auc", 0.8),
              *[_m(0, "aggregator", TRAFFIC, n, 1.0) for n in ("received_bytes", "sent_bytes", "connections")],
              _m(1, "aggregator", VALIDATE_GLOBAL, "auc", 0.95)]
    director = _Director(stream, last)
    experiment = SimpleNamespace(experiment_name="run-resumed-1", experiment_submitted=True,
                                 federation=SimpleNamespace(dir_client=director),
                                 get_experiment_status=lambda: "finished")
    record = {"params": PARAMS, "envoys": ONLINE, "restarts": [{"after_round": 1}, {"after_round": 2}]}
    checkpoints = Checkpointer(tmp_path, experiment, model, record, resumed=resumed)
    lines, fetched = [], []
    run = follow(experiment, 4, Best("auc", "max"), on_new_best=lambda: fetched.append(1) or "new best",
                 echo=lines.append, checkpoints=checkpoints)
    assert lines[0] == "resumed: 2 of 4 rounds were trained before; training goes on from the model after 2"
    assert [m["round"] for m in run.metrics if m["task_name"] == VALIDATE_GLOBAL] == [0, 1, 2, 3]
    assert run.dropouts == resumed.dropouts
    assert (run.best.round, run.best_model, len(fetched)) == (3, "new best", 1)  # 0.8 at round 2 was no new best
    assert director.fetched == 1
    saved = torch.load(tmp_path / FILE, weights_only=True)
    assert saved["round"] == 3 and saved["restarts"] == record["restarts"]
    assert saved["experiments"] == ["run", "run-resumed-1"]
    assert [m["round"] for m in saved["metrics"] if m["task_name"] == VALIDATE_GLOBAL] == [0, 1, 2]
    assert saved["aggregation"]["steps"].tolist() == [3.0]
    assert all(torch.equal(saved["best_model"][k], v) for k, v in earlier_best.state_dict().items())


def test_a_checkpoint_is_skipped_when_the_director_has_moved_on(tmp_path):
    model = build_model("bloodmnist", 28)
    last = {**{k: v.numpy() for k, v in model.state_dict().items()}, ROUND_KEY: np.array([3.0], np.float32)}
    experiment = SimpleNamespace(experiment_name="run", federation=SimpleNamespace(dir_client=_Director([], last)))
    checkpoints = Checkpointer(tmp_path, experiment, model, {"params": PARAMS, "envoys": ONLINE})
    run = SimpleNamespace(best_model=None, metrics=[], dropouts=[], rejected=[], clipped=[], secure=[])
    assert not checkpoints(1, run) and not (tmp_path / FILE).exists()  # the model after 3 is not the one after 2
    assert checkpoints(2, run) and torch.load(tmp_path / FILE, weights_only=True)["round"] == 3


def test_each_envoy_s_shuffling_goes_on_where_the_run_stopped(tiny_file):
    shard = MedMNISTShardDescriptor("bloodmnist", 28, tiny_file("bloodmnist", 28, {"train": 50, "val": 10,
                                                                                  "test": 10}).parent, "1,1")

    def orders(first_epoch: int, epochs: int) -> list:
        data = MedMNISTData(train_batch_size=8, seed=3, device="cpu", first_epoch=first_epoch)
        data.shard_descriptor = shard
        return [[labels.tolist() for _, labels in data.get_train_loader()] for _ in range(epochs)]

    assert orders(3, 2) == orders(0, 5)[3:]
    assert orders(0, 1) != orders(1, 1)


def test_results_list_every_restart_and_why_the_attempt_before_stopped(tmp_path):
    checkpoint = _checkpoint(restarts=[{"after_round": 1, "experiment": "run-resumed-a", "why": "x"}])
    stopped = {"status": "failed", "attempt": "run-resumed-b", "error": "lost the director (UNAVAILABLE)",
               "restarts": [*checkpoint.restarts, {"after_round": 2, "experiment": "run-resumed-b", "why": "y"}]}
    (tmp_path / "results.json").write_text(json.dumps(stopped))
    listed = restarts(tmp_path, checkpoint, "run-resumed-c")
    assert [r["experiment"] for r in listed] == ["run-resumed-a", "run-resumed-b", "run-resumed-c"]
    assert listed[-1]["after_round"] == 2 and listed[-1]["why"] == "run-resumed-b: lost the director (UNAVAILABLE)"
    (tmp_path / "results.json").write_text('{"status": "failed", "attem')  # cut short by an older version
    assert restarts(tmp_path, checkpoint, "c")[-1]["why"].startswith(
        "not recorded: its results.json could not be read (JSONDecodeError")
    (tmp_path / "results.json").unlink()
    assert restarts(tmp_path, checkpoint, "c")[-1]["why"].startswith("not recorded")
    assert restarts(tmp_path, None, "run") == []
    assert attempt_name("run", None) == "run" and attempt_name("run", checkpoint).startswith("run-resumed-")
