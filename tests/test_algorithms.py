"""The federated algorithms (medfl.algorithms): FedProx on the envoys, FedOpt's server optimizers and the robust
aggregations on the director, each against a reference computed here, and the OpenFL pieces they replace."""
import math
import pickle

import numpy as np
import pytest
import torch
from openfl.interface.aggregation_functions import Median, WeightedAverage
from openfl.utilities import LocalTensor
from openfl.utilities.optimizers.torch import FedProxAdam
from torch import nn

from medfl import MedMNISTData, aggregation_function, build_model, build_tasks, train
from medfl.algorithms import (
    ALGORITHMS,
    GeometricMedian,
    NotTrueDistillation,
    ServerOptimizer,
    WeightedMean,
    describe,
    settings,
)
from medfl.data import to_float_chw
from medmnist_shard import MedMNISTShardDescriptor


def _tensors(values: dict, weights: dict) -> list:
    return [LocalTensor(col_name=name, tensor=np.asarray(value), weight=weights[name])
            for name, value in values.items()]


# --- FedProx ---------------------------------------------------------------------------------------------------


def _federate(shards, make_optimizer, rounds=2):
    """On CPU, whatever the machine has (the tests compare numbers to 1e-4), FedAvg's rounds in one process: every
    shard trains the global model with the notebook's train task, and
    the global model becomes the sample-weighted mean of the results (as OpenFL's WeightedAverage does)."""
    torch.manual_seed(0)
    model = build_model("bloodmnist", 28)
    optimizer = make_optimizer(model)
    loaders = []
    for shard in shards:
        data = MedMNISTData(train_batch_size=16, seed=0)
        data.shard_descriptor = shard
        loaders.append(data)
    total = sum(d.get_train_data_size() for d in loaders)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(rounds):
        trained = []
        for data in loaders:
            model.load_state_dict(state)
            train(model, data.get_train_loader(), optimizer, "cpu", task="multi-class", device_request="cpu")
            trained.append((data.get_train_data_size() / total, {k: v.clone() for k, v in model.state_dict().items()}))
        state = {k: sum(w * s[k].double() for w, s in trained).to(state[k].dtype) for k in state}
    return state


