"""`llamalab --help` and every `llamalab X --help` answer without importing torch or numpy.

Importing torch costs seconds, so the sub-commands' parsers must live in modules that import
nothing heavy at module level; the commands import what they need when they run. The check runs
in a fresh interpreter: this test process has imported torch long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Libraries that must not be imported for --help: torch and numpy, and the large ones that
# import them (a command imports these only when it runs).
HEAVY = ("torch", "numpy", "transformers", "datatrove", "fastapi", "uvicorn", "datasets", "matplotlib")

# Runs in the fresh interpreter: walks the parser's sub-commands (so that a new command is covered
# without editing this test), runs `main([*words, "--help"])` for each and records, per command,
# the heavy libraries that were in sys.modules afterwards.
PROBE = """
import argparse, contextlib, io, json, sys

from llamalab.cli import build_parser, main

heavy = {heavy!r}


def walk(parser, words):
    yield words
    for action in parser._actions:  # argparse has no public way to list sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, [*words, name])


report = {{}}
for words in walk(build_parser(), []):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*words, "--help"])
        except SystemExit as e:
            code = e.code
        else:
            code = None
    report[" ".join(["llamalab", *words])] = {{"code": code, "help": len(out.getvalue()),
                               "heavy": sorted(m for m in heavy if m in sys.modules)}}
print(json.dumps(report))
"""


def _help_report() -> dict[str, dict]:
    """Per command ("llamalab data run"): its --help's exit code, help length and the heavy modules loaded."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY)], capture_output=True, text=True,
                          timeout=120, env=env, check=True)
    return json.loads(proc.stdout)


def test_help_imports_no_heavy_library() -> None:
    report = _help_report()
    # The walk must have reached the nested actions too, or the check below proves little.
    for command in ["llamalab", "llamalab generate", "llamalab serve", "llamalab tokenize", "llamalab data run",
                    "llamalab pretrain", "llamalab eval perplexity", "llamalab info", "llamalab tokenizer train"]:
        assert command in report, f"`{command}` missing from the parser walk: {sorted(report)}"
    for command, result in report.items():
        assert result["code"] == 0 and result["help"] > 0, f"`{command} --help`: {result}"
        assert not result["heavy"], f"`{command} --help` imported {', '.join(result['heavy'])}"
