"""Repository hygiene that a reviewer would otherwise check by hand."""
import json

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "workspace").glob("*.ipynb"))


def test_notebooks_are_committed_without_outputs():
    assert NOTEBOOKS
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                assert not cell["outputs"] and cell["execution_count"] is None, path.name


def test_one_parameters_cell_that_a_runner_can_fill():
    for path in NOTEBOOKS:
        cells = json.loads(path.read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, path.name
        source = "".join(tagged[0]["source"])
        for name in ("dataset", "size", "rounds_to_train", "epochs_per_round", "train_batch_size",
                     "eval_batch_size", "learning_rate", "director_host", "director_port", "experiment_name",
                     "output_dir"):
            assert f"\n{name} = " in f"\n{source}", f"{path.name} lacks parameter {name}"


def test_notebooks_hold_no_model_or_task_code():
    for path in NOTEBOOKS:
        code = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
        for marker in ("nn.Module", "def train", "def validate", "class ", "CrossEntropyLoss", "!pip"):
            assert marker not in code, f"{path.name} contains {marker!r}: it belongs in the medfl package"


def test_every_pin_lives_in_requirements():
    pins = (ROOT / "requirements.txt").read_text()
    for pin in ("openfl==1.6", "torch==2.13.0", "torchvision==0.28.0", "medmnist==3.0.2", "numpy>=1.26,<2.4"):
        assert pin in pins
