"""`make evaluate model=PATH`: a saved model tested on every envoy of a local federation, nothing trained.

It runs the notebook's cells up to its tasks (sections 1 to 5) and its section 9, which submits a validation-only
experiment with the model; evaluation.json in runs/<time>-evaluate-<dataset>-<size>/ has every envoy's scores and
the pooled ones, each with its 95 % interval."""
from __future__ import annotations

import json
import time
from pathlib import Path

import nbformat

from medfl.researcher import ParameterError
from medfl.researcher.evaluation import SavedModel
from medfl.researcher.report import test_rows
from medmnist_shard import DataError

from .notebook import definitions
from .run import data_for, launch_notebook, local_federation, notebook_parameters, shard_params
from .settings import Settings

# The notebook's cells that make evaluate runs, by tag: connecting, the run's folder, the model, data and tasks, and
# section 9's evaluation; not the training, the test of its best model or the preview.
CELLS = ("parameters", "connect", "check", "model", "data", "model-interface", "train-task", "validate-task",
         "evaluate")


def evaluation_notebook(notebook: Path, output: Path) -> Path:
    """The notebook with only CELLS, written to `output`; DataError if it lacks one."""
    nb = nbformat.read(notebook, as_version=4)
    tags = {(c.metadata.get("tags") or [""])[0] for c in nb.cells if c.cell_type == "code"}
    if missing := [t for t in CELLS if t not in tags]:
        raise DataError(f"{notebook.name} has no cell tagged {', '.join(missing)}: make evaluate runs those cells")
    nb.cells = [c for c in nb.cells if c.cell_type == "code" and (c.metadata.get("tags") or [""])[0] in CELLS]
    nbformat.write(nb, output)
    return output


def evaluate(settings: Settings) -> int:
    """Test settings.model on every envoy's split; 0 on success."""
    if not settings.model:
        raise DataError("make evaluate needs model=PATH: a saved state_dict, e.g. model=runs/latest/best_model.pt")
    model = Path(settings.model).expanduser().resolve()
    if not model.is_file():
        raise DataError(f"model={settings.model}: no such file; give a saved state_dict, e.g. "
                        "model=runs/latest/best_model.pt")
    if settings.split not in ("test", "val"):
        raise DataError(f"split={settings.split!r}: use test or val")
    # Refused here, before anything starts, as the notebook's section 9 would refuse it: the notebook's own network
    network = definitions(settings.notebook, **settings.notebook_parameters())
    try:
        SavedModel(model, network.model, f"{settings.dataset} {settings.size} px, stem {network.run['stem']}")
    except ParameterError as exc:
        raise DataError(str(exc).replace("evaluate_model=", "model=", 1)) from None
    started = time.monotonic()
    data_dir, data_source = data_for(settings)
    print(f"data: {data_source} ({data_dir or settings.data_dirs})")
    shards = shard_params(settings, data_dir)
    run_dir = Path(settings.runs) / f"{time.strftime('%Y%m%d-%H%M%S')}-evaluate-{settings.dataset}-{settings.size}"
    run_dir.mkdir(parents=True, exist_ok=True)
    source = evaluation_notebook(Path(settings.notebook), run_dir / "evaluate-cells.ipynb")
    federation = local_federation(settings, run_dir, shards)
    print(f"run folder: {run_dir}")
    print(f"starting a director and {settings.envoys} envoys on {federation.host}:{federation.port} ...")
    with federation:
        print(f"all {settings.envoys} envoys registered; evaluating {model} on their {settings.split} splits")
        parameters = notebook_parameters(settings, federation, run_dir, data_source)
        parameters["run"].update(evaluate_model=str(model), evaluate_split=settings.split)
        launch_notebook(federation, source, run_dir / "notebook.ipynb", parameters,
                        started + settings.timeout, run_dir / "logs" / "notebook.log",
                        cwd=Path(settings.notebook).parent)
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    print(f"\n{model} on each envoy's {settings.split} split ({evaluation['dataset']} {evaluation['size']} px"
          + (", SYNTHETIC data" if data_source == "synthetic" else "") + f"), in {time.monotonic() - started:.0f} s:")
    rows = test_rows(evaluation)
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    for row in [dict(zip(columns, columns, strict=True)), *rows]:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
    print(f"results: {run_dir / 'evaluation.json'}")
    return 0
