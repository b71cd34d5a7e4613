"""A node runs only code its operator approved, by hash, and what the operator read is what runs (security.review,
security.pickles, policy `approval: manual`).

The attacker: a researcher whom the node admits (signed, allowed), who controls the experiment's archive: its cells,
its package, its plan, and its pickles, which are programs. She wants code to run on the node that its operator did
not read: a changed model or task under an approved name, a pickle that calls something while it loads, a
function whose bytecode is not its source, a global rebound to something else. The tests play each against the
node's loader, and the approval flow end to end against real processes."""
import io
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cloudpickle
import pytest

from conftest import ROOT
from security import audit, guard, pickles, policy, review
from security.signing import Refused

SLOW_MODEL_LINE = "nn.Linear(128, num_classes),"
TOUCH = Path.touch.__module__  # pathlib, or pathlib._local from Python 3.13


# --- the rules ------------------------------------------------------------------------------------------------
def test_approval_is_auto_or_manual_with_a_timeout_and_needs_a_state_folder(tmp_path, monkeypatch):
    rules = policy.parse({"approval": "manual", "approval_timeout": 30})
    assert (rules.approval, rules.approval_timeout) == ("manual", 30.0)
    assert policy.parse({}).approval == "auto"
    with pytest.raises(policy.PolicyError, match="approval='later': give auto .* or manual"):
        policy.parse({"approval": "later"})
    with pytest.raises(policy.PolicyError, match="approval_timeout=-1: give the seconds"):
        policy.parse({"approval_timeout": -1})
    config = tmp_path / "envoy.yaml"
    config.write_text("policy: {approval: manual}\n")
    monkeypatch.delenv(guard.ENVOY_STATE, raising=False)
    with pytest.raises(policy.PolicyError, match="approval: manual, whose approvals the node keeps in its state"):
        guard.configure_envoy("envoy_1", config, tls=False)
    config.write_text("params: {install_requirements: true}\npolicy: {max_rounds: 3}\n")
    with pytest.raises(policy.PolicyError, match="installs nothing an experiment asks for"):
        guard.configure_envoy("envoy_1", config, tls=False)


# --- end to end: a federation whose envoys run only approved code ------------------------------------------------
@pytest.fixture(scope="module")
def reviewing(tiny_file, tmp_path_factory):
    """Two envoys with approval: manual, each keeping its approvals in its own state folder."""
    from localfed.federation import LocalFederation

    data_dir = tiny_file("bloodmnist").parent
    shards = {f"envoy_{r}": {"flag": "bloodmnist", "size": 28, "data_dir": str(data_dir), "rank_worldsize": f"{r},2",
                             "download": False} for r in (1, 2)}
    workdir = tmp_path_factory.mktemp("reviewing")
    rules = {"approval": "manual", "approval_timeout": 90}
    with LocalFederation(workdir, shards, [28, 28, 3], [1], policies=dict.fromkeys(shards, rules),
                         state=workdir / "state") as fed:
        yield fed


def changed_notebook(tmp_path) -> Path:
    """The CPU notebook with one more layer in its model cell."""
    import json

    notebook = json.loads((ROOT / "workspace" / "Pytorch_MedMNIST_2D.ipynb").read_text())
    cell = next(c for c in notebook["cells"] if c.get("metadata", {}).get("tags") == ["model"])
    source = "".join(cell["source"])
    assert SLOW_MODEL_LINE in source
    cell["source"] = source.replace(SLOW_MODEL_LINE, "nn.Dropout(0.1), " + SLOW_MODEL_LINE)
    path = tmp_path / "changed.ipynb"
    path.write_text(json.dumps(notebook))
    return path


class _Packed(Exception):
    pass


def cells_for(fed, tmp_path, notebook=None, **parameters) -> dict:
    from notebook_cells import CPU_NOTEBOOK, run_until

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT / "workspace")
        return run_until("validate-task", path=notebook or CPU_NOTEBOOK, director_host=fed.host,
                         director_port=fed.port, device="cpu", output_dir=str(tmp_path / "runs"),
                         preview_dir=str(tmp_path), **parameters)


