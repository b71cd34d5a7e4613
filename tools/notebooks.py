"""Writes the two notebooks from one list of cells: they differ only where the hardware differs.

The shipped notebooks' model, data-interface and task cells are the source of medfl.model, medfl.data and
medfl.tasks, copied here; a reader changes them in the notebook, and make baseline, make bench and make compare run
the notebook's own definitions (localfed.notebook). The parameters cell is written from
medfl.researcher.DEFAULTS.

usage: python tools/notebooks.py   (then commit workspace/*.ipynb; tests/test_repository.py checks that the
committed notebooks are what this writes)
"""
import inspect
import json
from pathlib import Path

import nbformat as nbf

import roots

WORKSPACE = Path(__file__).resolve().parents[1] / "workspace"
roots.join("launcher")
from medfl import data, model, tasks  # noqa: E402
from medfl.researcher import DEFAULTS  # noqa: E402

md = nbf.v4.new_markdown_cell


def code(tag: str, text: str) -> nbf.NotebookNode:
    """A code cell with one tag, by which tests and tools find it."""
    return nbf.v4.new_code_cell(text, metadata={"tags": [tag]})

CPU_INTRO = """# Federated MedMNIST 2D with OpenFL's interactive API

Hospitals cannot pool patient images, so the model goes to the data. In this notebook you, the researcher, define a federated experiment and submit it to a **director**; every hospital's **envoy** trains it on its own shard of a MedMNIST 2D dataset, and only weights and metrics come back. A director and envoys must be running: `make demo` starts them and runs this notebook for you; docs/running-by-hand.md shows how to start them by hand.

Each section below makes one object of OpenFL's interactive API and says where its code runs: here, on the director, or on every envoy. Change the model, the data interface or the tasks in their cells and run again: the envoys run what these cells define. What you would not edit (metrics, device handling, checks, reporting) lives in the `medfl` package beside this notebook, which OpenFL ships to the nodes with the experiment.

Each envoy picks its device when a task runs: with `device = "auto"`, a CUDA GPU if it has one (its config's `cuda_devices` pins which), else the CPU. This machine needs no accelerator."""

HPU_INTRO = """# Federated MedMNIST 2D on Intel Gaudi (HPU) with OpenFL's interactive API

The same experiment as `Pytorch_MedMNIST_2D.ipynb`, with the envoys training on Gaudi accelerators; only the parameters differ. You, the researcher, define a federated experiment here and submit it to a **director**; every hospital's **envoy** trains it on its own shard of a MedMNIST 2D dataset, and only weights and metrics come back. Each section makes one object of OpenFL's interactive API and says where its code runs; change the model, the data interface or the tasks in their cells and the envoys run what you wrote.

What the Gaudi envoys need (docs/gpus-and-gaudi.md has the details):

- **Intel Gaudi software and its PyTorch** on each envoy host, and this project's other packages installed *without* replacing Intel's torch (`make hpu-deps`). The envoy configs keep `install_requirements: false` for the same reason.
- **Execution mode is an envoy setting.** Eager mode is the default since Intel Gaudi 1.21 and needs nothing. For the legacy lazy mode start the envoy with `HPU_LAZY_MODE=1 ./envoy/start_envoy.sh ...`; the tasks then call `mark_step` after `backward`, after `optimizer.step` and after each evaluation batch.
- **This notebook's machine needs no Gaudi.** `device = "hpu"` makes an envoy without one fail its task with a message naming it; `device = "auto"` lets mixed nodes use what they have.
- `bf16 = True` trains and evaluates under bfloat16 autocast on HPU (and CUDA); weights and the metrics stay float32."""

# Comments of the parameters cell, in its order; the values come from medfl.researcher.DEFAULTS.
PARAMETERS = {
    "dataset": "one of the 12 MedMNIST 2D flags; must be what the envoys serve",
    "size": "28, 64, 128 or 224",
    "rounds": "federated rounds",
    "epochs": "local epochs on every envoy per round",
    "train_batch_size": "",
    "eval_batch_size": "",
    "learning_rate": "Adam, as in the MedMNIST v2 experiments",
    "algorithm": "fedavg, fedprox, fedntd, fedbn, fedadam, fedyogi, fedadagrad, median or geomedian",
    "algorithm_options": 'its settings, e.g. {"mu": 0.1}; the rest as in medfl.algorithms.OPTIONS',
    "personalize_epochs": "k > 0: each envoy also fine-tunes the best model k epochs on its own data (section 8)",
    "device": "{device_comment}",
    "bf16": "bfloat16 autocast on HPU and CUDA envoys",
    "dp": "True: DP-SGD on every envoy (section 5)",
    "dp_options": 'e.g. {"target_epsilon": 4.0}; the rest as in medfl.privacy.OPTIONS',
    "secure_aggregation": "True: the director sees only the envoys' weighted mean (section 6)",
    "seed": "",
    "run": "the director, its certificates, where results go, the rules: medfl.researcher.RUN",
}
COMMENT_COLUMN = 28