def test_fedprox_with_mu_0_trains_the_weights_fedavg_trains(tiny_file):
    """To float tolerance, stated: after 2 rounds on 2 envoys, every weight within 1e-4 of FedAvg's and the logits
    within 1e-4, except the convolution biases that BatchNorm cancels (and the running means that carry them):
    their gradients are rounding noise, which Adam scales to full-size steps in either run. FedProxAdam and
    torch's Adam round differently (mul-add against lerp) from the second step on; the first step is bit for bit."""
    folder = tiny_file("bloodmnist", 28, {"train": 64, "val": 16, "test": 16}).parent
    shards = [MedMNISTShardDescriptor("bloodmnist", 28, folder, f"{r},2") for r in (1, 2)]
    fedavg = _federate(shards, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    fedprox_0 = _federate(shards, lambda m: FedProxAdam(m.parameters(), lr=1e-3, mu=0.0))
    fedprox_1 = _federate(shards, lambda m: FedProxAdam(m.parameters(), lr=1e-3, mu=1.0))
    model = build_model("bloodmnist", 28)
    cancelled = {f"features.{i}.0.bias" for i in range(5)} | {f"features.{i}.1.running_mean" for i in range(5)}
    assert cancelled <= set(fedavg)
    for name in set(fedavg) - cancelled:
        torch.testing.assert_close(fedprox_0[name], fedavg[name], atol=1e-4, rtol=0, msg=name)
    data = MedMNISTData(eval_batch_size=64)
    data.shard_descriptor = shards[0]
    images = to_float_chw(next(iter(data.get_valid_loader()))[0])

    def logits(state):
        model.load_state_dict(state)
        with torch.no_grad():
            return model.eval()(images)

    assert (logits(fedprox_0) - logits(fedavg)).abs().max() < 1e-4
    assert (logits(fedprox_1) - logits(fedavg)).abs().max() > 1e-3  # the proximal term does change training


def test_fedprox_pulls_towards_the_rounds_global_model(tiny_file):
    folder = tiny_file("bloodmnist", 28, {"train": 64, "val": 16, "test": 16}).parent
    data = MedMNISTData(train_batch_size=16, seed=0)
    data.shard_descriptor = MedMNISTShardDescriptor("bloodmnist", 28, folder, "1,1")
    drift = {}
    for mu in (0.0, 10.0):
        torch.manual_seed(0)
        model = build_model("bloodmnist", 28)
        start = [p.detach().clone() for p in model.parameters()]
        train(model, data.get_train_loader(), FedProxAdam(model.parameters(), lr=1e-2, mu=mu), "cpu",
              task="multi-class", device_request="cpu")
        drift[mu] = math.sqrt(sum(((p.detach() - s) ** 2).sum().item() for p, s in zip(model.parameters(), start,
                                                                                       strict=True)))
    assert drift[10.0] < 0.8 * drift[0.0]


# --- FedNTD ---------------------------------------------------------------------------------------------------


class Fixed(nn.Module):
    """A 'model' whose logits are given: the teacher in the FedNTD tests."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, images):
        return self.logits


def test_not_true_distillation_matches_the_kl_divergence_computed_by_hand():
    teacher = [[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 3.0, -2.0]]
    student = torch.tensor([[0.3, -0.2, 0.8, 1.5], [1.0, 0.0, -1.0, 0.5]], requires_grad=True)
    target = torch.tensor([0, 2])
    beta, tau = 0.7, 2.0
    ntd = NotTrueDistillation(beta, tau)
    ntd.start(Fixed(teacher))
    loss = ntd(student, torch.zeros(2, 1), target)
    expected = 0.0
    for t_row, s_row, label in zip(teacher, student.tolist(), target.tolist(), strict=True):
        t = [math.exp(v / tau) for i, v in enumerate(t_row) if i != label]
        s = [math.exp(v / tau) for i, v in enumerate(s_row) if i != label]
        p, q = [v / sum(t) for v in t], [v / sum(s) for v in s]
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    assert loss.item() == pytest.approx(beta * expected / 2, rel=1e-6)
    loss.backward()
    # The labelled class is cross-entropy's alone: the distillation term leaves its logit untouched.
    assert student.grad[0, 0] == 0 and student.grad[1, 2] == 0 and student.grad.abs().sum() > 0
    ntd.start(Fixed(student.detach()))  # a student that agrees with its teacher has nothing to learn from it
    assert ntd(student.detach(), torch.zeros(2, 1), target).item() == pytest.approx(0, abs=1e-7)


def test_not_true_distillation_refuses_what_it_cannot_do():
    for beta, tau in ((-0.1, 1.0), (1.0, 0.0), (True, 1.0), ("1", 1.0)):
        with pytest.raises(ValueError, match="FedNTD's"):
            NotTrueDistillation(beta, tau)
    ntd = NotTrueDistillation()
    with pytest.raises(RuntimeError, match="start"):
        ntd(torch.zeros(2, 4), torch.zeros(2, 1), torch.tensor([0, 1]))
    ntd.start(Fixed(torch.zeros(2, 2)))
    with pytest.raises(ValueError, match="three or more classes"):
        ntd(torch.zeros(2, 2), torch.zeros(2, 1), torch.tensor([0, 1]))
    ntd.start(Fixed(torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="single-label"):
        ntd(torch.zeros(2, 4), torch.zeros(2, 1), torch.zeros(2, 4))  # multi-label targets
    assert pickle.loads(pickle.dumps(ntd)).teacher is None  # the settings travel, never a model


def _one_round(shard, distill, lr=1e-2):
    torch.manual_seed(0)
    model = build_model("bloodmnist", 28)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    data = MedMNISTData(train_batch_size=16, seed=0)
    data.shard_descriptor = shard
    report = train(model, data.get_train_loader(), torch.optim.Adam(model.parameters(), lr=lr), "cpu",
                   task="multi-class", epochs=2, device_request="cpu", distill=distill)
    return start, model, report


def test_fedntd_with_beta_0_trains_bit_for_bit_what_fedavg_trains_and_keeps_the_global_models_view(tiny_file):
    folder = tiny_file("bloodmnist", 28, {"train": 64, "val": 16, "test": 16}).parent
    shard = MedMNISTShardDescriptor("bloodmnist", 28, folder, "1,1")
    _, fedavg, fedavg_report = _one_round(shard, None)
    ntd_0 = NotTrueDistillation(beta=0.0)
    _, fedntd_0, ntd_0_report = _one_round(shard, ntd_0)
    for name, value in fedavg.state_dict().items():
        assert torch.equal(fedntd_0.state_dict()[name], value), name
    assert ntd_0_report["train_loss"] == fedavg_report["train_loss"]  # train_loss is the cross-entropy alone
    assert ntd_0.teacher is None  # dropped after the round, not kept between rounds
    # A strong distillation keeps the local model's not-true softmax nearer the global model's than FedAvg does.
    start, fedntd, _ = _one_round(shard, NotTrueDistillation(beta=10.0))
    global_model = build_model("bloodmnist", 28)
    global_model.load_state_dict(start)
    data = MedMNISTData(eval_batch_size=64)
    data.shard_descriptor = shard
    images, labels = next(iter(data.get_valid_loader()))
    x, y = to_float_chw(images), labels[:, 0].long()
    probe = NotTrueDistillation()
    probe.start(global_model)
    with torch.no_grad():
        gap = {name: probe(m.eval()(x), x, y).item() for name, m in (("fedavg", fedavg), ("fedntd", fedntd))}
    assert gap["fedntd"] < 0.7 * gap["fedavg"], gap


# --- FedOpt on the director --------------------------------------------------------------------------------------


class Tiny(nn.Module):
    """A model with one trainable tensor, one BatchNorm's parameters and buffers."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1, bias=False)
        self.norm = nn.BatchNorm1d(1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[1.0, -2.0]]))