def packed(fed, tmp_path, name, notebook=None, tamper=None, **parameters) -> Path:
    """The archive the notebook's start cell packs (`tamper` may change the staged folder first); not sent."""
    from notebook_cells import start_experiment
    from openfl.interface.interactive_api.experiment import FLExperiment

    cells = cells_for(fed, tmp_path, notebook, **parameters)
    original, kept = FLExperiment._pack_the_workspace, tmp_path / f"{name}.zip"

    def pack():
        if tamper:
            tamper(Path.cwd())
        shutil.copyfile(original(), kept)
        raise _Packed

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT / "workspace")
        mp.setattr(FLExperiment, "_pack_the_workspace", staticmethod(pack))
        with pytest.raises(_Packed):
            start_experiment(cells, name, rounds=parameters.get("rounds", 1))
    return kept


def submit(fed, tmp_path, name, notebook=None, echo=lambda line: None, tamper=None, **parameters):
    """The notebook's cells submit an experiment and follow it to its end."""
    from notebook_cells import start_experiment
    from openfl.interface.interactive_api.experiment import FLExperiment

    from medfl.researcher import follow

    rounds = parameters.setdefault("rounds", 1)
    cells = cells_for(fed, tmp_path, notebook, **parameters)
    original = FLExperiment._pack_the_workspace

    def pack():
        if tamper:
            tamper(Path.cwd())
        return original()

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT / "workspace")
        mp.setattr(FLExperiment, "_pack_the_workspace", staticmethod(pack))
        experiment = start_experiment(cells, name, rounds=rounds)
    return follow(experiment, rounds, echo=echo)


