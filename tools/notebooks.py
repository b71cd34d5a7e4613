"""Writes the two notebooks from one list of cells: they differ only where the hardware differs.

usage: python tools/notebooks.py   (then commit workspace/*.ipynb; tests/test_repository.py checks
that the committed notebooks are what this writes)
"""
from pathlib import Path

import nbformat as nbf

WORKSPACE = Path(__file__).resolve().parents[1] / "workspace"
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell

CPU_INTRO = """# Federated MedMNIST 2D on CPU (or CUDA)

A director and one envoy per data node are running (`make demo` starts them for you; the README shows how by hand). Each envoy serves its own shard of a MedMNIST 2D dataset and never sends an image. This notebook defines the experiment, submits it to the director, follows it round by round, tests the best model on every node's test split, and keeps the results.

Each envoy picks its device when a task runs: with `device = "auto"` that is a CUDA GPU where the envoy has one (its config's `cuda_devices` pins which), else the CPU. The machine running this notebook needs no accelerator.

The model, data interface and tasks live in the `medfl` package beside this notebook. OpenFL ships this folder to every node with the experiment, so the nodes run exactly that code; that is also why outputs go to `../runs/`, outside it."""

HPU_INTRO = """# Federated MedMNIST 2D on Intel Gaudi (HPU)

The same experiment as `Pytorch_MedMNIST_2D.ipynb`, with the envoys training on Gaudi accelerators. Only the parameters differ: the tasks, model and data code are the same `medfl` package, which runs on CPU, CUDA and HPU alike.

What the Gaudi envoys need (the README's HPU section has the details):

- **Intel Gaudi software and its PyTorch** on each envoy host, and this project's other packages installed *without* replacing Intel's torch (`make hpu-deps`). The envoy configs keep `install_requirements: false` for the same reason.
- **Execution mode is an envoy setting.** Eager mode is the default since Intel Gaudi 1.21 and needs nothing. For the legacy lazy mode start the envoy with `HPU_LAZY_MODE=1 ./envoy/start_envoy.sh ...`; the tasks then call `mark_step` after `backward`, after `optimizer.step` and after each evaluation batch.
- **This notebook's machine needs no Gaudi.** `device = "hpu"` makes an envoy without one fail its task with a message naming it; `device = "auto"` lets mixed nodes use what they have.
- `bf16 = True` trains and evaluates under bfloat16 autocast on HPU (and CUDA); weights and the metrics stay float32."""

PARAMETERS = """# Parameters: a runner (papermill, `make demo`) may override any of these.
dataset = "bloodmnist"      # one of the 12 MedMNIST 2D flags; must be what the envoys serve
size = 28                   # 28, 64, 128 or 224
rounds_to_train = 3
epochs_per_round = 1
train_batch_size = 64
eval_batch_size = 256
learning_rate = 1e-3        # Adam, as in the MedMNIST v2 experiments
best_metric = "auc"         # the best model is the global model with the best aggregated val AUC...
best_mode = "max"           # ...highest ("min" for loss)
min_envoys = 0.5            # envoys lost mid-run are dropped; the run goes on while this share (float) or
                            # number (int) of its envoys remain, and fails, naming the lost ones, below it
round_timeout = 0           # seconds; envoys still busy this long into a round are dropped too (0: no limit)
device = "{device}"{device_pad}# {device_comment}
bf16 = {bf16}{bf16_pad}# bfloat16 autocast on HPU and CUDA envoys
director_host = "localhost"
director_port = 50051
aggregator_port = 0         # 0: OpenFL derives one per experiment (49152-60999); fix it for firewalls
ca_cert = ""                # mutual TLS: the CA, and this client's certificate and key (`make certs`
api_cert = ""               # writes certs/ca.crt, certs/frontend.crt and certs/frontend.key);
api_key = ""                # all empty: plaintext, for a director started without CERTS
experiment_name = ""        # empty: medmnist-<dataset>-<date>-<time>
output_dir = "../runs"      # outside workspace/, which travels with the experiment
data_source = ""            # recorded in results.json; empty: "synthetic" or "medmnist" from the envoys
seed = 0"""

VARIANTS = {
    "Pytorch_MedMNIST_2D.ipynb": dict(intro=CPU_INTRO, device="auto", bf16="False",
                                      device_comment="resolved on each envoy: HPU, else CUDA, else CPU"),
    "HPU_Pytorch_MedMNIST_2D.ipynb": dict(intro=HPU_INTRO, device="hpu", bf16="True",
                                          device_comment="every envoy trains on its Gaudi; 'auto' to mix"),
}


def parameters(device: str, bf16: str, device_comment: str, **_) -> str:
    return PARAMETERS.format(device=device, device_pad=" " * (21 - len(device)), device_comment=device_comment,
                             bf16=bf16, bf16_pad=" " * (20 - len(bf16)))


