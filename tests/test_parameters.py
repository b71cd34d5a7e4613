"""The notebook refuses impossible parameters and mismatched datasets before anything runs."""
from types import SimpleNamespace

import pytest

from conftest import ROOT
from medfl.researcher import (
    DEFAULTS,
    RULES,
    RUN_CHOICES,
    ParameterError,
    check_dataset,
    check_envoys,
    check_parameters,
    check_quorum,
    open_run,
)

GOOD = dict(dataset="bloodmnist", size=28, rounds=3, epochs=1, train_batch_size=64, eval_batch_size=256,
            learning_rate=1e-3, device="auto")
IN_DICTS = {"mu": "algorithm_options", "ntd_beta": "algorithm_options", "ntd_tau": "algorithm_options",
            "server_learning_rate": "algorithm_options", "server_beta1": "algorithm_options",
            "server_beta2": "algorithm_options", "server_tau": "algorithm_options", "best_metric": "run",
            "min_envoys": "run", "round_timeout": "run", "stem": "run", "wire_dtype": "run", "director_port": "run",
            "max_rejections": "run"}


def _with(change: dict) -> dict:
    """GOOD with `change`, each setting where the notebook keeps it: top-level, or in its dict."""
    parameters = dict(GOOD)
    for name, value in change.items():
        if name in IN_DICTS:
            parameters.setdefault(IN_DICTS[name], {})[name] = value
        else:
            parameters[name] = value
    return parameters


def test_good_parameters_pass_and_each_dict_comes_back_complete():
    options, dp, run = check_parameters(**GOOD, experiment=None)  # other notebook variables are ignored
    assert options["mu"] == 0.01 and dp["target_epsilon"] == 8.0 and run["director_port"] == 50051
    for algorithm in ("fedprox", "fedntd", "fedadam", "median"):
        options, _, _ = check_parameters(**_with({"algorithm": algorithm, "mu": 0, "server_learning_rate": 0.05,
                                                  "ntd_beta": 0, "ntd_tau": 3}))
        assert (options["mu"], options["server_learning_rate"], options["server_beta1"]) == (0, 0.05, 0.9)
    check_parameters(**{**GOOD, "dataset": "retinamnist"}, algorithm="fedntd")  # ordinal, 5 classes: softmax


