"""python -m localfed {demo,baseline,bench,compare,stems,evaluate} [name=value ...]: what make demo, make baseline,
make bench, make compare, make stems and make evaluate run. Settings are the notebook's names (localfed.settings;
docs/settings.md)."""
from __future__ import annotations

import signal
import sys

import roots

roots.join("launcher")  # before the modules below import medfl and medmnist_shard from their roots

from medmnist_shard import DataError  # noqa: E402

from .federation import FederationError  # noqa: E402
from .run import RunError, check  # noqa: E402
from .settings import parse  # noqa: E402


def _interrupt(signum, frame):
    # SIGTERM (a CI runner, `kill`) stops the run as Ctrl-C does: every process we started ends. SIGINT is handled
    # explicitly too, as the nodes do: a launcher started as a script's background job inherits SIGINT ignored
    # (bash does that), and a Ctrl-C would otherwise leave the run going.
    raise KeyboardInterrupt


def main(argv=None) -> int:
    """Run a command; a failure prints one clear message (and the failing log) and exits non-zero."""
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _interrupt)
    try:
        settings = parse(sys.argv[1:] if argv is None else argv)
        if settings.command == "stems":
            from .stems import stems

            return stems(settings)
        check(settings)
        if settings.command == "demo":
            from .demo import demo

            return demo(settings)
        if settings.command == "bench":
            from .bench import bench

            return bench(settings)
        if settings.command == "evaluate":
            from .evaluate import evaluate

            return evaluate(settings)
        if settings.command == "compare":
            from .compare import compare

            return compare(settings)
        from .baseline import baseline

        return baseline(settings)
    except KeyboardInterrupt:
        print("\ninterrupted: stopped the director, the envoys and the notebook", file=sys.stderr)
        return 130
    except (DataError, FederationError, RunError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
