"""DP-SGD on the envoys: Poisson batches, per-sample clipping, noise for a target epsilon, and an accountant that
adds up over every round of an experiment."""
import pytest
import torch

from medfl import MedMNISTData, NotTrueDistillation, build_model, train
from medfl.privacy import DPSGD, PoissonBatches, PrivacyError
from medfl.researcher import DEFAULTS, ParameterError, check_parameters
from medmnist_shard import MedMNISTShardDescriptor


@pytest.fixture(scope="module")
def data(tiny_file):
    shard = MedMNISTShardDescriptor("bloodmnist", 28, tiny_file("bloodmnist", 28, {"train": 200, "val": 20,
                                                                                  "test": 20}).parent, "1,1")
    loader = MedMNISTData(train_batch_size=20, device="cpu")
    loader.shard_descriptor = shard
    return loader


def _train(model, data, optimizer, privacy):
    return train(model, data.get_train_loader(), optimizer, "cpu", task="multi-class", device_request="cpu",
                 privacy=privacy)


def test_epsilon_adds_up_over_the_rounds_to_the_target_and_starts_afresh_next_experiment(data):
    torch.manual_seed(0)
    model = build_model("bloodmnist", 28, norm="group")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    privacy = DPSGD(max_grad_norm=1.0, target_epsilon=4.0, rounds=3, epochs_per_round=1)
    spent = [_train(model, data, optimizer, privacy) for _ in range(3)]
    epsilons = [s["epsilon"] for s in spent]
    assert epsilons[0] < epsilons[1] < epsilons[2] == pytest.approx(4.0, rel=0.05)
    assert all(s["delta"] == pytest.approx(1 / (10 * 200)) for s in spent)  # 1 / (10 N), N = the shard's train size
    assert list(spent[0]) == ["train_loss", "epsilon", "delta", "train_seconds"]  # one progress line per task
    fresh = DPSGD(max_grad_norm=1.0, target_epsilon=4.0, rounds=3)  # the next experiment's object
    assert _train(model, data, optimizer, fresh)["epsilon"] == pytest.approx(epsilons[0])
    assert not any(module._forward_hooks for module in model.modules())  # per-sample hooks are gone after a round


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # no real privacy at this noise
@pytest.mark.parametrize("distill", [None, NotTrueDistillation(beta=1.0)], ids=["fedavg", "fedntd"])
def test_each_images_gradient_is_clipped_before_the_noise(data, distill):
    torch.manual_seed(0)
    model = build_model("bloodmnist", 28, norm="group")
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = MedMNISTData(train_batch_size=200, device="cpu")  # one expected batch: one step
    loader.shard_descriptor = data.shard_descriptor
    train(model, loader.get_train_loader(), optimizer, "cpu", task="multi-class", device_request="cpu",
          privacy=DPSGD(max_grad_norm=1e-3, noise_multiplier=1e-6), distill=distill)
    step = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    # The mean of per-image gradients clipped to 1e-3 has a norm of at most 1e-3 (times the Poisson batch's size
    # over the expected one); unclipped, one step at lr 1 moves these weights by far more. With FedNTD the teacher
    # runs beside Opacus' per-sample hooks (its term is 0 at this first step, where the model is its teacher).
    assert 0 < step.norm() < 2e-3


def test_poisson_batches_vary_around_the_expected_size_and_empty_draws_still_count():
    generator = torch.Generator().manual_seed(0)
    sizes = [len(b) for b in PoissonBatches(1000, 0.05, 400, generator)]
    assert len(set(sizes)) > 5 and sum(sizes) / len(sizes) == pytest.approx(50, rel=0.05)
    counted = []
    yielded = list(PoissonBatches(10, 0.01, 100, generator, on_empty=lambda: counted.append(1)))
    assert len(yielded) + len(counted) == 100 and counted


def test_batchnorm_and_bad_settings_are_refused_in_one_line(data):
    model = build_model("bloodmnist", 28)  # BatchNorm
    with pytest.raises(PrivacyError, match="DP-SGD cannot privatize BatchNorm.*norm=.group."):
        _train(model, data, torch.optim.Adam(model.parameters()), DPSGD())
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        build_model("bloodmnist", 28, norm="layer")
    for change, message in [({"bf16": True}, "dp=True with bf16=True"),
                            ({"dp_options": {"max_grad_norm": 0}}, r"max_grad_norm=0 \(dp_options\)"),
                            ({"dp_options": {"target_epsilon": 0.0}}, "dp_options: give noise_multiplier > 0, or"),
                            ({"dp_options": {"noise_multiplier": -1.0}}, "give noise_multiplier > 0"),
                            ({"dp_options": {"delta": 1.5}}, r"delta=1.5 \(dp_options\)"),
                            ({"dp": "yes"}, "dp='yes': True")]:
        with pytest.raises(ParameterError, match=message):
            check_parameters(**{**DEFAULTS, "dp": True, **change})
    check_parameters(**{**DEFAULTS, "dp": True})


def test_with_a_ledger_each_envoy_adds_up_every_attempt_of_a_run(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFL_ENVOY_STATE", str(tmp_path))  # start_envoy.sh sets it beside the envoy's config
    torch.manual_seed(0)
    model = build_model("bloodmnist", 28, norm="group")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    settings = dict(max_grad_norm=1.0, target_epsilon=4.0, rounds=3, epochs_per_round=1)
    uninterrupted = DPSGD(**settings)
    expected = [_train(model, data, optimizer, uninterrupted)["epsilon"] for _ in range(3)]
    # Attempt 1 trains two rounds; its director dies; attempt 2 (the resume, a new object) trains the third.
    first = DPSGD(**settings, ledger="run-a")
    assert [_train(model, data, optimizer, first)["epsilon"] for _ in range(2)] == pytest.approx(expected[:2])
    assert (tmp_path / "privacy" / "run-a.json").is_file()
    resumed = _train(model, data, optimizer, DPSGD(**settings, ledger="run-a"))
    assert resumed["epsilon"] == pytest.approx(expected[2], rel=1e-12)  # what the uninterrupted run spent
    assert resumed["epsilon_before"] == pytest.approx(expected[1], rel=1e-12)
    # The same run started again from round 0 under its name: the privacy already spent is still counted.
    again = _train(model, data, optimizer, DPSGD(**settings, ledger="run-a"))
    assert again["epsilon"] > expected[2] and again["epsilon_before"] == pytest.approx(resumed["epsilon"])
    # Another run's ledger, or none, starts from zero.
    assert _train(model, data, optimizer, DPSGD(**settings, ledger="run-b"))["epsilon"] == pytest.approx(expected[0])
    assert "epsilon_before" not in _train(model, data, optimizer, DPSGD(**settings))


def test_a_damaged_or_mismatched_ledger_stops_training_rather_than_forget(data, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFL_ENVOY_STATE", str(tmp_path))
    model = build_model("bloodmnist", 28, norm="group")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ledger = tmp_path / "privacy" / "run.json"
    ledger.parent.mkdir()
    ledger.write_text('{"history": [[1.0, 0.1')
    with pytest.raises(PrivacyError, match="is damaged .* cannot add up what the run has spent"):
        _train(model, data, optimizer, DPSGD(target_epsilon=4.0, ledger="run"))
    assert ledger.read_text() == '{"history": [[1.0, 0.1'  # left as it was
    ledger.write_text('{"ledger": "run", "delta": 0.5, "history": [[1.0, 0.1, 3]]}')
    with pytest.raises(PrivacyError, match="kept at delta=0.5"):
        _train(model, data, optimizer, DPSGD(target_epsilon=4.0, ledger="run"))
