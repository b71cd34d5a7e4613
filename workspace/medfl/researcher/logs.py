"""Where OpenFL's log goes from the notebook: to a file beside the run's results, so the page shows the run."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _for_the_page(record: logging.LogRecord) -> bool:
    # OpenFL warns in healthy runs (e.g. of an optimizer state it never had); its errors still show.
    return record.levelno >= logging.ERROR or not record.name.startswith("openfl")


def log_to(path: str | Path, verbose: bool = False) -> None:
    """Send this process's log (OpenFL's, mostly) to `path`; show OpenFL's errors and others' warnings here, or
    everything with `verbose`.

    OpenFL logs every step at INFO through a rich console handler, which in JupyterLab is a wide block per line.
    Once the root logger has handlers, OpenFL's own logging set-up (basicConfig) leaves them alone.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "medfl", False)]:  # a cell run again
        root.removeHandler(handler)
        handler.close()
    to_file = logging.FileHandler(path)
    to_page = logging.StreamHandler(sys.stderr)
    to_page.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        to_page.addFilter(_for_the_page)
    for handler in (to_file, to_page):
        handler.medfl = True
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    print(f"OpenFL's log: {path}" + (" (also shown here)" if verbose else ""))