def cells(intro: str, **variant) -> list:
    return [
md(intro),
code(parameters(**variant), metadata={"tags": ["parameters"]}),
md("""## Connect to the federation

The director lists the envoys that registered with it and what each serves. Shards are disjoint: each envoy's config names its rank (`1,2` and `2,2` for two nodes) and how the data is spread (`iid`, or `dirichlet` label skew)."""),
code("""import time
from pathlib import Path

import pandas as pd
import torch
from IPython.display import Image, display
from openfl.interface.interactive_api.experiment import FLExperiment
from openfl.interface.interactive_api.federation import Federation

import medfl

medfl.run.check_parameters(**globals())  # impossible parameters stop here, before anything runs
tls = bool(ca_cert)
federation = Federation(client_id="frontend", director_node_fqdn=director_host, director_port=director_port,
                        tls=tls, cert_chain=ca_cert or None, api_cert=api_cert or None,
                        api_private_key=api_key or None)
envoys = medfl.run.registry(federation)
if medfl.run.is_synthetic(envoys):
    print("NOTE: the envoys serve SYNTHETIC data; the results below say nothing about MedMNIST.")
pd.DataFrame(envoys)[["envoy", "online", "text"]]"""),
md("""The director accepts only envoys whose images and labels have its configured shapes. Those must also be what this notebook's `dataset` and `size` imply; a dummy sample shows what a batch will look like."""),
code("""medfl.run.check_dataset(federation, dataset, size, envoys)
medfl.run.check_quorum(envoys, min_envoys)
image, label = federation.get_dummy_shard_descriptor(size=4).get_dataset("train")[0]
print(f"one sample: image {image.shape} {image.dtype}, label {label.shape}; task: {medfl.task_type(dataset)}")"""),
md("""## Define the experiment

- **Model**: five 3x3 convolution blocks with BatchNorm and three fully connected layers; channels and outputs come from `medmnist.INFO`.
- **Tasks**: `train` runs `epochs_per_round` local epochs with Adam; `validate` reports loss and MedMNIST's official ACC and AUC on each envoy's `val` split. The loss follows the task type: cross-entropy, or BCE-with-logits for multi-label ChestMNIST.
- **Data**: each envoy batches its own uint8 shard; images become float one batch at a time."""),
code("""torch.manual_seed(seed)
model = medfl.build_model(dataset, size)
optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
task_interface = medfl.build_tasks(dataset, epochs_per_round=epochs_per_round, device=device, bf16=bf16)
data_interface = medfl.MedMNISTData(train_batch_size=train_batch_size, eval_batch_size=eval_batch_size,
                                    seed=seed, device=device)"""),
md("""## Train

Each round, every envoy validates the current global model on its `val` split, trains on its shard, and validates its local result; the director averages the weights by sample count. One last round only validates the final global model, so that it too can be chosen as the best. Lines marked `aggregator` are sample-weighted means over the envoys.

An envoy that stops answering (the director misses its health checks) or passes `round_timeout` is dropped, and the round ends with the others while `min_envoys` remain; below that, or if an envoy's task raises an error, the experiment fails. If anything fails, even the director, this cell stops with one line saying why, after saving the metrics and the best model received so far."""),
code("""experiment_name = experiment_name or f"medmnist-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
run_dir = Path(output_dir) / experiment_name
params = dict(dataset=dataset, size=size, rounds_to_train=rounds_to_train, epochs_per_round=epochs_per_round,
              train_batch_size=train_batch_size, eval_batch_size=eval_batch_size, learning_rate=learning_rate,
              best_metric=best_metric, best_mode=best_mode, min_envoys=min_envoys, round_timeout=round_timeout,
              device=device, bf16=bf16, seed=seed, experiment=experiment_name, tls=tls)
record = dict(params=params, envoys=envoys, started=time.time(), data_source=data_source)
experiment = FLExperiment(federation=federation, experiment_name=experiment_name)
medfl.run.start_training(experiment, model, optimizer, task_interface, data_interface, rounds_to_train,
                         best_metric=best_metric, best_mode=best_mode, min_envoys=min_envoys,
                         round_timeout=round_timeout, aggregator_port=aggregator_port)
training = medfl.run.follow(experiment, rounds_to_train, medfl.Best(best_metric, best_mode))
medfl.report.stop_if_failed(run_dir, training=training, **record)"""),
md("""## Test the best model

The best global model is the one with the best aggregated validation `best_metric`. It is sent back to every envoy in a validation-only experiment on their `test` splits: the test images never leave the nodes either."""),
code("""print(training.best.describe(rounds_to_train))
test_run = FLExperiment(federation=federation, experiment_name=f"{experiment_name}-test")
medfl.run.start_test(test_run, training.best_model, task_interface, eval_batch_size, device, min_envoys,
                     round_timeout, aggregator_port)
testing = medfl.run.follow(test_run, 1, label="test")
medfl.report.stop_if_failed(run_dir, training=training, testing=testing, **record)"""),
md("""## Results

Saved under `runs/<experiment name>/` at the repository root (`runs/latest` points at the newest): `results.json` (with any envoys that dropped out, and when), `metrics.csv`, `curves.png`, `partition.png`, TensorBoard logs (`tensorboard --logdir runs`), and the best and last models as PyTorch `state_dict`s."""),
code("""results = medfl.report.build_results(training=training, testing=testing, **record)
medfl.report.save_run(run_dir, results, training, testing)
test = results["test"]
print(("SYNTHETIC data: " if results["synthetic"] else "") + f"{dataset} {size}px, {len(envoys)} envoys; "
      f"test ACC {test['acc']:.4f}, AUC {test['auc']:.4f}; saved to {run_dir.resolve()}")
pd.DataFrame([{"round": e["round"], **e["aggregated"]} for e in results["rounds"]]).set_index("round")"""),
code("""display(Image(str(run_dir / "curves.png")), Image(str(run_dir / "partition.png")))"""),
md("""To use the trained model elsewhere:

```python
model = medfl.build_model("bloodmnist", 28)
model.load_state_dict(torch.load("runs/latest/best_model.pt"))
model.eval()
```"""),
]


def notebook(name: str) -> nbf.NotebookNode:
    """The notebook as this script writes it."""
    nb = nbf.v4.new_notebook()
    nb.cells = cells(**VARIANTS[name])
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # stable ids: random ones would change on every run
    return nb


if __name__ == "__main__":
    for name in VARIANTS:
        nbf.write(notebook(name), WORKSPACE / name)
        print(f"wrote {WORKSPACE / name}")
