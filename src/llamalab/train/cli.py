"""Training sub-commands for ``llamalab``: ``plot`` now; ``train`` joins when the loop lands.

Wire into :func:`llamalab.cli.build_parser` with ``add_plot_parser(sub)``; the parser sets
``func=cmd_plot``. A run without metrics is a ``FileNotFoundError`` (an ``OSError``), printed
as one line by the CLI.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_plot_parser", "cmd_plot"]

PLOT_EPILOG = """\
example:
  llamalab plot runs/tiny                 # writes runs/tiny/plots/loss.png and lr.png
  llamalab plot runs/tiny --out /tmp/plots
"""


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot a run's loss and learning-rate curves from its metrics.jsonl."""
    from llamalab.train.metrics import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def add_plot_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plot`` sub-command to ``subparsers`` (from ``parser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "plot", help="plot a training run's loss and learning-rate curves",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PLOT_EPILOG,
        description="Read RUN_DIR/metrics.jsonl and draw loss.png (train and validation loss) and lr.png "
                    "(needs matplotlib).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory (holds metrics.jsonl)")
    p.add_argument("--out", metavar="DIR", default=None, help="where to write the PNGs (default: RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)
    return p


if __name__ == "__main__":  # python -m llamalab.train.cli plot RUN_DIR
    parser = argparse.ArgumentParser(prog="llamalab")
    add_plot_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
