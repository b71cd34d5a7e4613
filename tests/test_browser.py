"""The notebook as users run it: JupyterLab on a copy of the workspace, the CPU notebook opened in headless
Chromium, Run > Run All Cells against a local federation on synthetic data, then the page itself checked (no
errors, progress lines and bars, plots, no log flood, no OpenFL leftovers in the file browser) and saved.

Runs when CI=true or BROWSER_TEST=1 (under a minute here); installs Debian's chromium and chromium-driver with
apt-get when it runs as root and they are missing. Screenshots go to runs/browser-test/ for a person to look at.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from conftest import ROOT
from localfed.federation import LocalFederation, free_port, tail
from medmnist_shard.spec import sample_shape, target_shape

if os.environ.get("CI") != "true" and os.environ.get("BROWSER_TEST") != "1":
    pytest.skip("real-browser test: runs when CI=true or BROWSER_TEST=1 (about a minute)", allow_module_level=True)
pytestmark = pytest.mark.slow  # make test-pythons leaves it to the default Python

NOTEBOOK = "Pytorch_MedMNIST_2D.ipynb"
REPO_NOTEBOOKS = sorted((ROOT / "workspace").glob("*.ipynb"))
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian's packages
SIZES = {"train": 240, "val": 60, "test": 60}  # split over 2 envoys: each trains on 120 images
ROUNDS = 2
RUN_S = 240  # Run All, from the click to the plots: about 20 s here
RESULT_LINE = "SYNTHETIC data: bloodmnist 28px, 2 envoys, fedavg; test ACC"
# Output blocks on the whole page after a run: 15 today, whatever the rounds; OpenFL's INFO log on the page
# added about 37 more.
MAX_OUTPUT_BLOCKS = 25
SCREENSHOTS = ROOT / "runs" / "browser-test"

# JupyterLab's user settings for this run: every cell in the DOM (its default windowing leaves cells out of view
# unrendered), no news or update checks (offline; no toast over the page), and no autosave, so that the file on
# disk changes only when the test presses Ctrl+S.
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
}
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,2000")

# One look at the page: every code cell's prompt and visible output text, and the page-wide counts.
PAGE = """
const cells = [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')];
const outputs = [...document.querySelectorAll('.jp-OutputArea-output')];
return {
  cells: cells.map(c => ({prompt: c.querySelector('.jp-InputPrompt').innerText.trim(),
                          text: [...c.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText).join('\\n'),
                          images: [...c.querySelectorAll('.jp-OutputArea-output img')].map(
                              i => [i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]),
                          bars: c.querySelectorAll('.jp-OutputArea-output .widget-hprogress').length})),
  kernel: (document.querySelector('.jp-Notebook-ExecutionIndicator') || {dataset: {}}).dataset.status,
  outputs: outputs.length,
  errors: outputs.filter(o => o.dataset.mimeType === 'application/vnd.jupyter.error').map(o => o.innerText),
  stderr: outputs.filter(o => o.dataset.mimeType === 'application/vnd.jupyter.stderr').map(o => o.innerText),
  wide: outputs.filter(o => o.scrollWidth > o.clientWidth + 1).map(o => o.innerText.slice(0, 120)),
};
"""
# Counts each code cell's progress widgets at every change of the page, so that a bar shown for less than a polling
# interval (the test experiment's, on tiny data) is still seen: window.medflBars[cell index] = the most it showed.
WATCH_BARS = """
window.medflBars = {};
const count = () => document.querySelectorAll('.jp-Notebook .jp-CodeCell').forEach((cell, i) => {
  const n = cell.querySelectorAll('.jp-OutputArea-output .widget-hprogress').length;
  if (n > (window.medflBars[i] || 0)) window.medflBars[i] = n;
});
new MutationObserver(count).observe(document.querySelector('.jp-Notebook'), {childList: true, subtree: true});
"""


def stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a process group, SIGKILL it after `grace` s, then kill any of its children that left the group.

    Jupyter starts each kernel in a session of its own, so the server's group alone would leave the kernel behind.
    """
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


@contextlib.contextmanager
def logs_on_failure(*logs: Path):
    """Print the tail of each log if the block fails (pytest shows it with the failure)."""
    try:
        yield
    except BaseException:
        for log in logs:
            print(f"--- {log.name}:\n{tail(log, 60)}")
        raise


@pytest.fixture(scope="module")
def browser_binaries(request):
    """Debian's chromium and chromium-driver: installed with apt-get as root (as in CI), otherwise a skip."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no headless Chromium: install Debian's chromium and chromium-driver packages (as root)")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\ninstalling chromium and chromium-driver with apt-get (running as root, as in CI)")
    install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}  # no debconf questions without a terminal
    done = subprocess.run(install, capture_output=True, text=True, env=env)
    if done.returncode != 0:  # a fresh CI image may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        done = subprocess.run(install, capture_output=True, text=True, env=env)
    if done.returncode != 0 or not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        pytest.skip(f"no headless Chromium, and apt-get could not install chromium chromium-driver: {last}")


@pytest.fixture(scope="module")
def synthetic(tiny_file):
    return tiny_file("bloodmnist", 28, SIZES)


@pytest.fixture(scope="module")
def federation(synthetic, tmp_path_factory):
    """A director and two envoys (plaintext) serving disjoint shards of the synthetic file."""
    shards = {f"envoy_{rank}": {"flag": "bloodmnist", "size": 28, "data_dir": str(synthetic.parent),
                                "rank_worldsize": f"{rank},2", "partition": "iid", "seed": 0, "download": False}
              for rank in (1, 2)}
    fed = LocalFederation(tmp_path_factory.mktemp("federation"), shards, sample_shape("bloodmnist", 28),
                          target_shape("bloodmnist"))
    with fed:
        yield fed


def fingerprints() -> dict:
    """The repository's notebooks, byte for byte."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in REPO_NOTEBOOKS}


@pytest.fixture(scope="module")
def repository_notebooks():
    """The repository's notebooks before anything ran."""
    return fingerprints()


@pytest.fixture(scope="module")
def lab_dir(repository_notebooks, federation, synthetic, tmp_path_factory):
    """What JupyterLab serves: the medfl package and the CPU notebook with its parameters injected, as papermill
    injects them for `make demo`; the run's outputs and the preview's local copy live outside it."""
    import papermill

    root = tmp_path_factory.mktemp("lab")
    served = root / "workspace"
    shutil.copytree(ROOT / "workspace" / "medfl", served / "medfl", ignore=shutil.ignore_patterns("__pycache__"))
    preview = root / "preview"
    (preview / "synthetic").mkdir(parents=True)
    shutil.copy(synthetic, preview / "synthetic" / synthetic.name)  # the sample grid's local copy
    papermill.execute_notebook(
        str(ROOT / "workspace" / NOTEBOOK), str(served / NOTEBOOK), prepare_only=True, progress_bar=False,
        parameters={"rounds": ROUNDS, "run": {"director_host": federation.host, "director_port": federation.port,
                                              "aggregator_port": free_port(), "experiment_name": "browser-test",
                                              "output_dir": str(root / "runs"), "preview_dir": str(preview)}})
    return served


@pytest.fixture(scope="module")
def lab(lab_dir, tmp_path_factory):
    """JupyterLab on a free loopback port with a random token, isolated from the user's Jupyter config."""
    home = tmp_path_factory.mktemp("jupyter")
    for name, values in LAB_SETTINGS.items():
        path = home / "settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "IPYTHONDIR": str(home / "ipython")}
    env.pop("PYTHONPATH", None)  # the kernel imports medfl from the served copy, as a user's would
    port, token = free_port(), secrets.token_hex(16)
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={lab_dir}", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    log = home / "jupyterlab.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=lab_dir, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with logs_on_failure(log):
            deadline = time.monotonic() + 60
            while not _answers(f"{url}/api/status?token={token}"):
                assert process.poll() is None, f"JupyterLab exited with status {process.returncode}"
                assert time.monotonic() < deadline, "JupyterLab did not answer within 60 s"
                time.sleep(0.2)
        yield {"url": url, "token": token, "log": log, "dir": lab_dir}
    finally:
        stop_group(process)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def driver(browser_binaries, tmp_path_factory):
    """Headless Chromium through Debian's chromedriver; Selenium Manager never runs (it would download)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is missing: pip install -r requirements.txt")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    service = Service(executable_path=str(CHROMEDRIVER), popen_kw={"start_new_session": True})
    browser = webdriver.Chrome(service=service, options=options)
    try:
        yield browser
    finally:
        with contextlib.suppress(Exception):
            browser.quit()
        stop_group(service.process, grace=5)


def _run_all(driver) -> None:
    """Run > Run All Cells, from JupyterLab's menu bar."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.XPATH, "//div[contains(@class,'lm-MenuBar-itemLabel')][text()='Run']").click()
    driver.find_element(By.XPATH, "//div[contains(@class,'lm-Menu-itemLabel')][text()='Run All Cells']").click()


def _kernel_idle(lab) -> bool:
    with urllib.request.urlopen(f"{lab['url']}/api/sessions?token={lab['token']}", timeout=5) as response:
        sessions = json.load(response)
    return any(s["path"] == NOTEBOOK and s["kernel"]["execution_state"] == "idle" for s in sessions)


def _wait(what: str, ready, deadline: float, also=lambda: None):
    """Poll `ready()` until it returns something truthy; `also()` may raise to stop early."""
    while not (result := ready()):
        also()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return result


@pytest.fixture(scope="module")
def page(driver, lab, federation, lab_dir):
    """The notebook opened in JupyterLab and run with Run All; returns the page's state once the plots are in."""
    tags = [(c["metadata"].get("tags") or [""])[0] for c in json.loads((lab_dir / NOTEBOOK).read_text())["cells"]
            if c["cell_type"] == "code"]
    logs = [lab["log"], *(c.log for c in federation.components)]
    with logs_on_failure(*logs), screenshot_on_failure(driver):
        started = time.monotonic()
        driver.get(f"{lab['url']}/lab/tree/{NOTEBOOK}?token={lab['token']}")

        def opened():
            state = driver.execute_script(PAGE)
            return len(state["cells"]) == len(tags) and state["kernel"] == "idle" and _kernel_idle(lab)

        _wait(f"{NOTEBOOK} to open with its {len(tags)} code cells and an idle kernel", opened, started + 90)
        driver.execute_script(WATCH_BARS)
        clicked = time.monotonic()
        _run_all(driver)

        def no_failure():
            state = driver.execute_script(PAGE)
            assert not state["errors"], "a cell failed:\n" + "\n".join(state["errors"])
            for component in federation.components:
                assert component.process.poll() is None, f"{component.name} exited"

        def finished():
            state = driver.execute_script(PAGE)
            done = (state["kernel"] == "idle" and all(re.fullmatch(r"\[\d+\]:", c["prompt"]) for c in state["cells"])
                    and len(state["cells"][tags.index("plots")]["images"]) == 2)
            return state if done and _kernel_idle(lab) else None

        state = _wait("Run All to finish", finished, clicked + RUN_S, also=no_failure)
        state["seconds"] = {"open": clicked - started, "run": time.monotonic() - clicked}
        bars = driver.execute_script("return window.medflBars")  # cell index: the most progress widgets it showed
        for i, cell in enumerate(state["cells"]):
            cell["bars_while_running"] = bars.get(str(i), 0)
        state["tags"] = dict(zip(tags, state["cells"], strict=True))
        _screenshots(driver, tags)
        return state


@contextlib.contextmanager
def screenshot_on_failure(driver):
    """Keep what the page showed when the block failed, as runs/browser-test/failure.png."""
    try:
        yield
    except BaseException:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):
            driver.save_screenshot(str(SCREENSHOTS / "failure.png"))
        raise