VARIANTS = {
    "Pytorch_MedMNIST_2D.ipynb": dict(intro=CPU_INTRO, values={},
                                      device_comment="resolved on each envoy: HPU, else CUDA, else CPU"),
    "HPU_Pytorch_MedMNIST_2D.ipynb": dict(intro=HPU_INTRO, values={"device": "hpu", "bf16": True},
                                          device_comment="every envoy trains on its Gaudi; 'auto' to mix"),
}


def _literal(value) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def parameters(values: dict, device_comment: str, **_) -> str:
    """The parameters cell: every default, with its comment aligned."""
    lines = ["# Parameters: a runner (papermill, `make demo`) may override any of these."]
    for name, comment in PARAMETERS.items():
        line = f"{name} = {_literal(values.get(name, DEFAULTS[name]))}"
        for i, part in enumerate(comment.replace("{device_comment}", device_comment).splitlines() or [""]):
            if part:
                line = f"{line if i == 0 else ''}".ljust(COMMENT_COLUMN - 1) + f" # {part}"
            lines.append(line)
    return "\n".join(lines)


def source(*objects) -> str:
    """The source of package functions and classes, as the notebook shows them."""
    return "\n\n\n".join(inspect.getsource(o).rstrip() for o in objects)


def cells(intro: str, **variant) -> list:
    """Every cell of a notebook, in order."""
    return [
md(intro),
code("parameters", parameters(**variant)),
md("""## 1. Connect to the federation (runs here)

Each cell imports what it introduces: OpenFL's interactive API, PyTorch, and the helpers of the `medfl` package beside this notebook. Impossible parameters stop at this cell's first line, in one line, and each dict comes back with its defaults filled in.

`Federation` is this notebook's connection to the director. The director keeps a **shard registry**: every envoy that registered, whether it is online, and what its shard descriptor says it serves. Shards are disjoint: each envoy's config names its rank (`1,2` and `2,2` for two nodes) and how the data is spread (`iid`, `dirichlet` label skew, or `scanner`: each envoy's images through its own acquisition); a hospital's own file is served whole, without a rank. The director admits only envoys whose samples and labels have the shapes it was configured with, and those must be what `dataset` and `size` imply: `researcher.check_envoys` stops here, naming the envoys, if they serve another dataset or fewer than `run["min_envoys"]` are online, and says so if they serve SYNTHETIC data."""),
code("connect", """import pandas as pd
from openfl.interface.interactive_api.federation import Federation

from medfl import researcher

algorithm_options, dp_options, run = researcher.check_parameters(**globals())  # each dict with its defaults
federation = Federation(client_id="frontend", director_node_fqdn=run["director_host"],
                        director_port=run["director_port"], tls=bool(run["ca_cert"]),
                        cert_chain=run["ca_cert"] or None, api_cert=run["api_cert"] or None,
                        api_private_key=run["api_key"] or None)
shard_registry = federation.get_shard_registry()
envoys, synthetic = researcher.check_envoys(shard_registry, federation, dataset, size, run["min_envoys"])
pd.DataFrame(envoys).set_index("envoy")[["online", "text"]]"""),
md("""This run gets a folder of its own under `run["output_dir"]`, `runs/<experiment name>/` at the repository root, for its results, models, plots and checkpoint. OpenFL logs every step; that log goes to a file there (`run = {"verbose": True}` shows it here too), so this page shows the run itself. With `run = {"resume_from": "<a run's folder>"}` the run goes on in that folder, from its last checkpoint (section 7). The director also hands out a **dummy shard descriptor** of the envoys' shapes: random data that lets this notebook try its code without seeing a single image."""),
code("check", """# This run's folder, with OpenFL's log; resume_from: the earlier run's folder and its last checkpoint, refused here if
# damaged or of another run (parameters, envoys). attempt: OpenFL's name for it (the run's, or <run>-resumed-<time>)
run_dir, experiment_name, attempt, checkpoint, record = researcher.open_run(globals(), envoys)
done = checkpoint.round if checkpoint else 0  # rounds the run has trained already
dummy_shard_descriptor = federation.get_dummy_shard_descriptor(size=4)
image, label = dummy_shard_descriptor.get_dataset("train")[0]
print(f"one sample as the envoys serve it: image {image.shape} {image.dtype}, label {label.shape}")"""),
md("""What the federation will learn: a few test images per class, from a local copy of the public dataset if this machine has one. The envoys' own images never leave them."""),
code("preview", """researcher.show_samples(dataset, size, synthetic, run["preview_dir"])"""),
md("""## 2. The model (defined here, trained on every envoy)

MedMNIST's tutorial CNN: five 3x3 convolution blocks with BatchNorm and three fully connected layers. Input channels and outputs come from `medmnist.INFO`. Above 28 px, with `run = {"stem": "patch"}` (the default), a learned patch embedding first brings the image down to about 28 px, so every size trains at about the 28 px cost; `"full"` runs the network at full resolution (for GPUs and Gaudi). Either way the last feature map is pooled to 4x4, so the weights that travel every round are about the same size at every resolution. OpenFL pickles the model object with the experiment: change this cell, and the envoys train your network (and `make baseline`, `make bench` and `make compare`, given this notebook, use it too)."""),
code("model", """import medmnist
import torch
from torch import nn


""" + source(model.norm_layer, model.conv_block, model.Net) + """


meta = medmnist.INFO[dataset]
torch.manual_seed(seed)
norm = "group" if dp else "batch"  # DP-SGD needs each image's gradient on its own: no BatchNorm (it mixes a batch)
model = Net(in_channels=meta["n_channels"], num_classes=len(meta["label"]), size=size, stem=run["stem"], norm=norm)
print(f"{dataset}: {meta['n_channels']}-channel {size} px images, {len(meta['label'])} outputs ({meta['task']}); "
      f"{sum(p.numel() for p in model.parameters()):,} parameters")"""),
md("""## 3. The data interface (runs on every envoy)

A `DataInterface` subclass says how the tasks get batches. OpenFL builds it here, ships it, and on each envoy sets `shard_descriptor` to that node's own `MedMNISTShardDescriptor` (in `envoy/medmnist_shard/`, which never leaves the node); the tasks then ask for `get_train_loader()` and `get_valid_loader()`, and the data sizes weight each envoy's update in the average. Batches stay uint8 until a task turns them into floats on its device. The last lines try it here on the dummy shard descriptor, as an envoy would on its shard."""),
code("data", """from openfl.interface.interactive_api.experiment import DataInterface

from medfl.data import batch_loader, loader_settings, shuffling, to_float_chw


""" + source(data.MedMNISTData) + """


fed_dataset = MedMNISTData(train_batch_size=train_batch_size, eval_batch_size=eval_batch_size, seed=seed,
                           device=device, first_epoch=done * epochs)
probe = MedMNISTData(train_batch_size=4, device="cpu")
probe.shard_descriptor = dummy_shard_descriptor
images, labels = next(iter(probe.get_train_loader()))
with torch.no_grad():
    outputs = model.eval()(to_float_chw(images))
print(f"a batch: images {tuple(images.shape)} {images.dtype} -> model outputs {tuple(outputs.shape)}")"""),
md("""## 4. The model interface, and the federated algorithm

`ModelInterface` bundles the model, its optimizer and the framework adapter through which OpenFL reads and writes PyTorch weights. Its model holds the initial global weights; the optimizer travels with it to every envoy.

`algorithm` decides how the federation learns, in places you see in code: the optimizer the envoys train with (here), a term added to their loss (`distill`, in section 5) and how the director combines their weights (`TI.set_aggregation_function` on the train task, in section 5). **fedavg**, the default and the yardstick: Adam on every envoy, and the director averages the weights by sample count. **fedprox**: the envoys train with OpenFL's `FedProxAdam`, whose proximal term (weight `algorithm_options["mu"]`; 0 is FedAvg) keeps each envoy near the round's global model; for hospitals whose data differ strongly, especially with several local epochs, where local models drift apart. **fedntd**, made for label skew (hospitals that see some classes much more than others): the envoys train with Adam, and the loss adds a term (weight `"ntd_beta"`) that keeps the local model's view of the classes each image is *not* close to the round's global model, so an envoy learns its own labels without forgetting the classes it rarely sees; each envoy holds one more copy of the model and runs one more forward pass per batch. **fedbn**, made for hospitals whose images look different (scanner, staining, exposure: `make demo partition=scanner` simulates it): each envoy's BatchNorm layers never leave it, and the rest is averaged as in FedAvg; each envoy validates and tests the shared weights with its own normalization, kept on its disk between experiments (`local_plan` in section 6). The saved models hold the shared weights with the initial normalization; each hospital's own layers stay with it. `algorithm_options={"local_norms": True}` does the same with any other algorithm, e.g. FedBN with FedProx's proximal term (`fedprox`). **fedadam**, **fedyogi**, **fedadagrad** (FedOpt): the envoys train as in FedAvg, and the director treats the averaged change of the weights as a gradient and steps Adam, Yogi or Adagrad with it (`"server_learning_rate"`, `"server_beta1"`, `"server_beta2"`, `"server_tau"` in `algorithm_options`); momentum across rounds and a step sized per weight help when updates are noisy or small, at the cost of two more copies of the model on the director and a server learning rate to choose. **median**, **geomedian**: the coordinate-wise or the geometric median of the envoys' weights, which an envoy sending wildly wrong weights (a broken node, corrupted data) cannot drag far; they give up FedAvg's weighting by sample count (the geometric median keeps it as a weight), and with two envoys the median is the mean. `make compare` trains several on the same data, partition and budget, and shows what each gains and costs."""),
code("model-interface", """from openfl.interface.interactive_api.experiment import ModelInterface
from openfl.utilities.optimizers.torch import FedProxAdam

# The envoys' optimizer: Adam, or for FedProx Adam plus the proximal term (OpenFL's FedProxAdam)
if algorithm == "fedprox":
    optimizer = FedProxAdam(model.parameters(), lr=learning_rate, mu=algorithm_options["mu"])
else:
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
framework_adapter = "openfl.plugins.frameworks_adapters.pytorch_adapter.FrameworkAdapterPlugin"
MI = ModelInterface(model=model, optimizer=optimizer, framework_plugin=framework_adapter)"""),
md("""## 5. The tasks (run on every envoy)

`TaskInterface` registers the functions each envoy runs. `register_fl_task` names which of OpenFL's objects fill which arguments: the model (with the round's global weights), a loader from the data interface, the device, and, for the training task, the optimizer. A task registered without an optimizer validates: OpenFL runs it on the global model before training (`aggregated_model_validate`) and on the local model after (`locally_tuned_model_validate`). `add_kwargs` fixes the other arguments. Each task returns a dict of metrics, which stream back here. `set_aggregation_function` on the training task tells the director how to combine the weights it returns (the metrics are always averaged by sample count); the function is built here from `algorithm` and, for a server optimizer, starts from this notebook's initial model.

The loss follows the task type (cross-entropy, or BCE-with-logits for multi-label ChestMNIST), and ACC and AUC are MedMNIST's official ones (`medmnist.evaluator`). Batches arrive as uint8 images, height x width x channels, and become floats in [-1, 1], channels first, on the device. What differs by hardware comes from `medfl.device`: `to_device` resolves the device on each envoy and moves the model (and the optimizer's hold on its parameters) there, `step_barrier` is Gaudi's `mark_step` there and a no-op elsewhere, and `bf16` autocasts to bfloat16 on HPU and CUDA only.

**Differential privacy** (`dp = True`). Weights leave every hospital each round, and a model trained on a few hundred images can give individual patients away. With DP-SGD (`medfl/privacy.py`, on Opacus) each envoy draws its batches by Poisson sampling, clips every image's gradient to `dp_options["max_grad_norm"]` and adds Gaussian noise to their sum; an accountant adds up the privacy spent, epsilon at delta, over every step of the run, and the train task reports it each round. It protects any one image of an envoy's training data from what the weight updates and the final model reveal; it does not hide which hospitals take part, nor aggregate statistics of their data. The noise follows from `"target_epsilon"` for the planned rounds x epochs, unless `"noise_multiplier"` is set; it costs accuracy, more so on small shards."""),
code("train-task", """import time

from openfl.interface.interactive_api.experiment import TaskInterface

from medfl import NotTrueDistillation, aggregation_function
from medfl.checks import check_trained
from medfl.device import step_barrier, to_device
from medfl.privacy import DPSGD

TI = TaskInterface()
task = meta["task"]
# How the director combines the envoys' trained weights: the weighted mean (fedavg, fedprox), a server optimizer
# (fedadam, fedyogi, fedadagrad), or a median (median, geomedian); medfl/algorithms.py says which OpenFL pieces it uses
aggregation = aggregation_function(algorithm, model, algorithm_options)
# FedNTD adds to each envoy's loss: the round's global model, frozen, teaches the classes each image is not
ntd = algorithm_options["ntd_beta"], algorithm_options["ntd_tau"]
distill = NotTrueDistillation(*ntd) if algorithm == "fedntd" else None
print(f"{algorithm}: the envoys train with {type(optimizer).__name__}" + (f" and {distill}" if distill else "")
      + f"; the director aggregates with {type(aggregation).__name__}")
# With dp, every envoy trains with DP-SGD. This object travels with the task and, on each envoy, keeps that envoy's
# privacy accountant over the experiment's rounds, and on the envoy's disk under the run's name over every attempt.
privacy = DPSGD(**dp_options, rounds=rounds, epochs_per_round=epochs, ledger=experiment_name) if dp else None


@TI.set_aggregation_function(aggregation)
@TI.add_kwargs(task=task, epochs=epochs, device_request=device, bf16=bf16, privacy=privacy, distill=distill)
@TI.register_fl_task(model="model", data_loader="train_loader", device="device", optimizer="optimizer")
""" + source(tasks.train)),
code("validate-task", """from medfl.metrics import evaluate


@TI.add_kwargs(task=task, device_request=device, bf16=bf16)
@TI.register_fl_task(model="model", data_loader="val_loader", device="device")
""" + source(tasks.validate)),
md("""## 6. Start the experiment

`FLExperiment` packs everything above and sends it to the director, which starts an aggregator for it and hands it to every envoy. The arguments that are not OpenFL's defaults:

- `rounds_to_train=rounds + 1` with `task_assigner=Schedule(...)`: OpenFL validates each global model at the start of the next round, so one last round only validates the final model; then it too can be chosen as the best. A resumed run (`run = {"resume_from": "../runs/<id>"}`) trains only the `rounds - done` that remain, from its checkpoint's model, as a new experiment named after the run and the time (`<run>-resumed-<date>-<time>`); the data interface's `first_epoch` lets each envoy's shuffling go on where it stopped.
- `opt_treatment="RESET"`: each round's local training starts from a fresh optimizer state, as FedAvg does.
- `device_assignment_policy="CUDA_PREFERRED"`: an envoy whose config lists `cuda_devices` hands its tasks `cuda:N`.
- `override_config`: this project's aggregator, `medfl.aggregator.SelectingAggregator` (it runs on the director), which keeps the best model by one metric, checks every update, and goes on without lost envoys while `run["min_envoys"]` remain; the aggregator's port, if fixed; and, with `run["wire_dtype"]` `"float16"` or `"bfloat16"`, what travels: each round's *change* of the weights, in half the bytes, which the director adds to the global model it holds and aggregates in float32 (`medfl/wire.py`). For hospitals on slow links; the default, `"float32"`, sends the weights as they are.
- with `secure_aggregation = True`, **secure aggregation** (`security/secagg.py`, its envoy and director halves beside it): each round every envoy clips its update's norm to `run["max_update_norm"]`, then adds masks to it that cancel only in the sum of all envoys' (SecAgg: keys agreed between the envoys through the director, which relays what it cannot read). The director learns the round's weighted mean and nothing else of any one hospital's weights; it still sees their metrics and sample counts. Envoys that drop out mid-round are unmasked from the others' shares while `run["secure_threshold"]` (default: more than half) remain. It costs twice the bytes up (64-bit ring elements) and a few round trips per round; `median` and `geomedian`, which need each update, are refused.

OpenFL writes its plan and pickled objects into the current folder and zips that folder for the nodes; `researcher.submission(...)` lets it do so in a temporary copy of this folder's code, so this folder stays as it is and no notebook travels. With mutual TLS it also signs the archive with your key (`run["api_key"]`): the director accepts it only from you, and each envoy runs it only if nothing in it changed on the way and its hospital's policy admits it.

**Each hospital decides.** `declared(...)` writes into the plan what the experiment will do on the envoys: its training rounds, DP-SGD's settings and the envoys it federates. Each envoy reads that before it unpacks anything and holds it against its own `policy:` (in its config, enforced by the node's code, not this notebook's): which researchers may run experiments there, whether DP-SGD is required, a privacy budget over every experiment ever run on its data, secure aggregation, at most so many rounds, at least so many envoys. An envoy that refuses says so in one `REFUSED` line with the rule and the numbers (`results.json`'s `refusals`), and the run goes on without it while `min_envoys` allow. Every node keeps an audit log of what arrived and what left it (`make audit`).

**Each hospital reads the code first**, if its policy says `approval: manual`. `researcher.submission` also packs the cells above that define the model, the data interface and the tasks as source; the envoy hashes them with the package, what the pickled objects are made of and the plan's code path (not the parameters), and holds an experiment whose code its operator has not approved: a `HELD` line names the envoy and the code, and the run waits for it up to its `approval_timeout`. Its operator reads the source and a diff against what it approved before (`make review`), then `make approve code=...` or `make refuse code=... why=...`. Approved, the envoy runs only code compiled from that source (docs/security.md). Change a cell, and it asks again; change only parameters, and it does not. Without it, whoever an envoy admits can run any code there: that is what submitting an experiment means."""),
code("start", """from openfl.interface.interactive_api.experiment import FLExperiment

from medfl import Schedule
from medfl.algorithms import local_plan
from medfl.privacy import declared
from medfl.wire import wire_format
from security.secagg import plan as secure_plan

plan_overrides = {
    "aggregator.template": "medfl.aggregator.SelectingAggregator",
    **{f"aggregator.settings.{name}": run[name] for name in researcher.RULES},  # best_metric, min_envoys, ...
    **({"network.settings.agg_port": run["aggregator_port"]} if run["aggregator_port"] else {}),
    **wire_format(run["wire_dtype"]),  # float16, bfloat16: OpenFL's delta updates, through medfl.wire's pipeline
    # secure_aggregation: every envoy masks its update; the director can unmask their weighted mean, nothing else
    **secure_plan(secure_aggregation, run["secure_threshold"], run["max_update_norm"]),
    # what each hospital's own policy checks before its envoy unpacks anything: rounds, DP-SGD, the envoys
    **declared(rounds - done, privacy, envoys),
}
# fedbn: each envoy holds its BatchNorm layers back, and keeps them per round of this run on its own disk
local_layers = dict(algorithm=algorithm, model=model, run=experiment_name, first_round=done,
                    local_norms=algorithm_options["local_norms"])  # FedBN's idea with another algorithm
plan_overrides.update(local_plan(**local_layers, start_round=done if checkpoint else None))
if checkpoint:  # resume_from: start from the checkpoint's global model and aggregation state (a server optimizer's)
    checkpoint.restore(model, aggregation)
record["started"] = time.time()  # results.json's wall time counts from the submission
with researcher.submission(run["api_cert"], run["api_key"]):
    experiment = FLExperiment(federation=federation, experiment_name=attempt)
    experiment.start(
        model_provider=MI,
        task_keeper=TI,
        data_loader=fed_dataset,
        rounds_to_train=rounds - done + 1,
        task_assigner=Schedule(TI.get_registered_tasks(), train_rounds=rounds - done),
        opt_treatment="RESET",
        device_assignment_policy="CUDA_PREFERRED",
        override_config=plan_overrides,
    )"""),
md("""## 7. Follow the training

Metrics stream from the director as the envoys report them: per round, every envoy validates the global model on its `val` split, trains on its shard, and validates its local result; the director averages the weights by sample count. Lines marked `aggregator` are sample-weighted means over the envoys; its `traffic` line says what the round moved: the bytes the director received and sent, and the connections the envoys opened (one each per experiment; `results.json` has each envoy's share).

`experiment.get_best_model()` is called as soon as a model becomes the best, so it survives even a lost director; `experiment.get_last_model()` once the run has ended. The director checks every update before it averages it (`medfl/checks.py`): one that claims more training samples than its shard registered, is not finite, has another shape or BatchNorm state no training gives, lies more than `run["max_update_ratio"]` times the round's median distance from the global model, or turns against the same envoy's last accepted change (`run["min_update_cosine"]`) is left out of that round, as are metrics outside their range (a `REJECTED` line names the envoy and the check); the rest are clipped to `run["max_update_size"]` times the global model's norm (a `CLIPPED` line). docs/faults.md says what a lying envoy can still do. An envoy rejected in `run["max_rejections"]` of the last `run["rejection_window"]` rounds, one whose task raises an error (named on its `DROPPED` line), one that stops answering, or one past `round_timeout`, is dropped, and the round ends with the others while `min_envoys` remain; below that the experiment fails. If anything fails, even the director, this cell stops with one line saying why, after saving what arrived.

**Checkpoints.** At the end of every round `researcher.Checkpointer` fetches the new global model, with the director's aggregation state (a server optimizer's moments), and writes `checkpoint.pt` to the run's folder, atomically, with every metric so far, the best model and the parameters. If the director, its host or this kernel goes down, start the director again (the envoys stay up and register again by themselves) and run this notebook with `run = {"resume_from": "<the run's folder>"}` and the run's parameters (`make demo resume_from=runs/<id>` does it for a local federation): the run goes on from its last complete round, and `results.json` and the plots cover all of it, with the restart marked. Under DP-SGD each envoy also keeps its privacy spent on its own disk, under the run's name, so the epsilon it reports counts every attempt."""),
code("follow", """from medfl import Best

checkpoints = researcher.Checkpointer(run_dir, experiment, model, record, resumed=checkpoint)  # each round's end
training = researcher.follow(experiment, rounds, Best(run["best_metric"], run["best_mode"]),
                             on_new_best=experiment.get_best_model, checkpoints=checkpoints)
researcher.stop_if_failed(run_dir, training=training, **record)
last_model = experiment.get_last_model()
best_model = training.best_model or last_model  # None only if no global model had a finite validation score
print(training.best.describe(rounds))"""),
md("""## 8. Test the best model

A second, validation-only experiment sends the best model back to every envoy, to be scored on their `test` splits: the test images never leave the nodes either. It reuses the tasks; only the data interface reads another split. With `fedbn`, each envoy scores the shared weights with its own BatchNorm layers of that round.

**Confidence intervals.** A hospital's test split may hold a few hundred images, so every test metric comes with its 95 % interval. Each envoy scores `run["bootstrap"]` resamples of its own test split (1,000 by default; the same images drawn with replacement) and sends those scores, never a prediction; the director takes each envoy's percentile interval, and the pooled one from the envoys' resampled scores weighted by their sample counts, as the pooled score is. Two runs whose intervals overlap are not shown better or worse by these numbers; docs/experiment.md says how to read them.

**A model per hospital** (`personalize_epochs = k`, any algorithm): the same experiment then also has each envoy fine-tune the best model for `k` epochs on its own train split (plain Adam, no DP-SGD or distillation) and score that on its test split. The fine-tuned weights never leave the envoy: every tensor is held back, and only the scores travel. `results.json`'s `test` has both, per envoy: `per_envoy` (the federated model) and `personalized` (each hospital's own); `make compare` adds what each envoy gets on its own data alone."""),
code("test", """from medfl.tasks import bootstrapping, personalizing

test_data = MedMNISTData(train_batch_size=train_batch_size, eval_batch_size=eval_batch_size, eval_split="test",
                         seed=seed, device=device)
# personalize_epochs: each envoy also fine-tunes the best model on its own train split, then tests that; every tensor
# stays on the envoy (only scores leave), so secure aggregation has nothing to sum
tests = personalizing(TI, personalize_epochs) if personalize_epochs else TI
# every test metric's 95 % interval: each envoy also scores run["bootstrap"] resamples of its test split
tests = bootstrapping(tests, run["bootstrap"], seed)
# fedbn: every envoy tests with its own BatchNorm layers of the best model's round
test_plan = {**plan_overrides, **local_plan(**{**local_layers, "first_round": None}, start_round=training.best.round,
                                            personalize=personalize_epochs > 0),
             **declared(1 if personalize_epochs else 0, None, envoys)}  # trains only to personalize, without DP
with researcher.submission(run["api_cert"], run["api_key"]):
    test_experiment = FLExperiment(federation=federation, experiment_name=f"{attempt}-test")
    test_experiment.start(
        model_provider=ModelInterface(model=best_model, optimizer=torch.optim.Adam(best_model.parameters(),
                                                                                   lr=learning_rate),
                                      framework_plugin=framework_adapter),
        task_keeper=tests,
        data_loader=test_data,
        rounds_to_train=1,
        task_assigner=Schedule(tests.get_registered_tasks(), train_rounds=1 if personalize_epochs else 0),
        device_assignment_policy="CUDA_PREFERRED",
        override_config=test_plan,
    )
testing = researcher.follow(test_experiment, 1, label="test")
researcher.stop_if_failed(run_dir, training=training, testing=testing, **record)"""),
md("""## Results

Saved under `runs/<experiment name>/` at the repository root (`runs/latest` points at the newest): `results.json` (with any envoys that dropped out, and when), `metrics.csv`, `curves.png`, `partition.png`, TensorBoard logs (`tensorboard --logdir runs`), and the best and last models as PyTorch `state_dict`s."""),
code("results", """from IPython.display import display

results = researcher.finish_run(run_dir, training=training, testing=testing, best_model=best_model,
                                last_model=last_model, **record)  # results.json, plots and models, in run_dir
test = results["test"]
print(("SYNTHETIC data: " if results["synthetic"] else "") + f"{dataset} {size}px, {len(envoys)} envoys, "
      f"{algorithm}; test ACC {test['acc']:.4f}, AUC {test['auc']:.4f}; saved to {run_dir.resolve()}")
if results["privacy"]:
    print(f"DP-SGD: {results['privacy']['summary']}")
display(pd.DataFrame([{"round": e["round"], **e["aggregated"]} for e in results["rounds"]]).set_index("round"))
pd.DataFrame(researcher.test_rows(test)).set_index("envoy")  # the best model's test, each with its 95 % interval"""),
code("plots", """from IPython.display import Image, display

display(Image(str(run_dir / "curves.png")), Image(str(run_dir / "partition.png")))"""),
md("""To use the trained model elsewhere, build the network of section 2 and load the weights; with the cell unchanged, the `medfl` package's `build_model` makes the same network:

```python
from medfl import build_model
model = build_model("bloodmnist", 28)  # with the run's stem, if not "patch": build_model(..., stem="full")
model.load_state_dict(torch.load("runs/latest/best_model.pt"))
model.eval()
```"""),
md("""## 9. Evaluate a saved model on every hospital (external validation)

A model trained elsewhere, or last week's best model, tested on every envoy's `test` split (or `val`, with `run["evaluate_split"]`), with the same metrics and intervals as section 8: a validation-only experiment, so nothing trains and no weights leave the envoys. Give the file as `run = {"evaluate_model": "../runs/<id>/best_model.pt"}`, run sections 1 to 5, then this cell; `make evaluate model=runs/latest/best_model.pt` does exactly that against a local federation. A file of another network (dataset, size, stem) is refused in one line that says what differs. The scores go to `evaluation.json` in this run's folder. A run's own best model on the same data scores exactly that run's test block. With `fedbn` the saved model holds the shared weights with the initial normalization; each hospital's own layers stayed with it."""),
code("evaluate", """from openfl.interface.interactive_api.experiment import FLExperiment, ModelInterface

from medfl import Schedule
from medfl.privacy import declared
from medfl.tasks import bootstrapping

if run["evaluate_model"]:
    saved = researcher.SavedModel(run["evaluate_model"], model, f"{dataset} {size} px, stem {run['stem']}, {norm}norm")
    evaluation_plan = {"aggregator.template": "medfl.aggregator.SelectingAggregator",
                       **{f"aggregator.settings.{name}": run[name] for name in researcher.RULES},
                       **({"network.settings.agg_port": run["aggregator_port"]} if run["aggregator_port"] else {}),
                       **declared(0, None, envoys)}  # trains nothing
    evaluation_data = MedMNISTData(train_batch_size=train_batch_size, eval_batch_size=eval_batch_size,
                                   eval_split=run["evaluate_split"], seed=seed, device=device)
    with researcher.submission(run["api_cert"], run["api_key"]):
        evaluation_experiment = FLExperiment(federation=federation, experiment_name=f"{attempt}-evaluate")
        evaluation_experiment.start(
            model_provider=ModelInterface(model=saved.model, optimizer=torch.optim.Adam(saved.model.parameters()),
                                          framework_plugin=framework_adapter),
            task_keeper=bootstrapping(TI, run["bootstrap"], seed),
            data_loader=evaluation_data,
            rounds_to_train=1,
            task_assigner=Schedule(TI.get_registered_tasks(), train_rounds=0),
            device_assignment_policy="CUDA_PREFERRED",
            override_config=evaluation_plan,
        )
    evaluated = researcher.follow(evaluation_experiment, 1, label="evaluate")
    evaluation = saved.write(run_dir, evaluated, split=run["evaluate_split"], **record)  # evaluation.json
    display(pd.DataFrame(researcher.test_rows(evaluation)).set_index("envoy"))
else:
    print('no model to evaluate: give one as run = {"evaluate_model": "../runs/<id>/best_model.pt"}')"""),
]


def notebook(name: str) -> nbf.NotebookNode:
    """The notebook as this script writes it."""
    nb = nbf.v4.new_notebook()
    nb.cells = cells(**VARIANTS[name])
    # What JupyterLab writes for its default kernel, so that opening a notebook changes as little as it can.
    nb.metadata = {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # stable ids: random ones would change on every run
    return nb


if __name__ == "__main__":
    for name in VARIANTS:
        nbf.write(notebook(name), WORKSPACE / name)
        print(f"wrote {WORKSPACE / name}")