@pytest.mark.parametrize("change,message", [
    ({"dataset": "bloodmnist3d"}, "dataset='bloodmnist3d' is not a MedMNIST 2D dataset: use one of pathmnist"),
    ({"size": 32}, "size=32 is not a MedMNIST size: use 28, 64, 128 or 224"),
    ({"rounds": 0}, "rounds=0: it must be a whole number of at least 1"),
    ({"epochs": -1}, "epochs=-1: it must be a whole number"),
    ({"train_batch_size": 0}, "train_batch_size=0"),
    ({"eval_batch_size": 2.5}, "eval_batch_size=2.5"),
    ({"learning_rate": 0}, "learning_rate=0: it must be a positive number"),
    ({"learning_rate": -0.1}, "learning_rate=-0.1"),
    ({"device": "gpu"}, "device='gpu': use one of auto, cpu, cuda, hpu"),
    ({"seed": "0"}, "seed='0': give a whole number"),
    ({"best_metric": "f1"}, "best_metric='f1'"),
    ({"min_envoys": 0}, "min_envoys=0: give a number of envoys (an int of at least 1) or a share of them"),
    ({"min_envoys": 1.5}, "min_envoys=1.5: give a number of envoys"),
    ({"min_envoys": "2"}, "min_envoys='2': give a number"),
    ({"min_envoys": True}, "min_envoys=True"),
    ({"round_timeout": -1}, "round_timeout=-1: give seconds (0 for no limit)"),
    ({"stem": "wide"}, "stem='wide': use \"patch\""),
    ({"wire_dtype": "int8"}, "wire_dtype='int8': use \"float32\""),
    ({"max_rejections": 0}, "max_rejections=0: give a whole number of rounds of at least 1"),
    ({"director_port": 0}, "director_port=0: give the director's TCP port"),
    ({"algorithm": "fedsgd"}, "algorithm='fedsgd': use one of fedavg, fedprox, fedntd, fedbn, fedadam, fedyogi, "
                              "fedadagrad, median, geomedian"),
    ({"ntd_beta": -1}, "ntd_beta=-1: FedNTD's distillation weight must be a number of at least 0 (0 is FedAvg)"),
    ({"ntd_tau": 0}, "ntd_tau=0: FedNTD's temperature must be a positive number"),
    ({"algorithm": "fedntd", "dataset": "chestmnist"}, "algorithm='fedntd' distils the classes an image is not, so "
     "it needs one label of three or more classes; chestmnist is multi-label, binary-class with 14 outputs: use "
     "fedavg or fedprox"),
    ({"algorithm": "fedntd", "dataset": "pneumoniamnist"}, "pneumoniamnist is binary-class with 2 outputs"),
    ({"mu": -0.1}, "mu=-0.1: FedProx's proximal weight must be a number of at least 0"),
    ({"mu": "0.1"}, "mu='0.1'"),
    ({"server_learning_rate": 0}, "server_learning_rate=0: it must be a positive number, or None"),
    ({"server_learning_rate": -1e-2}, "server_learning_rate=-0.01"),
    ({"server_beta1": 1.0}, "server_beta1=1.0: it must be at least 0 and below 1"),
    ({"server_beta2": -0.5}, "server_beta2=-0.5"),
    ({"server_tau": 0}, "server_tau=0: it must be a positive number"),
    ({"algorithm_options": {"momentum": 0.9}}, "algorithm_options has no 'momentum': its keys are mu, ntd_beta"),
    ({"dp_options": {"epsilon": 4}}, "dp_options has no 'epsilon': its keys are max_grad_norm, noise_multiplier"),
    ({"run": {"director": "x"}}, "run has no 'director': its keys are director_host, director_port"),
    ({"run": "localhost"}, "run='localhost': give a dict"),
    ({"dp": True, "dp_options": {"max_grad_norm": 0}}, "max_grad_norm=0 (dp_options): give the per-sample clipping"),
    ({"dp": True, "bf16": True}, "dp=True with bf16=True"),
])
def test_bad_parameters_are_refused_with_the_fix(change, message):
    with pytest.raises(ParameterError, match=message.replace("(", r"\(").replace(")", r"\)")) as refused:
        check_parameters(**_with(change))
    assert "\n" not in str(refused.value)  # one line


def _federation(sample=("28", "28", "3"), target=("1",)):
    return SimpleNamespace(sample_shape=list(sample), target_shape=list(target))


def _envoy(name, flag="bloodmnist", size=28):
    return {"envoy": name, "flag": flag, "size": size}


def test_matching_dataset_passes():
    check_dataset(_federation(), "bloodmnist", 28, [_envoy("envoy_1"), _envoy("envoy_2")])


def test_envoys_serving_another_dataset_are_named():
    with pytest.raises(ParameterError, match=r"the envoys \(envoy_1, envoy_2\) serve pathmnist 28px, not bloodmnist"):
        check_dataset(_federation(), "bloodmnist", 28, [_envoy("envoy_1", "pathmnist"), _envoy("envoy_2", "pathmnist")])


def test_envoys_serving_different_datasets_are_named():
    # Same shapes, so OpenFL's director let both in.
    with pytest.raises(ParameterError, match="different datasets .*bloodmnist 28px: envoy_1; pathmnist 28px: envoy_2"):
        check_dataset(_federation(), "bloodmnist", 28, [_envoy("envoy_1"), _envoy("envoy_2", "pathmnist")])


def test_director_shapes_must_fit_the_dataset():
    with pytest.raises(ParameterError, match=r"serves samples \['64', '64', '3'\].*needs \['28', '28', '3'\]"):
        check_dataset(_federation(sample=("64", "64", "3")), "bloodmnist", 28)


def test_min_envoys_is_a_number_or_a_share_of_the_online_envoys():
    envoys = [{"envoy": f"envoy_{i}", "online": i != 3} for i in (1, 2, 3)]
    check_quorum(envoys, 2)
    check_quorum(envoys, 1.0)  # every online envoy
    with pytest.raises(ParameterError, match=r"min_envoys=3, but only 2 envoys are online \(envoy_1, envoy_2\): "
                                             "start more envoys or lower min_envoys"):
        check_quorum(envoys, 3)