def _screenshots(driver, tags) -> None:
    """The top of the notebook, the progress of the training, the test table and the plots, for a person to look at."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    cells = driver.execute_script("return [...document.querySelectorAll('.jp-Notebook .jp-CodeCell')]")
    driver.execute_script("document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer').scrollTop = 0")
    driver.save_screenshot(str(SCREENSHOTS / "1-top.png"))
    for name, tag in (("2-progress", "follow"), ("3-test", "results"), ("4-plots", "plots")):
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", cells[tags.index(tag)])
        driver.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def test_every_code_cell_ran_without_an_error(page):
    assert not page["errors"], page["errors"]
    assert [c["prompt"] for c in page["cells"]] == [f"[{i}]:" for i in range(1, len(page["cells"]) + 1)]
    print(f"opened in {page['seconds']['open']:.0f} s; Run All took {page['seconds']['run']:.0f} s")


def test_progress_lines_and_the_final_line_are_visible(page):
    follow = page["tags"]["follow"]["text"]
    for line in (r"round 1/2\s+envoy_1\s+train\s+train_loss", r"round 2/2\s+envoy_2\s+local val\s+loss",
                 r"model after 2/2\s+aggregator\s+global val\s+loss", r"best model: "):
        assert re.search(line, follow), f"{line!r} not shown under the follow cell:\n{follow}"
    assert re.search(r"test\s+aggregator\s+global val\s+loss", page["tags"]["test"]["text"])
    assert RESULT_LINE in page["tags"]["results"]["text"]
    # the test table: each envoy and pooled, every score with its 95 % interval
    assert re.search(r"pooled\s+60\s+0\.\d{4} \(95 % CI 0\.\d{4}-0\.\d{4}\)", page["tags"]["results"]["text"])
    assert "no model to evaluate" in page["tags"]["evaluate"]["text"]  # section 9 without evaluate_model


def test_progress_bars_are_widgets_while_running_and_their_last_state_stays_as_text(page):
    # tqdm.auto draws an ipywidgets bar in JupyterLab; without the widget manager it would print text instead.
    assert page["tags"]["follow"]["bars_while_running"] == 1 and page["tags"]["test"]["bars_while_running"] == 1
    # Once the run ends the widget becomes its last line as text, which a saved notebook keeps.
    assert page["tags"]["follow"]["bars"] == 0 and page["tags"]["test"]["bars"] == 0
    done = rf"global models validated: 100%\|█+\| {ROUNDS + 1}/{ROUNDS + 1} \["
    assert re.search(done, page["tags"]["follow"]["text"]), page["tags"]["follow"]["text"][:200]
    assert not any("HBox(" in c["text"] or "FloatProgress(" in c["text"] for c in page["cells"])


def test_the_sample_grid_and_both_plots_rendered(page):
    for tag, count in (("preview", 1), ("plots", 2)):
        images = page["tags"][tag]["images"]
        assert len(images) == count and all(w > 0 and h > 0 and shown > 0 for w, h, shown in images), (tag, images)


def test_the_page_is_not_flooded_and_openfls_log_went_to_the_run_folder(page, lab):
    assert page["outputs"] <= MAX_OUTPUT_BLOCKS, f"{page['outputs']} output blocks (a log flood?)"
    assert not page["stderr"], "stderr boxes on the page:\n" + "\n".join(page["stderr"])
    assert not page["wide"], f"outputs wider than the page: {page['wide']}"
    log = lab["dir"].parent / "runs" / "browser-test" / "logs" / "openfl.log"
    assert "openfl.interface.interactive_api.experiment: Experiment was submitted" in log.read_text()


def test_the_file_browser_shows_no_openfl_leftovers(page, driver, lab):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, ".jp-FileBrowser [data-command='filebrowser:refresh']").click()
    expected = sorted(["medfl", NOTEBOOK])

    def listing():
        names = sorted(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".jp-DirListing-itemText"))
        return names if names == expected else None

    names = sorted(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".jp-DirListing-itemText"))
    assert _wait(f"the file browser to list {expected} (it lists {names})", listing, time.monotonic() + 15)
    on_disk = sorted(p.name for p in lab["dir"].iterdir() if not p.name.startswith("."))
    assert on_disk == expected, "OpenFL left files in the notebook's folder"


def test_ctrl_s_saves_the_outputs_and_the_repository_notebooks_stay_untouched(page, driver, lab,
                                                                               repository_notebooks):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    saved = lab["dir"] / NOTEBOOK
    unsaved = saved.stat().st_mtime_ns
    driver.find_element(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell").click()  # focus the notebook, not the browser
    ActionChains(driver).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
    _wait("Ctrl+S to write the notebook", lambda: saved.stat().st_mtime_ns != unsaved, time.monotonic() + 15)
    cells = {(c["metadata"].get("tags") or [""])[0]: c for c in json.loads(saved.read_text())["cells"]
             if c["cell_type"] == "code"}
    assert all(c["execution_count"] for c in cells.values())
    assert RESULT_LINE in "".join("".join(o.get("text", "")) for o in cells["results"]["outputs"])
    bar = "".join("".join(o.get("data", {}).get("text/plain", "")) for o in cells["follow"]["outputs"])
    assert "global models validated: 100%" in bar and f"{ROUNDS + 1}/{ROUNDS + 1}" in bar
    assert [o["output_type"] for o in cells["plots"]["outputs"]] == ["display_data"] * 2
    assert fingerprints() == repository_notebooks
    for path in REPO_NOTEBOOKS:
        assert all(not c.get("outputs") for c in json.loads(path.read_text())["cells"]), path.name