@pytest.mark.parametrize("algorithm", ["fedadam", "fedyogi", "fedadagrad"])
def test_fedopt_rounds_match_the_update_computed_by_hand(algorithm):
    lr, beta1, beta2, tau = 0.1, 0.9, 0.99, 1e-3
    server = aggregation_function(algorithm, Tiny(), {"server_learning_rate": lr, "server_beta1": beta1,
                                                      "server_beta2": beta2, "server_tau": tau})
    weights = {"envoy_1": 0.25, "envoy_2": 0.75}

    def second_moment(v, d):  # Reddi et al. 2021, Algorithm 2, per coordinate
        return {"fedadam": beta2 * v + (1 - beta2) * d * d,
                "fedyogi": v - (1 - beta2) * d * d * math.copysign(1.0, v - d * d),
                "fedadagrad": v + d * d}[algorithm]

    # Round 0 starts from the model's [1, -2]; the envoys' weights average to 0.25 * [1.5, -2] + 0.75 * [3, -1].
    # In round 1 they barely move it, so Yogi's second moment shrinks (v > delta^2), where OpenFL's Yogi errs.
    rounds = [([1.5, -2.0], [3.0, -1.0]), ([1.05, -1.9], [1.05, -1.9])]
    x, m, v = [1.0, -2.0], [0.0, 0.0], [tau * tau, tau * tau]  # v starts at tau^2
    for r, (first, second) in enumerate(rounds):
        delta = [0.25 * first[i] + 0.75 * second[i] - x[i] for i in range(2)]
        m = [beta1 * m[i] + (1 - beta1) * delta[i] for i in range(2)]
        v = [second_moment(v[i], delta[i]) for i in range(2)]
        x = [x[i] + lr * m[i] / (math.sqrt(v[i]) + tau) for i in range(2)]
        trained = _tensors({"envoy_1": np.float32([first]), "envoy_2": np.float32([second])}, weights)
        got = server(trained, None, "linear.weight", r, ("trained",))
        assert got.dtype == np.float32  # what the envoys sent, not float64
        np.testing.assert_allclose(got, [x], rtol=1e-6)
    if algorithm == "fedyogi":
        assert v[0] < tau * tau + (1 - beta2) * 1.625 ** 2  # round 1 took the branch where v shrinks


def test_a_server_optimizer_averages_what_gradients_do_not_train_and_keeps_its_own_state():
    server = aggregation_function("fedadam", Tiny())
    weights = {"envoy_1": 0.25, "envoy_2": 0.75}
    # BatchNorm's counter is an integer: OpenFL's own adaptive aggregation fails on it (see below).
    for name, values, expected in (("norm.num_batches_tracked", (np.int64(4), np.int64(8)), 7.0),
                                   ("norm.running_mean", (np.float32([1.0]), np.float32([3.0])), [2.5]),
                                   ("__opt_state_0_0_istensor_exp_avg", (np.float32([0.0]), np.float32([4.0])), [3.0])):
        got = server(_tensors(dict(zip(weights, values, strict=True)), weights), None, name, 0, ("trained",))
        np.testing.assert_allclose(got, expected)
    trained = _tensors({"envoy_1": np.float32([[2.0, -2.0]]), "envoy_2": np.float32([[2.0, -2.0]])}, weights)
    first = server(trained, None, "linear.weight", 0, ("trained",))
    again = server(trained, None, "linear.weight", 0, ("trained",))  # asked twice in a round: one step
    np.testing.assert_array_equal(first, again)
    kept = first.copy()
    first[...] = 99.0  # whoever holds the answer cannot change the server's state
    np.testing.assert_array_equal(server(trained, None, "linear.weight", 0, ("trained",)), kept)
    later = server(trained, None, "linear.weight", 1, ("trained",))
    assert np.all(np.abs(later) < 10) and server.steps["linear.weight"] == 2
    assert aggregation_function("fedadam", Tiny()) is not server  # not a singleton: every run starts afresh