def _registry(**served):
    """A director's shard registry: envoy name -> (what its shard descriptor says, online)."""
    import json

    return {name: {"shard_info": SimpleNamespace(shard_description=json.dumps(what) if isinstance(what, dict)
                                                 else what), "is_online": online}
            for name, (what, online) in served.items()}


def test_check_envoys_gives_the_table_says_synthetic_and_refuses_what_cannot_run(capsys):
    served = {"flag": "bloodmnist", "size": 28, "text": "bloodmnist 28px"}
    envoys, synthetic = check_envoys(_registry(envoy_2=(served, True), envoy_1=(served, True)), _federation(),
                                     "bloodmnist", 28, 0.5)
    assert [e["envoy"] for e in envoys] == ["envoy_1", "envoy_2"] and envoys[0]["text"] == "bloodmnist 28px"
    assert not synthetic and capsys.readouterr().out == ""
    envoys, synthetic = check_envoys(_registry(envoy_1=({**served, "synthetic": True}, True)), _federation(),
                                     "bloodmnist", 28, 1)
    assert synthetic and "NOTE: the envoys serve SYNTHETIC data" in capsys.readouterr().out
    with pytest.raises(ParameterError, match=r"the envoys \(envoy_1\) serve bloodmnist 28px, not pathmnist"):
        check_envoys(_registry(envoy_1=(served, True)), _federation(), "pathmnist", 28, 1)
    with pytest.raises(ParameterError, match=r"min_envoys=2, but only 1 envoys are online \(envoy_1\)"):
        check_envoys(_registry(envoy_1=(served, True), envoy_2=(served, False)), _federation(), "bloodmnist", 28, 2)


def test_open_run_names_the_folder_logs_there_and_refuses_a_run_to_resume_without_a_checkpoint(tmp_path, capsys):
    import logging

    root, before = logging.getLogger(), list(logging.getLogger().handlers)
    envoys = [{"envoy": "envoy_1", "online": True}]
    options, dp, run = check_parameters(**GOOD, run={"output_dir": str(tmp_path), "data_source": "medmnist"})
    namespace = {**DEFAULTS, **GOOD, "algorithm_options": options, "dp_options": dp, "run": run}
    try:
        folder, name, attempt, checkpoint, record = open_run(namespace, envoys)
        assert folder == tmp_path / name and name.startswith("medmnist-bloodmnist-") and attempt == name
        assert checkpoint is None and (folder / "logs" / "openfl.log").is_file()
        assert record == {"params": {**{k: namespace[k] for k in DEFAULTS if k != "run"},
                                     **{k: run[k] for k in RUN_CHOICES}, "experiment": name, "tls": False},
                          "envoys": envoys, "data_source": "medmnist", "restarts": [],
                          "tracking": {"tracking": "", "tracking_uri": "", "tracking_parent": "",
                                       "output_dir": str(tmp_path)}}
        named = {**namespace, "run": {**run, "experiment_name": "mine"}}
        assert open_run(named, envoys).dir == tmp_path / "mine"
        resumed = {**namespace, "run": {**run, "resume_from": str(tmp_path / "earlier")}}
        with pytest.raises(ParameterError, match="no checkpoint.pt there"):
            open_run(resumed, envoys)
    finally:
        for handler in [h for h in root.handlers if h not in before]:
            root.removeHandler(handler)
            handler.close()


def test_the_rules_are_the_aggregators_settings_and_said_once():
    import inspect

    from localfed.settings import RUN_SETTINGS
    from medfl.aggregator import SelectingAggregator

    assert set(RULES) <= set(inspect.signature(SelectingAggregator.__init__).parameters)
    assert set(RULES) < set(RUN_CHOICES) < set(RUN_SETTINGS)
    assert len(set(RUN_SETTINGS)) == len(RUN_SETTINGS)
    for user in ("localfed/settings.py", "tools/notebooks.py", "workspace/medfl/researcher/parameters.py"):
        spelled = (ROOT / user).read_text().count('"best_mode", "min_envoys"')
        assert spelled == (user.endswith("parameters.py")), f"{user} lists the rules again: use RULES"
