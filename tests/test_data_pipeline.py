"""The data-pipeline engine: config checks, local runs with rejects and a report, resume after a
failed task and after SIGKILL, the CLI, Slurm stages (the Ray run is in test_data_pipeline_ray.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from processes import kill_process_group

from llamalab.data.pipeline.commoncrawl import MinLengthFilter
from llamalab.data.pipeline.config import config_from_dict, load_config
from llamalab.data.pipeline.engine import run_config
from llamalab.data.pipeline.report import collect_report, format_report

EN = ("The river runs through the old town and past the market square. Children walk to school along the river "
      "every morning. The market opens early and closes when the sun goes down. ")


TOPICS = ["apples", "bridges", "castles", "dancing", "engines", "forests", "gardens", "harbours", "islands",
          "journeys", "kitchens", "lanterns", "mountains", "novels", "orchards", "painters"]


def _inputs(root: Path, files: int = 3, per_file: int = 4) -> Path:
    """JSONL pages: unique English pages, one page repeated in every file, and a malformed line per file."""
    d = root / "in"
    d.mkdir()
    for f in range(files):
        # CCNet's line dedup maps digits to 0: pages differ by words
        lines = [json.dumps({"text": f"A page about {TOPICS[f * per_file + i]}. {EN * 2}\nOnly this page talks "
                                     f"about {TOPICS[f * per_file + i]}.", "id": f"{f}-{i}"}) for i in range(per_file)]
        lines.append(json.dumps({"text": f"The same page everywhere. {EN * 2}", "id": f"dup{f}"}))
        lines.append("{not json")
        lines.append(json.dumps({"id": "no-text"}))
        (d / f"cc{f}.jsonl").write_text("\n".join(lines) + "\n")
    return d


def _config(root: Path, run: str, **executor) -> dict:
    return {"name": "t", "run_dir": str(root / run), "executor": {"tasks": 2, "workers": 1, **executor},
            "sources": {"web": {"type": "commoncrawl", "inputs": [str(root / "in")],
                                "options": {"perplexity": False, "classifier": False}}}}


def _outputs(run_dir: Path) -> dict[str, str]:
    return {p.relative_to(run_dir).as_posix(): p.read_text() for p in sorted(run_dir.glob("web/output/*.jsonl"))}


def _docs(run_dir: Path) -> list[dict]:
    return [json.loads(line) for text in _outputs(run_dir).values() for line in text.splitlines()]


def test_config_errors_name_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('run_dir = "x"\n[sources.web]\ntype = "commoncrawl"\ninputs = ["a"]\nthreshold = 3\n')
    with pytest.raises(ValueError, match=r"bad.toml: unknown key sources.web.threshold"):
        load_config(path)
    path.write_text('run_dir = "x"\n[executor]\ntasks = "many"\n[sources.web]\ntype = "commoncrawl"\ninputs = "a"\n')
    with pytest.raises(ValueError, match=r"bad.toml: executor.tasks = 'many': expected int"):
        load_config(path)
    with pytest.raises(ValueError, match=r"sources.web.type = 'webpages'"):
        config_from_dict({"run_dir": "x", "sources": {"web": {"type": "webpages", "inputs": "a"}}}, "c.toml")
    with pytest.raises(ValueError, match=r"mixture.weights.books: no source named 'books'"):
        config_from_dict({"run_dir": "x", "sources": {"web": {"type": "commoncrawl", "inputs": "a"}},
                          "mixture": {"weights": {"books": 1}}}, "c.toml")
    cfg = config_from_dict({"run_dir": str(tmp_path), "sources": {"web": {"type": "commoncrawl", "inputs": "nope/*"}}})
    with pytest.raises(FileNotFoundError, match="sources.web: input 'nope/\\*' matches no file"):
        run_config(cfg, progress=False)
    cfg = config_from_dict({"run_dir": str(tmp_path), "sources": {"web": {
        "type": "commoncrawl", "inputs": str(tmp_path), "options": {"min_len": 3}}}}, "c.toml")
    with pytest.raises(ValueError, match="c.toml: sources.web: .*unknown option.*min_len"):
        run_config(cfg, progress=False)


def test_local_run_outputs_rejects_and_report(tmp_path):
    _inputs(tmp_path)
    cfg = config_from_dict(_config(tmp_path, "run"), "t.toml")
    run_config(cfg, progress=False)
    docs = _docs(tmp_path / "run")
    # 12 unique pages + the repeated page once; global dedup keeps the first copy (file cc0)
    assert sorted(d["id"] for d in docs) == sorted([f"{f}-{i}" for f in range(3) for i in range(4)] + ["dup0"])
    assert all(d["metadata"]["language"] == "en" for d in docs)
    rejects = tmp_path / "run" / "rejects" / "web"
    reader_rejects = [json.loads(line) for p in sorted((rejects / "reader").glob("*.jsonl"))
                      for line in p.read_text().splitlines()]
    assert sorted(r["metadata"]["filter_reason"] for r in reader_rejects) == ["malformed_json"] * 3 + ["no_text"] * 3
    # task 0 reads cc0 and cc2: its line dedup already empties dup2; dup1 (task 1) meets the global dedup
    line_dups = [json.loads(line) for line in (rejects / "line_dedup" / "00000.jsonl").read_text().splitlines()]
    assert [d["id"] for d in line_dups] == ["dup2"]
    dups = [json.loads(line) for line in (rejects / "global_exact_dedup" / "00000.jsonl").read_text().splitlines()]
    assert [d["id"] for d in dups] == ["dup1"]

    report = collect_report(tmp_path / "run")
    rows = {(r["stage"], r["step"].split(" ", 1)[1]): r for r in report["steps"]}
    reader = rows[("process", "CommonCrawl (WET/WARC/JSONL)")]
    assert (reader["out"], reader["reasons"]) == (15, {"malformed_json": 3, "no_text": 3})
    assert rows[("process", "CCNet line dedup")]["reasons"] == {"all_lines_duplicated": 1}
    assert rows[("dedup", "Exact dedup")]["in"] == 14
    assert (rows[("dedup", "Exact dedup")]["out"], rows[("dedup", "Exact dedup")]["reasons"]) == (
        13, {"exact_duplicate": 1})
    table = format_report(report)
    assert "| web | dedup | 🫂 Exact dedup | 14 | 13 | 1 | exact_duplicate 1 |" in table


def test_resume_after_a_failed_task_gives_the_same_output(tmp_path, monkeypatch):
    _inputs(tmp_path)
    run_config(config_from_dict(_config(tmp_path, "clean")), progress=False)

    original = MinLengthFilter.filter

    def failing(self, doc):
        if doc.id == "1-2":  # task 1 has written pages 1-0 and 1-1 when this fails
            raise RuntimeError("simulated crash")
        return original(self, doc)

    monkeypatch.setattr(MinLengthFilter, "filter", failing)
    cfg = config_from_dict(_config(tmp_path, "resumed"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_config(cfg, progress=False)
    logs = tmp_path / "resumed" / "logs" / "web" / "process"
    assert sorted(p.name for p in (logs / "completions").iterdir()) == ["00000"]
    assert "1-0" in (tmp_path / "resumed" / "web" / "processed" / "00001.jsonl").read_text()
    monkeypatch.setattr(MinLengthFilter, "filter", original)
    run_config(cfg, progress=False)
    assert sorted(p.name for p in (logs / "completions").iterdir()) == ["00000", "00001"]
    assert _outputs(tmp_path / "resumed") == _outputs(tmp_path / "clean")
    # the report counts every task once: the same figures as the uninterrupted run
    strip = lambda rep: [{k: v for k, v in r.items() if k != "other"} for r in rep["steps"]]  # noqa: E731
    assert strip(collect_report(tmp_path / "resumed")) == strip(collect_report(tmp_path / "clean"))


def _many_pages(root: Path, files: int = 4, per_file: int = 1000) -> None:
    """Enough English pages that one task takes a noticeable fraction of a second (~0.4 s on 2 cores)."""
    import random

    rng = random.Random(0)
    d = root / "in"
    d.mkdir()
    for f in range(files):
        pages = (" ".join(rng.choice(TOPICS) for _ in range(12)) + ". " + EN * 2 for _ in range(per_file))
        (d / f"cc{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in pages))


def test_resume_after_sigkill_gives_the_same_output(tmp_path):
    import os
    import subprocess
    import sys
    import time

    _many_pages(tmp_path)
    configs = {}
    for run in ("clean", "killed"):
        cfg = _config(tmp_path, run, tasks=4, workers=1, dedup_tasks=2)
        src = cfg["sources"]["web"]
        configs[run] = tmp_path / f"{run}.toml"
        configs[run].write_text(
            f'run_dir = "{cfg["run_dir"]}"\n[executor]\ntasks = 4\nworkers = 1\ndedup_tasks = 2\n'
            f'[sources.web]\ntype = "commoncrawl"\ninputs = ["{src["inputs"][0]}"]\n'
            f"[sources.web.options]\nperplexity = false\nclassifier = false\n")
    cmd = [sys.executable, "-m", "llamalab.cli", "data", "run"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    assert subprocess.run(cmd + [str(configs["clean"])], env=env, capture_output=True).returncode == 0

    completions = tmp_path / "killed" / "logs" / "web" / "process" / "completions"
    # its own session: the SIGKILL goes to the whole group, the run's multiprocessing manager
    # included (killing the CLI process alone left the manager running, orphaned)
    proc = subprocess.Popen(cmd + [str(configs["killed"])], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (completions.is_dir() and any(completions.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a task completed"
            time.sleep(0.002)
    finally:
        kill_process_group(proc)
    done = sorted(p.name for p in completions.iterdir())
    assert 1 <= len(done) < 4, done  # killed mid-way: some tasks finished, others not
    assert not (tmp_path / "killed" / "web" / "output").exists()

    rerun = subprocess.run(cmd + [str(configs["killed"])], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _outputs(tmp_path / "killed") == _outputs(tmp_path / "clean")
    assert len(_docs(tmp_path / "clean")) > 1000


def test_cli_errors_are_one_line_and_report_prints_the_table(tmp_path, capsys):
    from llamalab.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text('run_dir = "x"\n[sources.web]\ntype = "commoncrawl"\ninputs = ["a"]\nthreshold = 3\n')
    assert main(["data", "run", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key sources.web.threshold" in err
    assert main(["data", "report", str(tmp_path / "nowhere")]) == 2
    assert "no logs/ directory" in capsys.readouterr().err

    _inputs(tmp_path)
    cfg = _config(tmp_path, "run")
    good = tmp_path / "good.toml"
    good.write_text(f'run_dir = "{cfg["run_dir"]}"\n[executor]\ntasks = 2\nworkers = 1\n[sources.web]\n'
                    f'type = "commoncrawl"\ninputs = ["{tmp_path / "in"}"]\n[sources.web.options]\n'
                    f"perplexity = false\nclassifier = false\n")
    assert main(["data", "run", str(good)]) == 0
    out = capsys.readouterr().out
    assert "| web | dedup | 🫂 Exact dedup | 14 | 13 | 1 | exact_duplicate 1 |" in out
    assert main(["data", "report", cfg["run_dir"], "--json", str(tmp_path / "r.json")]) == 0
    assert capsys.readouterr().out.strip() == out.strip()
    assert json.loads((tmp_path / "r.json").read_text())["steps"][0]["source"] == "web"


def test_slurm_stages_are_dependent_job_arrays(tmp_path):
    from datatrove.executor.slurm import SlurmPipelineExecutor

    from llamalab.data.pipeline.engine import build_stages, make_executor

    _inputs(tmp_path)
    raw = _config(tmp_path, "slurm", kind="slurm", tasks=8)
    cfg = config_from_dict(raw, "s.toml")
    stage1, stage2 = build_stages(cfg, cfg.sources["web"])
    with pytest.raises(ValueError, match="s.toml: executor.slurm_partition is required"):
        make_executor(cfg, stage1)
    cfg.executor.slurm_partition = "cpu"
    first = make_executor(cfg, stage1)
    second = make_executor(cfg, stage2, depends=first)
    assert isinstance(second, SlurmPipelineExecutor) and second.depends is first
    assert (first.tasks, second.tasks, first.partition) == (8, 1, "cpu")
    assert second.pipeline[1].partitioned and second.job_name == "t-web-dedup"


def test_source_option_types_are_checked(tmp_path):
    _inputs(tmp_path)
    raw = _config(tmp_path, "run")
    raw["sources"]["web"]["options"]["min_length"] = "300"
    with pytest.raises(ValueError, match=r"t.toml: sources.web.options.min_length = '300': "
                                         r"expected int \(like the default 300\)"):
        run_config(config_from_dict(raw, "t.toml"), progress=False)
    raw["sources"]["web"]["options"].update(min_length=300.0, language_threshold=1, languages="en")
    with pytest.raises(ValueError, match=r"options.languages = 'en': expected list"):
        run_config(config_from_dict(raw, "t.toml"), progress=False)
