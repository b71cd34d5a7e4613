"""One name per setting and one home per default: the launcher's table, the notebook, the configs, the scripts
and docs/settings.md agree."""
import re

import yaml

from conftest import ROOT
from localfed.settings import ALIASES, LAUNCHER, TABLE
from medfl.algorithms import OPTIONS as ALGORITHM_OPTIONS
from medfl.privacy import OPTIONS as DP_OPTIONS
from medfl.researcher import DEFAULTS, RUN


def _documented(section: int = 0) -> dict[str, str]:
    """The rows of the page's first table (section 0), or of its table of the run's connection (1)."""
    page = (ROOT / "docs" / "settings.md").read_text().split("## The run's connection")
    rows = {}
    for line in page[section].splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) > 3 and re.fullmatch(r"`[a-z0-9_]+`", cells[1]):
            rows[cells[1].strip("`")] = cells[2].strip("`")
    return rows


def test_the_settings_page_lists_every_setting_with_its_default():
    documented = _documented()
    assert list(documented) == list(TABLE)  # every one, in the table's order, none else
    for name, (default, _) in TABLE.items():
        if name in ("notebook", "runs"):  # paths: shown relative to the repository
            assert documented[name].rstrip("/") == default.replace(str(ROOT) + "/", ""), name
        elif default in ("", None) and name != "server_learning_rate":
            assert documented[name] == "", name
        else:
            assert documented[name] == str(default), name


def test_the_settings_page_lists_the_rest_of_the_run_dict_and_every_alias():
    documented = _documented(1)
    assert list(documented) == [name for name in RUN if name not in TABLE]
    for name, default in documented.items():
        assert default == ("" if RUN[name] in ("", None) else str(RUN[name])), name
    others = (ROOT / "docs" / "settings.md").read_text().split("## Other names", 1)[1]
    for alias, name in ALIASES.items():
        assert f"`{alias}` is `{name}`" in others, alias


def test_each_default_has_one_home_and_the_rest_read_it():
    # The table is built from the homes, not restated.
    for name, (default, home) in TABLE.items():
        source = {None: DEFAULTS, "algorithm_options": ALGORITHM_OPTIONS, "dp_options": DP_OPTIONS, "run": RUN,
                  "launcher": LAUNCHER}[home]
        assert source[name] == default, name
    assert set(ALIASES.values()) <= set(TABLE)
    # The shipped configs and start scripts stand for the same defaults.
    for path in sorted((ROOT / "envoy").glob("envoy_config_*.yaml")):
        params = yaml.safe_load(path.read_text())["shard_descriptor"]["params"]
        assert (params["flag"], params["size"], params["seed"]) == (DEFAULTS["dataset"], DEFAULTS["size"],
                                                                    DEFAULTS["seed"]), path.name
    director = yaml.safe_load((ROOT / "director" / "director_config.yaml").read_text())["settings"]
    assert director["listen_port"] == RUN["director_port"]
    assert f'${{DIRECTOR_PORT:-{RUN["director_port"]}}}' in (ROOT / "envoy" / "start_envoy.sh").read_text()
    # The Makefile passes settings through and holds none of their defaults.
    makefile = (ROOT / "Makefile").read_text()
    for name in TABLE:
        assert not re.search(rf"^{name.upper()}\s*\??=|^{name}\s*\??=", makefile, re.MULTILINE) or name == "envoys", \
            name
