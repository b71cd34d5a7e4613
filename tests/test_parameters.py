"""The notebook refuses impossible parameters and mismatched datasets before anything runs."""
from types import SimpleNamespace

import pytest

from medfl.researcher import ParameterError, check_dataset, check_parameters, check_quorum

GOOD = dict(dataset="bloodmnist", size=28, rounds_to_train=3, epochs_per_round=1, train_batch_size=64,
            eval_batch_size=256, learning_rate=1e-3, device="auto", best_metric="auc", best_mode="max")


def test_good_parameters_pass():
    check_parameters(**GOOD, director_port=50051)  # other notebook variables are ignored
    for algorithm in ("fedprox", "fedntd", "fedadam", "median"):
        check_parameters(**GOOD, algorithm=algorithm, mu=0, server_learning_rate=0.05, ntd_beta=0, ntd_tau=3)
    check_parameters(**{**GOOD, "dataset": "retinamnist"}, algorithm="fedntd")  # ordinal, 5 classes: softmax


@pytest.mark.parametrize("change,message", [
    ({"dataset": "bloodmnist3d"}, "dataset='bloodmnist3d' is not a MedMNIST 2D dataset: use one of pathmnist"),
    ({"size": 32}, "size=32 is not a MedMNIST size: use 28, 64, 128 or 224"),
    ({"rounds_to_train": 0}, "rounds_to_train=0: it must be a whole number of at least 1"),
    ({"epochs_per_round": -1}, "epochs_per_round=-1: it must be a whole number"),
    ({"train_batch_size": 0}, "train_batch_size=0"),
    ({"eval_batch_size": 2.5}, "eval_batch_size=2.5"),
    ({"learning_rate": 0}, "learning_rate=0: it must be a positive number"),
    ({"learning_rate": -0.1}, "learning_rate=-0.1"),
    ({"device": "gpu"}, "device='gpu': use one of auto, cpu, cuda, hpu"),
    ({"best_metric": "f1"}, "best_metric='f1'"),
    ({"min_envoys": 0}, "min_envoys=0: give a number of envoys (an int of at least 1) or a share of them"),
    ({"min_envoys": 1.5}, "min_envoys=1.5: give a number of envoys"),
    ({"min_envoys": "2"}, "min_envoys='2': give a number"),
    ({"min_envoys": True}, "min_envoys=True"),
    ({"round_timeout": -1}, "round_timeout=-1: give seconds (0 for no limit)"),
    ({"algorithm": "fedsgd"}, "algorithm='fedsgd': use one of fedavg, fedprox, fedntd, fedadam, fedyogi, fedadagrad, "
                              "median, geomedian"),
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
])
def test_bad_parameters_are_refused_with_the_fix(change, message):
    with pytest.raises(ParameterError, match=message.replace("(", r"\(").replace(")", r"\)")) as refused:
        check_parameters(**{**GOOD, **change})
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
