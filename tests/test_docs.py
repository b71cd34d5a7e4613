"""The README a newcomer finishes, and the documentation site beside it: short, true to the tree, and built
without a broken link."""
import os
import re
import subprocess
import sys

from conftest import ROOT

README = (ROOT / "README.md").read_text()


def _map_paths(text: str) -> list[str]:
    """The paths a file map (a code block of `path   what it is` lines) names."""
    block = text.split("```\n", 2)[1] if "```\n" in text else ""
    found = []
    indent_stack: list[tuple[int, str]] = []
    for line in block.splitlines():
        if not line.strip() or line.startswith(" " * 20):  # a continuation of the description
            continue
        indent = len(line) - len(line.lstrip())
        name = line.split()[0].rstrip(",")
        while indent_stack and indent_stack[-1][0] >= indent:
            indent_stack.pop()
        parent = indent_stack[-1][1] if indent_stack else ""
        path = parent + name
        if name.endswith("/"):
            indent_stack.append((indent, path))
        found.append(path)
        if "," in line.split("  ")[0]:  # "Makefile, .ci/run": two paths on one line
            found += [p.strip() for p in line.split("  ")[0].split(",")[1:]]
    return found


def test_the_readme_is_short_and_its_file_map_is_true():
    assert len(README.splitlines()) <= 150
    section = README.split("## What is where", 1)[1]
    paths = _map_paths(section)
    assert len(paths) >= 10
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the README's file map names {missing}, which do not exist"


def test_the_detailed_file_map_is_true():
    paths = _map_paths((ROOT / "docs" / "files.md").read_text())
    assert len(paths) >= 60
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"docs/files.md names {missing}, which do not exist"
    modules = {p.name for folder in ("openfl_adjustments", "security", "localfed")
               for p in (ROOT / folder).glob("*.py")}
    named = {p.rsplit("/", 1)[-1] for p in paths}
    assert modules - {"__main__.py"} <= named, f"docs/files.md leaves out {sorted(modules - named - {'__main__.py'})}"


def test_every_link_in_the_readme_leads_somewhere():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target


def test_the_docs_build_with_no_broken_link_and_no_page_left_out(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about a release this pin never takes
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} >= pages - {"index"}