def make(*args, fed) -> subprocess.CompletedProcess:
    """A make target of the operator's, on this federation's state folder."""
    return subprocess.run(["make", "--no-print-directory", *args, f"state={fed.state}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def held_codes(fed) -> set[str]:
    return {p.name for p in fed.state.glob(f"*/{review.PENDING}/*") if p.is_dir() and not p.name.startswith(".")}


def approving_when_both_hold(fed, lines: list, decide=("approve",)):
    """An echo for follow(): keeps the notebook's lines; once both envoys hold the code, its operator runs
    make approve (or the `decide` target) on it."""
    def echo(line):
        lines.append(line)
        if sum("HELD:" in x for x in lines) == 2 and not any(x.startswith("operator") for x in lines):
            code = line.split("(code ")[1].split("...")[0]
            done = make(*decide, f"code={code}", fed=fed)
            lines.append(f"operator: {done.returncode} {done.stdout}{done.stderr}")

    return echo


@pytest.mark.slow
def test_held_until_its_operator_approves_then_run_again_with_other_parameters_without_review(reviewing, tmp_path):
    fed = reviewing
    lines = []
    run = submit(fed, tmp_path, "first", echo=approving_when_both_hold(fed, lines))
    held = sorted(line for line in lines if "HELD:" in line)
    assert len(held) == 2, lines
    code = held[0].split("(code ")[1].split("...")[0]
    for envoy, line in zip(("envoy_1", "envoy_2"), held, strict=True):
        assert line.endswith(f"HELD: {envoy} holds experiment first for review (code {code}...): its operator runs "
                             "make review on that node")
    assert any(line.startswith("operator: 0") for line in lines), lines
    assert run.error is None, (run.error, lines)
    assert run.held and {h["envoy"] for h in run.held} == {"envoy_1", "envoy_2"}
    assert any(m["metric_origin"] == "envoy_1" and m["task_name"] == "train" for m in run.metrics)
    for envoy in ("envoy_1", "envoy_2"):
        entries = audit.AuditLog(fed.state / envoy / audit.FILE, envoy).entries()
        events = [(e["event"], e.get("decision")) for e in entries if e.get("experiment", "first") == "first"]
        assert ("arrived", "held") in events and ("approved", None) in events and ("released", None) in events
        assert (fed.state / envoy / review.APPROVED).is_dir()
    # The same code with other parameters needs no new review
    lines = []
    again = submit(fed, tmp_path, "again", echo=lines.append, rounds=2, learning_rate=0.01)
    assert again.error is None and not again.held and not any("HELD" in line for line in lines), lines
    audited = make("audit", fed=fed)
    assert audited.returncode == 0, audited.stdout + audited.stderr


@pytest.mark.slow
def test_a_changed_model_is_held_again_showing_the_diff_and_a_refused_code_is_refused_with_the_reason(
        reviewing, tmp_path):
    fed = reviewing
    lines = []
    run = submit(fed, tmp_path, "changed", notebook=changed_notebook(tmp_path),
                 echo=approving_when_both_hold(fed, lines, decide=("refuse", "why=a dropout layer we did not ask for")))
    assert sum("HELD:" in line for line in lines) == 2, lines
    assert run.error and "only 0 of 2 envoys remain" in run.error
    assert sorted(d["reason"] for d in run.dropouts) == [
        f"refused: {e} refuses experiment changed: its operator refused its code {c}: a dropout layer we did not ask "
        "for" for e, c in zip(("envoy_1", "envoy_2"), [lines[0].split("(code ")[1].split("...")[0]] * 2, strict=True)]
    shown = make("review", fed=fed)  # nothing pending any more
    assert shown.returncode == 0
    code = next(p.name for p in fed.state.glob(f"envoy_1/{review.REFUSED}/*"))
    screen = subprocess.run([sys.executable, "-m", "security.review", "--state", str(fed.state), "show", code[:8]],
                            cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "refused by" in screen and "a dropout layer we did not ask for" in screen
    assert "+            nn.Dropout(0.1), nn.Linear(128, num_classes)," in screen  # the diff against the approved
    assert "-            nn.Linear(128, num_classes)," in screen
    # The next time, at once, with the reason
    again = submit(fed, tmp_path, "changed-again", notebook=changed_notebook(tmp_path))
    assert not again.held
    assert all("its operator refused its code" in d["reason"] and "a dropout layer" in d["reason"]
               for d in again.dropouts) and len(again.dropouts) == 2


@pytest.mark.slow
def test_a_held_archive_is_never_unpickled_and_an_approved_pickle_cannot_call_what_the_review_allows_not(
        reviewing, tmp_path):
    """The pickle would leave a file if loaded: held, it is not loaded; approved anyway, the node's loader
    refuses to call what it names."""
    fed = reviewing
    trace = tmp_path / "pickle-ran"

    class LeavesAFile:
        def __reduce__(self):
            return (Path.touch, (trace,))

    def tamper(folder):
        (folder / "loader_obj.pkl").write_bytes(pickle.dumps(LeavesAFile()))  # the director never loads it

    lines = []

    def echo(line):
        lines.append(line)
        if sum("HELD:" in x for x in lines) == 2 and not any(x.startswith("operator") for x in lines):
            assert not trace.exists()  # held on both envoys, and not one byte of it unpickled
            code = line.split("(code ")[1].split("...")[0]
            pending = next(fed.state.glob(f"envoy_1/{review.PENDING}/{code}*"))
            assert f"uses {TOUCH} Path.touch" in (pending / "manifest.txt").read_text()  # named in the review
            done = make("approve", f"code={code}", fed=fed)
            lines.append(f"operator: {done.returncode}")

    run = submit(fed, tmp_path, "leaves-a-file", echo=echo, tamper=tamper)
    assert any(line.startswith("operator: 0") for line in lines), lines
    assert not trace.exists()
    assert run.error
    assert sorted(d["reason"] for d in run.dropouts) == [
        f"refused: {e} refuses experiment leaves-a-file: a pickle of it calls or names {TOUCH}.Path.touch, which this "
        "node does not let an experiment's objects reach (only the model, optimizer and interface classes, and what "
        "its reviewed source imports)" for e in ("envoy_1", "envoy_2")]


# --- units: the hash, and the loader against each lie ------------------------------------------------------------
@pytest.fixture(scope="module")
def archives(reviewing, tmp_path_factory):
    """Archives the start cell packs (not sent): the notebook's, with other parameters, with another algorithm, and
    with a changed model cell."""
    tmp = tmp_path_factory.mktemp("archives")
    fed = reviewing
    return {"plain": packed(fed, tmp, "plain"),
            "parameters": packed(fed, tmp, "parameters", rounds=3, learning_rate=0.01, seed=4, train_batch_size=16,
                                 epochs=2),
            "fedprox": packed(fed, tmp, "fedprox", algorithm="fedprox"),
            "fedadam": packed(fed, tmp, "fedadam", algorithm="fedadam"),
            "fedntd": packed(fed, tmp, "fedntd", algorithm="fedntd"),
            "dp": packed(fed, tmp, "dp", dp=True, dp_options={"noise_multiplier": 1.0}),
            "changed": packed(fed, tmp, "changed", notebook=changed_notebook(tmp))}


@pytest.mark.slow
def test_the_code_hash_is_stable_across_parameters_and_changes_with_code(archives):
    codes = {name: review.Code.of(path) for name, path in archives.items()}
    assert codes["plain"].hash == codes["parameters"].hash
    assert codes["plain"].hash != codes["fedprox"].hash  # another optimizer class: another code path
    assert ("openfl.utilities.optimizers.torch.fedprox", "FedProxAdam") in codes["fedprox"].uses
    assert codes["plain"].hash != codes["changed"].hash
    assert any("nn.Dropout(0.1)" in text for text in codes["changed"].cells())
    assert not codes["plain"].unshown and not codes["plain"].missing_packages()


@pytest.mark.slow
def test_any_executed_line_changes_the_hash(archives, tmp_path):
    base = review.Code.of(archives["plain"])
    for member, old, new in (("medfl/metrics.py", "def ", "def  "), ("plan/plan.yaml", "opt_treatment: RESET",
                                                                         "opt_treatment: CONTINUE_LOCAL")):
        changed = tmp_path / "changed.zip"
        with zipfile.ZipFile(archives["plain"]) as source, zipfile.ZipFile(changed, "w") as out:
            for info in source.infolist():
                data = source.read(info)
                out.writestr(info, data.decode().replace(old, new, 1).encode() if info.filename == member else data)
        assert review.Code.of(changed).hash != base.hash, member


def unpacked(archive: Path, folder: Path) -> pickles.Source:
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(folder)
    code = review.Code.of(archive)
    return pickles.Source(code.cells(), folder, code.uses, code.imports)


@pytest.mark.slow
def test_the_reviewed_source_is_the_code_that_runs(archives, tmp_path, monkeypatch):
    source = unpacked(archives["plain"], tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    tasks = pickles.load(tmp_path / "tasks_obj.pkl", source)
    model = pickles.load(tmp_path / "model_obj.pkl", source)
    compiled = source.codes("cells")
    train = tasks.task_registry["train"]
    function = train.__closure__[0].cell_contents if train.__closure__ else train
    assert any(function.__code__ is c for c in compiled["train"])  # the code compiled here from the review
    assert any(type(model.model).__init__.__code__ is c for c in compiled["Net.__init__"])
    assert "def train(" in "".join(source.cells)


@pytest.mark.slow
def test_every_algorithm_and_dp_sgd_load_under_review(archives, tmp_path, monkeypatch):
    """What each notebook variant's objects are made of (a server optimizer's numpy state, FedNTD's distillation,
    DP-SGD's accountant) loads through the node's loader."""
    for name in ("fedprox", "fedadam", "fedntd", "dp"):
        folder = tmp_path / name
        source = unpacked(archives[name], folder)
        with monkeypatch.context() as mp:
            mp.syspath_prepend(str(folder))
            for pickled in sorted(folder.glob("*.pkl")):
                assert pickles.load(pickled, source) is not None, (name, pickled.name)
            for module in [m for m in sys.modules if m == "medfl" or m.startswith("medfl.")]:
                if str(folder) in (getattr(sys.modules[module], "__file__", "") or ""):
                    del sys.modules[module]


@pytest.mark.slow
def test_the_loader_refuses_bytecode_that_is_not_its_source_and_rebound_globals(archives, tmp_path, monkeypatch):
    source = unpacked(archives["plain"], tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    # Another review's source for the same pickles: the functions' bytecode is no longer what it says
    changed = review.Code.of(archives["changed"])
    other = pickles.Source(changed.cells(), tmp_path, source.uses, source.imports)
    with pytest.raises(Refused, match="its function Net.__init__ is not the code that the notebook's reviewed cells"):
        pickles.load(tmp_path / "model_obj.pkl", other)
    # A task whose global to_device is something else than the cells import
    tasks = pickles.load(tmp_path / "tasks_obj.pkl", source)
    train = tasks.task_registry["train"]
    function = train.__closure__[0].cell_contents if train.__closure__ else train
    function.__globals__["to_device"] = shutil.rmtree
    forged = tmp_path / "forged.pkl"
    forged.write_bytes(cloudpickle.dumps(tasks))
    uses, imports = pickles.references(forged.read_bytes())
    lying = pickles.Source(source.cells, tmp_path, uses, imports)
    with pytest.raises(Refused, match="shutil.rmtree, which this node does not let"):
        pickles.load(forged, lying)
    # Not listed by the review: refused before it is resolved
    with pytest.raises(Refused, match="names shutil.rmtree, which its review does not list"):
        pickles.load(forged, source)


def test_reading_a_pickle_for_review_runs_nothing(tmp_path):
    trace = tmp_path / "ran"

    class LeavesAFile:
        def __reduce__(self):
            return (Path.touch, (trace,))

    uses, imports = pickles.references(pickle.dumps({"model": LeavesAFile(), "x": [1, 2]}))
    assert (TOUCH, "Path.touch") in uses and not trace.exists()
    with pytest.raises(Refused, match="cannot be read"):
        pickles.references(b"\x80\x05not a pickle")


def test_review_commands_list_show_and_refuse_clearly(tmp_path):
    state = tmp_path / "state" / "envoy_1"
    code = review.Code({"review/cells/01.py": "x = 1\n", "medfl/a.py": "y = 2\n"},
                       {"review/cells/01.py": "a", "medfl/a.py": "b"}, {("torch.nn", "Linear")}, {"torch"},
                       {"collaborator.template": "openfl.component.Collaborator"})
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(review.PLAN, "aggregator:\n  settings: {rounds_to_train: 4}\n")
    review.hold(state, code, archive, {"experiment": "exp", "researcher": "alice", "time": "now",
                                       "archive_sha256": "ab" * 32, "signature": "verified", "certificate": "CN=alice"})

    def cli(*args):
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stdout", out)
            mp.setattr(sys, "stderr", err)
            returned = review.main(["--state", str(tmp_path / "state"), *args])
        return returned, out.getvalue() + err.getvalue()

    assert cli("list") == (0, f"envoy_1 ({state}):\n  pending   {code.hash[:12]}\n")
    returned, shown = cli("show")
    assert returned == 0 and "experiment exp from alice" in shown and "--- review/cells/01.py (1 lines)\nx = 1" in shown
    assert "uses torch.nn Linear" in shown and "this node has approved none yet" in shown
    assert "rounds_to_train: 4" in shown.split("-- the plan of its latest experiment")[1]
    assert cli("approve", "abc") == (2, "error: give at least 6 digits of the code\n")
    assert cli("approve", "ffffff")[0] == 1
    returned, said = cli("refuse", code.hash[:8], "--why", "not this")
    assert returned == 0 and said == f"envoy_1: refused code {code.hash[:12]}\n"
    assert review.status(state, code.hash) == (review.REFUSED, {**review.status(state, code.hash)[1],
                                                                "why": "not this", "decision": "refused"})
    assert not list((state / review.REFUSED).glob("*/*.zip"))  # the archive is not kept once decided
    assert [e["event"] for e in audit.AuditLog(state / audit.FILE, "envoy_1").entries()] == ["refused"]
    assert review.main(["--state", str(tmp_path / "nowhere"), "list"]) == 2


def test_an_audit_log_two_processes_write_keeps_one_chain(tmp_path):
    path = tmp_path / audit.FILE
    first, second = audit.AuditLog(path, "envoy_1"), audit.AuditLog(path, "envoy_1")
    for n in range(3):
        first.append("a", n=n)
        second.append("b", n=n)
    entries, breaks = audit._read(path)
    assert not breaks and [e["seq"] for e in entries] == list(range(1, 7))


def test_a_plan_template_outside_openfl_and_the_archive_is_named(tmp_path):
    code = review.Code({}, {"medfl/a.py": "x"}, set(), set(), {"collaborator.template": "subprocess.Popen",
                                                               "aggregator.template": "medfl.aggregator.X"})
    assert review.templates_outside(code) == ["subprocess.Popen"]


def test_a_package_the_node_lacks_is_named(tmp_path):
    code = review.Code({"review/cells/01.py": "import numpy\nimport notinstalled_pkg.sub\n",
                        "medfl/a.py": "from . import b\n", "medfl/b.py": "import alsomissing\n",
                        "medfl/lazy.py": "def f():\n    import habana_frameworks\n"},
                       {}, {("medfl.a", "f")}, set(), {})
    assert code.missing_packages() == ["alsomissing", "notinstalled_pkg"]


CELL = "def leave(path):\n    open(path, 'w').close()\n    return len(path)\n"


def notebook_function(text: str = CELL, **namespace):
    """`leave` as a notebook cell defines it (pickled by value, as the notebook's functions are)."""
    namespace = {"__name__": "__notebook__", **namespace}
    exec(compile(text, "<cell>", "exec", dont_inherit=True), namespace)
    return namespace["leave"]


def test_a_pickle_cannot_call_a_function_it_made_while_it_loads_even_reviewed_code(tmp_path):
    trace = tmp_path / "ran"

    class Calls:
        def __reduce__(self):
            return notebook_function(), (str(trace),)

    data = cloudpickle.dumps(Calls())
    uses, imports = pickles.references(data)
    (tmp_path / "x.pkl").write_bytes(data)
    with pytest.raises(Refused, match="calls leave while it loads"):
        pickles.load(tmp_path / "x.pkl", pickles.Source([CELL], tmp_path, uses, imports))
    assert not trace.exists()
    # Its bytecode must be its source's, too
    other = CELL.replace("open(path, 'w').close()", "pass")
    with pytest.raises(Refused, match="its function leave is not the code that the notebook's reviewed cells"):
        pickles.load(tmp_path / "x.pkl", pickles.Source([other], tmp_path, uses, imports))


def test_a_function_may_not_see_a_built_in_rebound_nor_a_name_its_cells_do_not_bind(tmp_path):
    import torch

    for namespace, message in (({"len": torch.nn.Linear}, "sees the built-in len rebound"),
                               ({"open": torch.nn.Linear}, "sees the built-in open rebound")):
        path = tmp_path / "f.pkl"
        path.write_bytes(cloudpickle.dumps(notebook_function(**namespace)))
        uses, imports = pickles.references(path.read_bytes())
        with pytest.raises(Refused, match=message):
            pickles.load(path, pickles.Source([CELL], tmp_path, uses, imports))
    path.write_bytes(cloudpickle.dumps(notebook_function()))
    uses, imports = pickles.references(path.read_bytes())
    leave = pickles.load(path, pickles.Source([CELL], tmp_path, uses, imports))
    assert leave.__code__.co_filename == "<reviewed cell 1>"  # the code compiled on the node from the review


def test_a_pickle_may_build_objects_but_never_call_a_function_even_one_of_the_reviewed_package(tmp_path, monkeypatch):
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "__init__.py").write_text("def write(path):\n    open(path, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import shipped

    trace = tmp_path / "ran"

    class Calls:
        def __reduce__(self):
            return shipped.write, (str(trace),)

    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(Calls()))
    uses, imports = pickles.references(path.read_bytes())
    assert ("shipped", "write") in uses
    with pytest.raises(Refused, match="calls write while it loads: it may build objects of the classes its review"):
        pickles.load(path, pickles.Source([], tmp_path, uses, imports))
    assert not trace.exists()


def _with_member(archive: Path, out: Path, name: str, data: bytes) -> Path:
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(out, "w") as zipped:
        for info in source.infolist():
            zipped.writestr(info, source.read(info))
        zipped.writestr(name, data)
    return out


@pytest.mark.slow
def test_compiled_python_that_would_run_instead_of_the_source_shown_is_refused(archives, tmp_path, monkeypatch):
    """An unchecked hash-based .pyc is loaded without a look at its .py: the review would show metrics.py, and the
    node would run the .pyc beside it."""
    import py_compile

    evil = tmp_path / "metrics.py"
    evil.write_text("import os\nos.system('touch /tmp/owned')\n")
    pyc = py_compile.compile(str(evil), cfile=str(tmp_path / "m.pyc"),
                             invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    member = f"medfl/__pycache__/metrics.{sys.implementation.cache_tag}.pyc"
    tampered = _with_member(archives["plain"], tmp_path / "tampered.zip", member, Path(pyc).read_bytes())
    code = review.Code.of(tampered)
    assert code.compiled == [member] and code.hash != review.Code.of(archives["plain"]).hash
    node = guard.Envoy("envoy_1", policy.parse({"approval": "manual"}), None, "bloodmnist-28", tmp_path)
    assert guard._code_rules(node, code) == (
        "approval", f"it brings compiled Python ({member}), which would run in place of the source its operator reads")


def test_an_archive_name_outside_its_folder_or_a_sender_chosen_name_never_leaves_the_state_folder(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(review.PLAN, "{}\n")
        zipped.writestr("../../outside.py", "x = 1\n")
    with pytest.raises(Refused, match="a path outside its folder"):
        review.Code.of(archive)  # plaintext envoys check no signature, so no earlier check has seen the names
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(review.PLAN, "{}\n")
    state = tmp_path / "state"
    folder = review.hold(state, review.Code.of(archive), archive,
                         {"experiment": "../../../escaped", "archive_sha256": "ab" * 32, "time": "now"})
    assert sorted(p.name for p in folder.glob("*.zip")) == [f"{'ab' * 32}.zip"]
    assert not list(tmp_path.rglob("escaped*"))