def test_every_algorithm_has_an_aggregation_and_settings_to_record():
    for algorithm in ALGORITHMS:
        chosen = aggregation_function(algorithm, Tiny())
        assert isinstance(chosen, (WeightedAverage, Median, GeometricMedian, ServerOptimizer)), algorithm
        assert type(chosen) is {"fedavg": WeightedMean, "fedprox": WeightedMean, "fedntd": WeightedMean,
                                 "fedbn": WeightedMean,
                                 "median": Median, "geomedian": GeometricMedian}.get(algorithm, ServerOptimizer), \
            algorithm
        recorded = settings(algorithm, {"mu": 0.01})
        assert recorded["name"] == algorithm and ("mu" in recorded) == (algorithm == "fedprox")
        assert ("ntd_beta" in recorded) == ("ntd_tau" in recorded) == (algorithm == "fedntd")
    assert settings("fedntd", {"ntd_beta": 2.0}) == {"name": "fedntd", "ntd_beta": 2.0, "ntd_tau": 1.0}
    assert describe(settings("fedntd")) == "FedNTD (beta 1, tau 1)"
    assert settings("fedadam") == {"name": "fedadam", "server_learning_rate": 1e-2, "betas": [0.9, 0.99],
                                   "tau": 1e-3}
    assert settings("fedadagrad", {"server_learning_rate": 0.5})["server_learning_rate"] == 0.5
    with pytest.raises(ValueError, match="unknown algorithm 'fedsgd'"):
        aggregation_function("fedsgd", Tiny())
    tasks = build_tasks("bloodmnist", aggregation=aggregation_function("median", Tiny()))
    assert isinstance(tasks.aggregation_functions["train"], Median)


def test_every_aggregation_gives_the_same_bits_whatever_order_the_envoys_registered_in():
    rng = np.random.default_rng(2)
    values = {f"envoy_{i}": rng.normal(size=4096).astype(np.float32) for i in (1, 2, 3)}
    weights = {"envoy_1": 0.21, "envoy_2": 0.30, "envoy_3": 0.49}
    orders = [list(values), list(reversed(values))]

    def answers(function):
        return [function(_tensors({k: values[k] for k in order}, weights), None, "w", 0, ()) for order in orders]

    model = nn.Linear(4096, 1, bias=False)
    for algorithm in ALGORITHMS:
        fresh = [aggregation_function(algorithm, model) for _ in orders]
        got = [f(_tensors({k: values[k].reshape(1, -1) for k in order}, weights), None, "weight", 0, ())
               for f, order in zip(fresh, orders, strict=True)]
        np.testing.assert_array_equal(got[0], got[1], err_msg=algorithm)
    openfl = answers(WeightedAverage())  # OpenFL's own sums in the order it is given: the last bits differ
    assert not np.array_equal(openfl[0], openfl[1])


# --- robust aggregation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", [Median(), GeometricMedian()], ids=["median", "geomedian"])
@pytest.mark.parametrize("honest,wrong", [(2, 1), (3, 2)])
def test_a_wildly_wrong_envoy_cannot_drag_a_median_away_from_the_honest_ones(aggregation, honest, wrong):
    rng = np.random.default_rng(0)
    center = rng.normal(size=(16, 3, 3)).astype(np.float32)
    values = {f"honest_{i}": center + rng.normal(0, 0.01, center.shape).astype(np.float32) for i in range(honest)}
    values |= {f"wrong_{i}": rng.normal(1e6, 1e5, center.shape).astype(np.float32) for i in range(wrong)}
    weights = dict.fromkeys(values, 1 / len(values))
    spread = max(np.linalg.norm(values[a] - values[b]) for a in values for b in values if "wrong" not in a + b)
    honest_mean = np.mean([v for k, v in values.items() if k.startswith("honest")], axis=0)
    got = aggregation(_tensors(values, weights), None, "conv.weight", 0, ("trained",))
    assert got.shape == center.shape
    assert np.linalg.norm(got - honest_mean) <= spread
    averaged = WeightedAverage()(_tensors(values, weights), None, "conv.weight", 0, ("trained",))
    assert np.linalg.norm(averaged - honest_mean) > 1e5  # what FedAvg would have done


