"""Each experiment runs the code it brings: a node that ran one experiment runs the next with the next one's
package, not with the modules it kept from the first (OpenFL alone would)."""
import shutil

import pytest
from notebook_cells import run_until, start_experiment

from conftest import ROOT


@pytest.mark.slow
def test_a_changed_package_reaches_envoys_that_already_ran_an_experiment(tiny_file, tmp_path, monkeypatch):
    from localfed.federation import LocalFederation
    from medfl.researcher import follow
    from medmnist_shard.spec import sample_shape, target_shape

    workspace = tmp_path / "workspace"
    shutil.copytree(ROOT / "workspace" / "medfl", workspace / "medfl", ignore=shutil.ignore_patterns("__pycache__"))
    data_dir = tiny_file("bloodmnist").parent
    shards = {f"envoy_{r}": {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir), "rank_worldsize": f"{r},2",
                             "download": False} for r in (1, 2)}
    with LocalFederation(tmp_path / "federation", shards, sample_shape("bloodmnist", 28),
                         target_shape("bloodmnist")) as fed:
        monkeypatch.chdir(workspace)
        cells = run_until("validate-task", director_host=fed.host, director_port=fed.port, device="cpu",
                          output_dir=str(tmp_path / "runs"), preview_dir=str(tmp_path))

        def metric_names(name):
            run = follow(start_experiment(cells, name, rounds=1), 1, echo=lambda line: None)
            assert run.error is None
            return {m["metric_name"] for m in run.metrics if m["metric_origin"].startswith("envoy")}

        assert "balanced" not in metric_names("first")
        metrics = workspace / "medfl" / "metrics.py"
        source = metrics.read_text()
        assert 'return {"acc": acc, "auc": auc}' in source
        metrics.write_text(source.replace('return {"acc": acc, "auc": auc}',
                                          'return {"acc": acc, "auc": auc, "balanced": 1.0}'))
        assert "balanced" in metric_names("second")
