"""The device layer: CPU, CUDA and HPU from one code path; Habana code only where Habana is."""
import subprocess
import sys
import types

import pytest
import torch

import medfl.data
import medfl.tasks
from conftest import ROOT
from medfl import MedMNISTData, build_model, build_tasks, pick_device, step_barrier
from medfl.device import DeviceError, autocast, bind_optimizer

STUBS = str(ROOT / "tests" / "stubs")


@pytest.fixture
def gaudi(monkeypatch):
    """This process as a Gaudi node: the stand-in habana_frameworks is importable; yields its mark_step log."""
    monkeypatch.syspath_prepend(STUBS)
    import habana_frameworks.torch.core as htcore

    htcore.calls.clear()
    yield htcore.calls
    for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
        del sys.modules[name]
    if isinstance(getattr(torch, "hpu", None), types.SimpleNamespace):
        del torch.hpu


def test_auto_prefers_hpu_and_the_barrier_is_mark_step(gaudi):
    device = pick_device("auto")
    assert device.type == "hpu" and pick_device("hpu").type == "hpu"
    barrier = step_barrier(device)
    barrier()
    assert gaudi == ["mark_step"]
    assert pick_device("cpu").type == "cpu"


def test_hpu_loaders_drop_the_partial_batch_and_never_fork(gaudi, tiny_file):
    from medmnist_shard import MedMNISTShardDescriptor

    data = MedMNISTData(train_batch_size=10, eval_batch_size=10, device="hpu")
    data.shard_descriptor = MedMNISTShardDescriptor("bloodmnist", 28, tiny_file("bloodmnist").parent)
    train = data.get_train_loader()
    assert train.num_workers == 0 and not train.pin_memory
    assert [len(x) for x, _ in train] == [10, 10]  # 24 samples: the partial batch of 4 is dropped
    assert sum(len(x) for x, _ in data.get_valid_loader()) == 12  # evaluation keeps every sample


def test_without_habana_auto_is_cpu_here_and_hpu_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("ENVOY_NAME", "envoy_7")
    if not torch.cuda.is_available():
        assert pick_device("auto").type == "cpu"
        with pytest.raises(DeviceError, match="envoy envoy_7 has no CUDA device.*device='cuda'"):
            pick_device("cuda")
    with pytest.raises(DeviceError, match="envoy envoy_7 has no HPU device.*device='hpu'"):
        pick_device("hpu")
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        pick_device("tpu")
    with pytest.raises(ValueError, match="device must be one of auto, cpu, cuda, hpu"):
        build_tasks("bloodmnist", device="tpu")


def test_openfls_cuda_assignment_is_honoured_when_cuda_exists(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto", "cuda:1") == torch.device("cuda:1")  # the envoy's cuda_devices: [1]
    assert pick_device("cuda", "cpu") == torch.device("cuda")  # CPU_ONLY policy: the default GPU


def test_nothing_habana_is_imported_where_habana_is_absent():
    code = ("import sys; sys.path[:0] = [sys.argv[1]]; import medfl, torch; "
            "medfl.pick_device('auto'); medfl.step_barrier(torch.device('cpu'))(); "
            "print(sorted(m for m in sys.modules if 'habana' in m))")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "workspace")], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"


class _Recorder:
    """Logs backward, optimizer steps and forward passes into the stand-in's mark_step log."""

    def __init__(self, log, monkeypatch):
        original = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            log.append("backward")
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "backward", backward)
        self.log = log

    def wrap(self, optimizer):
        step = optimizer.step

        def logged_step(*args, **kwargs):
            self.log.append("step")
            return step(*args, **kwargs)

        optimizer.step = logged_step
        return optimizer


def test_mark_step_follows_backward_and_step_in_training_and_each_batch_in_evaluation(gaudi, monkeypatch,
                                                                                     tiny_file):
    from medmnist_shard import MedMNISTShardDescriptor

    # Compute runs on the CPU; the barrier is the stand-in's, as step_barrier gives it on an HPU.
    monkeypatch.setattr(medfl.tasks, "to_device", lambda model, request="auto", assigned="cpu", optimizer=None:
                        torch.device("cpu"))
    monkeypatch.setattr(medfl.tasks, "step_barrier", lambda device: step_barrier(torch.device("hpu")))
    monkeypatch.setattr(medfl.data, "pick_device", lambda request, assigned="cpu": torch.device("hpu"))
    data = MedMNISTData(train_batch_size=10, eval_batch_size=5, device="hpu")
    data.shard_descriptor = MedMNISTShardDescriptor("bloodmnist", 28, tiny_file("bloodmnist").parent)
    model = build_model("bloodmnist", 28)
    recorder = _Recorder(gaudi, monkeypatch)
    optimizer = recorder.wrap(torch.optim.Adam(model.parameters()))
    medfl.tasks.train(model, data.get_train_loader(), optimizer, "hpu", task="multi-class", device_request="hpu")
    assert gaudi == ["backward", "mark_step", "step", "mark_step"] * 2  # two full batches of 10
    gaudi.clear()
    medfl.tasks.validate(model, data.get_valid_loader(), "hpu", task="multi-class", device_request="hpu")
    assert gaudi == ["mark_step"] * 3  # 12 samples in batches of 5


def test_bf16_autocast_only_where_it_helps():
    assert not autocast(torch.device("cpu"), True)._enabled
    assert not autocast(torch.device("cpu"), False)._enabled


def test_the_optimizer_follows_a_backend_that_replaces_parameters():
    model = build_model("bloodmnist", 28)
    optimizer = torch.optim.Adam(model.parameters())
    for module in model.modules():  # what a parameter-replacing .to(device) does
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(param.detach().clone()))
    assert optimizer.param_groups[0]["params"][0] is not next(model.parameters())
    bind_optimizer(optimizer, model)
    assert all(a is b for a, b in zip(optimizer.param_groups[0]["params"], model.parameters(), strict=True))


def test_an_idle_envoy_makes_its_cuda_context_on_the_gpus_its_config_lists(monkeypatch, tmp_path):
    from openfl_adjustments import startup

    made = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch, "zeros", lambda *shape, device=None: made.append(device))
    config = tmp_path / "envoy_config.yaml"
    config.write_text("params:\n  cuda_devices: [1, 2]\n")
    startup.preload_for_envoy(config)
    config.write_text("params:\n  cuda_devices: []\n")
    startup.preload_for_envoy(config)
    assert made == ["cuda:1", "cuda:2", "cuda:0"]


def test_the_full_resolution_stem_keeps_the_classifier_and_drops_the_patch_embedding():
    from medfl.researcher import ParameterError, check_parameters
    from medfl.researcher.parameters import DEFAULTS

    patch, full = build_model("pathmnist", 64), build_model("pathmnist", 64, stem="full")
    x = torch.zeros(2, 3, 64, 64)
    assert patch(x).shape == full(x).shape == (2, 9)
    assert isinstance(patch.features[0], torch.nn.Conv2d) and patch.features[0].stride == (2, 2)
    assert full.features[0][0].stride == (1, 1)  # the first conv block sees every pixel
    assert full.classifier[1].in_features == patch.classifier[1].in_features  # the same weights travel
    with pytest.raises(ValueError, match="unknown stem 'wide': use patch or full"):
        build_model("pathmnist", 64, stem="wide")
    with pytest.raises(ParameterError, match="stem='wide': use \"patch\""):
        check_parameters(**{**DEFAULTS, "run": {"stem": "wide"}})