def test_the_geometric_median_averages_counters_and_optimizer_state():
    weights = {"envoy_1": 0.25, "envoy_2": 0.75}
    for name, values, expected in (("norm.num_batches_tracked", (np.int64(4), np.int64(8)), 7.0),
                                   ("__opt_state_0_0_istensor_exp_avg", (np.float32([0.0]), np.float32([4.0])), [3.0])):
        got = GeometricMedian()(_tensors(dict(zip(weights, values, strict=True)), weights), None, name, 0, ())
        np.testing.assert_allclose(got, expected)


def test_geometric_median_is_the_fermat_point_where_openfls_is_not():
    """Three envoys at the corners of a triangle whose angles are all below 120 degrees: the geometric median is
    the point that sees each side under 120 degrees, here (2, 2 / sqrt(3))."""
    from openfl.interface.aggregation_functions import GeometricMedian as OpenFLGeometricMedian

    corners = _tensors({"a": np.array([0.0, 0.0]), "b": np.array([4.0, 0.0]), "c": np.array([2.0, 3.0])},
                       dict.fromkeys("abc", 1 / 3))
    fermat = np.array([2.0, 2 / math.sqrt(3)])
    np.testing.assert_allclose(GeometricMedian()(corners, None, "w", 0, ()), fermat, atol=1e-5)
    assert np.linalg.norm(OpenFLGeometricMedian()(corners, None, "w", 0, ()) - fermat) > 0.1


# --- why not OpenFL's own FedOpt aggregations ---------------------------------------------------------------------


def test_openfls_adaptive_aggregations_are_what_medfl_replaces():
    """If an OpenFL upgrade fixes these, medfl.algorithms could use OpenFL's classes again."""
    from openfl.interface.aggregation_functions import AdamAdaptiveAggregation, YogiAdaptiveAggregation
    from openfl.interface.interactive_api.experiment import ModelInterface
    from openfl.utilities.optimizers.numpy import NumPyYogi

    model = Tiny()
    interface = ModelInterface(model=model, optimizer=torch.optim.Adam(model.parameters()),
                               framework_plugin="openfl.plugins.frameworks_adapters.pytorch_adapter."
                                                "FrameworkAdapterPlugin")
    adam = AdamAdaptiveAggregation(model_interface=interface)
    try:
        # A singleton: a second one, with other settings, is the first.
        assert AdamAdaptiveAggregation(model_interface=interface, learning_rate=0.5) is adam
        assert adam.optimizer.learning_rate == 0.01
        counter = _tensors({"e": np.int64(3)}, {"e": 1.0})
        base = iter([{"round": 0, "tensor_name": "norm.num_batches_tracked", "tags": ("model",),
                      "nparray": np.int64(0)}])
        with pytest.raises(TypeError):  # numpy's UFuncTypeError: BatchNorm's counter is in its optimizer
            adam(counter, base, "norm.num_batches_tracked", 0, ("trained",))
    finally:
        type(adam)._instances.pop(type(adam), None)  # leave no singleton behind for other tests
    adam = AdamAdaptiveAggregation(params={"w": np.zeros(2)})
    try:
        trained = _tensors({"e": np.ones(2)}, {"e": 1.0})

        def base(r, value):
            return iter([{"round": r, "tensor_name": "w", "tags": ("model" if r == 0 else "aggregated",),
                          "nparray": value}])

        first = adam(trained, base(0, np.zeros(2)), "w", 0, ("trained",))
        kept = first.copy()
        adam(trained, base(1, kept), "w", 1, ("trained",))
        assert not np.array_equal(first, kept)  # round 1 changed the array round 0 handed to the tensor store
    finally:
        type(adam)._instances.pop(type(adam), None)
    yogi = NumPyYogi(params={"w": np.zeros(1)}, learning_rate=0.1, betas=(0.9, 0.99))
    yogi.grads_second_moment["w"] = np.array([1.0])
    yogi.step({"w": np.array([0.5])})
    assert yogi.grads_second_moment["w"][0] == pytest.approx(0.99 * 1.0 - 0.01 * 0.25)  # Yogi's: 1.0 - 0.01 * 0.25
    assert YogiAdaptiveAggregation.__mro__[1].__name__ == "AdaptiveAggregation"
