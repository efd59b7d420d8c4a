"""`llamalab scaling`: Llama 3's IsoFLOPs method (§3.2.1).

The fitter is checked against data drawn from known laws (the truth is the generating
parameters, not our earlier output): parabola minima computed by hand, power-law parameters
inside their reported intervals, the intervals' coverage over many seeds, the sigmoid's
parameters recovered. The sweep is checked end to end on a tiny corpus: each run's token count
against FLOPs per token counted from a built model's parameters, and a rerun that trains nothing.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llamalab.cli import main
from llamalab.config import get_preset
from llamalab.data import tokenize_files
from llamalab.model import Transformer
from llamalab.scaling import ScalingError
from llamalab.scaling.cli import parse_budgets
from llamalab.scaling.fit import fit_isoflops, fit_parabola, fit_power_law, fit_sigmoid, fit_sweep, sigmoid
from llamalab.scaling.sizes import parse_sizes
from llamalab.tokenizer import train_sentencepiece
from llamalab.train.metrics import read_metrics

# ---------------------------------------------------------------- synthetic IsoFLOPs data


def _synthetic_runs(budgets: np.ndarray, A: float, alpha: float, seed: int, noise: float = 0.004,
                    offsets: tuple[float, ...] = (-0.6, -0.3, 0.0, 0.3, 0.6)) -> list[dict]:
    """Per budget, losses on a parabola in log10 tokens whose vertex is tokens* = A C^alpha, plus
    seeded Gaussian noise; the sizes sit at ``offsets`` (in log10 tokens) around the vertex, shifted
    by a seeded jitter so the vertex is not always a sampled point."""
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        centre = math.log10(A * c ** alpha) + rng.uniform(-0.15, 0.15)
        true_opt = math.log10(A * c ** alpha)
        for k, off in enumerate(offsets):
            x = centre + off
            loss = 3.0 - 0.05 * math.log10(c) + 0.4 * (x - true_opt) ** 2 + rng.normal(0, noise)
            runs.append({"budget": float(c), "size": f"s{k}", "tokens": 10 ** x, "params": c / (6 * 10 ** x),
                         "val_loss": loss})
    return runs


def test_parabola_minimum_by_hand() -> None:
    # y = x^2 - 4x + 5 through (0, 5), (1, 2), (3, 2): vertex at x = 4 / 2 = 2, y = 5 - 16 / 4 = 1.
    p = fit_parabola([0.0, 1.0, 3.0], [5.0, 2.0, 2.0])
    assert (p.a, p.b, p.c) == pytest.approx((1.0, -4.0, 5.0))
    assert (p.x_min, p.y_min) == pytest.approx((2.0, 1.0))
    # Least squares over 4 points symmetric about x = 1 (u = x - 1 = -2, -1, 1, 2) of y = 2 u^2 + 3 + d,
    # d = +0.1 at |u| = 2 and -0.1 at |u| = 1. By symmetry b = 0 in u; d is exactly linear in u^2
    # (0.2/3 (u^2 - 1) - 0.1), so a = 2 + 1/15, the vertex is at u = 0 (x = 1), y = 3 - 1/6.
    xs = [-1.0, 0.0, 2.0, 3.0]
    ys = [2 * (x - 1) ** 2 + 3 + d for x, d in zip(xs, [0.1, -0.1, -0.1, 0.1])]
    p = fit_parabola(xs, ys)
    assert p.a == pytest.approx(2 + 1 / 15)
    assert (p.x_min, p.y_min) == pytest.approx((1.0, 3 - 1 / 6))


def test_parabola_errors() -> None:
    with pytest.raises(ScalingError, match="at least 3"):
        fit_parabola([1.0, 2.0], [3.0, 2.0], where="budget 1e12")
    with pytest.raises(ScalingError, match="at least 3"):
        fit_parabola([1.0, 1.0, 2.0], [3.0, 2.9, 2.0])  # two distinct sizes only
    with pytest.raises(ScalingError, match="opens downwards"):
        fit_parabola([0.0, 1.0, 2.0], [1.0, 2.0, 1.0])
    with pytest.raises(ScalingError, match="opens downwards"):
        fit_parabola([0.0, 1.0, 2.0], [1.0, 2.0, 3.0])  # a straight line: no minimum either


def test_power_law_recovers_the_generating_law_within_its_interval() -> None:
    # At 99% so that a seed's bad luck (1 in 20 at 95%) does not decide; the 95% level's coverage
    # is the next test's.
    A, alpha = 0.4, 0.6
    widths = {}
    for n in (3, 8):
        budgets = np.logspace(14, 18, n)
        iso = fit_isoflops(_synthetic_runs(budgets, A, alpha, seed=n))
        law = fit_power_law(budgets, [f.tokens_opt for f in iso], confidence=0.99)
        assert law.n == n and law.dof == n - 2
        assert law.ci_alpha[0] <= alpha <= law.ci_alpha[1], (n, law)
        assert law.ci_A[0] <= A <= law.ci_A[1], (n, law)
        assert law.ci_A[0] < law.A < law.ci_A[1]
        widths[n] = (law.ci_alpha[1] - law.ci_alpha[0], math.log(law.ci_A[1] / law.ci_A[0]))
    assert widths[8][0] < widths[3][0] and widths[8][1] < widths[3][1], widths


def test_power_law_interval_covers_the_truth_95_percent_of_the_time() -> None:
    # 400 seeded data sets of 3 points (1 degree of freedom) with Gaussian noise in log space: a
    # t-based 95% interval covers the true exponent ~95% of the time (binomial sd ~1.1%); a normal
    # (z) interval would cover ~70%.
    alpha, A = 0.53, 0.29
    x = np.logspace(12, 16, 3)
    hits = 0
    rng = np.random.default_rng(0)
    for _ in range(400):
        y = A * x ** alpha * 10 ** rng.normal(0, 0.05, size=3)
        law = fit_power_law(x, y)
        hits += law.ci_alpha[0] <= alpha <= law.ci_alpha[1]
    assert 0.92 <= hits / 400 <= 0.98, hits


def test_power_law_needs_two_budgets_and_has_no_interval_with_two() -> None:
    with pytest.raises(ScalingError, match="at least 2"):
        fit_power_law([1e12], [1e6])
    with pytest.raises(ScalingError, match="at least 2"):
        fit_power_law([1e12, 1e12], [1e6, 2e6])
    law = fit_power_law([1e12, 1e14], [1e6, 1e7])
    assert law.alpha == pytest.approx(0.5) and law.A == pytest.approx(1e6 / 1e6)
    assert law.ci_alpha is None and law.ci_A is None and law.dof == 0


def test_sigmoid_recovers_known_parameters() -> None:
    truth = {"floor": 0.25, "ceiling": 0.85, "slope": 6.0, "mid": 1.3}
    rng = np.random.default_rng(3)
    nll = np.linspace(0.6, 2.0, 40)
    acc = sigmoid(nll, **truth) + rng.normal(0, 0.01, size=nll.size)
    fit = fit_sigmoid(nll, acc)
    for key, tol in (("floor", 0.03), ("ceiling", 0.03), ("slope", 1.0), ("mid", 0.03)):
        assert getattr(fit, key) == pytest.approx(truth[key], abs=tol), (key, fit)
        assert abs(getattr(fit, key) - truth[key]) < 4 * fit.se[key], (key, fit)
    assert fit.rmse < 0.015 and not fit.notes
    # Accuracies that differ by binomial noise alone (p = 0.25, 200 questions: se 0.031) are said to.
    flat = 0.25 + rng.normal(0, 0.02, size=15)
    noisy = fit_sigmoid(np.linspace(2.3, 2.7, 15), flat, n_questions=200)
    assert any("sampling noise only" in n for n in noisy.notes), noisy.notes
    with pytest.raises(ScalingError, match="at least 5"):
        fit_sigmoid([1.0, 1.1, 1.2, 1.3], [0.3, 0.3, 0.3, 0.3])


def test_fit_sweep_reports_extrapolated_minima_and_three_budget_intervals() -> None:
    budgets = np.logspace(14, 18, 3)
    runs = _synthetic_runs(budgets, 0.4, 0.6, seed=1, offsets=(0.2, 0.4, 0.6))  # every size above the optimum
    doc = fit_sweep(runs)
    assert all(f["extrapolated"] for f in doc["isoflops"])
    assert any("outside the sizes tried" in n for n in doc["notes"])
    assert any("1 degree of freedom" in n for n in doc["notes"])
    assert doc["paper"] == {"alpha": 0.53, "A": 0.29, "source": doc["paper"]["source"]}


def test_budgets_and_sizes_parsing() -> None:
    assert parse_budgets("1e12, 3e12,1e13") == [1e12, 3e12, 1e13]
    for bad, msg in (("1e12,x", "not a number"), ("-1", "positive"), ("1e12,1e12", "twice"), ("", "empty")):
        with pytest.raises(ScalingError, match=msg):
            parse_budgets(bad)
    shapes = parse_sizes("64x2,96x3x2")
    assert [(s.dim, s.n_layers, s.n_heads) for s in shapes] == [(64, 2, 2), (96, 3, 2)]
    for bad, msg in (("64", "DIMxLAYERS"), ("64x2,64x2", "twice"), ("64x2x3", "even width")):
        with pytest.raises(ScalingError, match=msg):
            parse_sizes(bad)


# ---------------------------------------------------------------- CLI errors on bad sweep files


def _write_sweep(path: Path, runs: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "sweep.json").write_text(json.dumps({"version": 1, "runs": [dict(r, status="done") for r in runs]}))
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and err.startswith("llamalab scaling: error: "), err
    return err


def test_fit_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = _synthetic_runs(np.array([1e14, 1e15]), 0.4, 0.6, seed=0)
    one_budget = _write_sweep(tmp_path / "one", [r for r in runs if r["budget"] == 1e14])
    assert "at least 2" in _one_line_error(capsys, ["scaling", "fit", str(one_budget)])
    two_sizes = _write_sweep(tmp_path / "two", [r for r in runs if r["size"] in ("s0", "s1")])
    err = _one_line_error(capsys, ["scaling", "fit", str(two_sizes)])
    assert "budget 1e+14" in err and "at least 3" in err
    down = [dict(r, val_loss=5.0 - (math.log10(r["tokens"]) - 8) ** 2) for r in runs]
    err = _one_line_error(capsys, ["scaling", "fit", str(_write_sweep(tmp_path / "down", down))])
    assert "opens downwards" in err
    bad = _write_sweep(tmp_path / "bad", [dict(runs[0], val_loss=None)])
    err = _one_line_error(capsys, ["scaling", "fit", str(bad)])
    assert "runs[0].val_loss: expected a positive number, got None" in err and "sweep.json" in err
    assert "no sweep.json there" in _one_line_error(capsys, ["scaling", "fit", str(tmp_path)])
    (tmp_path / "junk.json").write_text("{not json")
    assert "not valid JSON" in _one_line_error(capsys, ["scaling", "fit", str(tmp_path / "junk.json")])


def test_sweep_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["scaling", "sweep", "--out", str(tmp_path / "s"), "--dry-run", "--config", str(tmp_path / "x.toml")]
    assert "not a number" in _one_line_error(capsys, [*argv, "--budgets", "1e12,lots"])
    assert "DIMxLAYERS" in _one_line_error(capsys, [*argv, "--budgets", "1e12", "--sizes", "big"])
    assert "no such file" in _one_line_error(capsys, [*argv, "--budgets", "1e12"])
    no_out = ["scaling", "sweep", "--config", str(tmp_path / "x.toml"), "--budgets", "1e12"]
    assert "--out DIR" in _one_line_error(capsys, no_out)
    assert "no such file" in _one_line_error(capsys, [*no_out, "--dry-run"])  # planned without --out


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for words in (["scaling"], ["scaling", "sweep"], ["scaling", "fit"]):
        with pytest.raises(SystemExit):
            main([*words, "--help"])
        assert "\nexamples:\n  llamalab scaling " in capsys.readouterr().out


# ---------------------------------------------------------------- a tiny sweep end to end

NAMES = ["the king", "a queen", "my lord", "the fool", "sweet lady", "good sir", "the ghost", "a soldier"]
VERBS = ["speaks to", "loves", "betrays", "follows", "greets", "mocks", "fears", "serves"]
OBJECTS = ["the crown", "his daughter", "her brother", "the people", "a stranger", "the prince", "my heart"]


def _document(rng: random.Random, lines: int) -> str:
    return "\n".join(f"{rng.choice(NAMES).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
                     for _ in range(lines))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320-piece SentencePiece tokenizer and train/val shards of a small synthetic corpus, and a run file."""
    root = tmp_path_factory.mktemp("scaling-data")
    rng = random.Random(0)
    (root / "train.jsonl").write_text("".join(json.dumps({"text": _document(rng, 20)}) + "\n" for _ in range(300)))
    (root / "val.jsonl").write_text("".join(json.dumps({"text": _document(rng, 20)}) + "\n" for _ in range(10)))
    tok = train_sentencepiece([root / "train.jsonl"], root / "tok" / "tok", vocab_size=320)
    tokenize_files([root / "train.jsonl"], tok, root / "tokens" / "train", progress=False)
    tokenize_files([root / "val.jsonl"], tok, root / "tokens" / "val", progress=False)
    (root / "run.toml").write_text(f"""
run_dir = "unused"
seed = 1
[model]
preset = "tiny"
overrides = {{ vocab_size = 320, max_seq_len = 64 }}
[data]
val_shards = "{root / 'tokens' / 'val'}"
[data.sources.train]
shards = "{root / 'tokens' / 'train'}"
[train]
global_batch_tokens = 256
seq_len = 32
micro_batch_size = 8
precision = "fp32"
[optim]
lr = 1e-2
warmup_steps = 5
[eval]
batches = 4
[checkpoint]
every = 0
""")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> object:
    """One torch thread: tiny models gain nothing from two, and the runs compute alike every time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BUDGETS = "2e9,4e9,8e9"
SIZES = "8x1x1,32x1x2,64x2x2"


def _flops_per_token_of_built_model(dim: int, layers: int, heads: int, seq_len: int) -> float:
    """PaLM's 6 N + 12 L d T, N counted from a built Transformer: every parameter but the input embedding."""
    model = Transformer(get_preset("tiny", vocab_size=320, max_seq_len=64, dim=dim, n_layers=layers, n_heads=heads,
                                   n_kv_heads=heads))
    n = sum(p.numel() for p in model.parameters()) - model.tok_embeddings.weight.numel()
    return 6.0 * n + 12.0 * layers * dim * seq_len


def test_sweep_then_fit_end_to_end(corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    argv = ["scaling", "sweep", "--config", str(corpus / "run.toml"), "--budgets", BUDGETS, "--sizes", SIZES,
            "--out", str(out), "--task", "arc_challenge", "--task-limit", "5"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len([x for x in lines if x.startswith("[")]) == 9, lines  # one line per run
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["budgets"] == [2e9, 4e9, 8e9] and [s["name"] for s in doc["sizes"]] == SIZES.split(",")
    assert len(doc["runs"]) == 9 and all(r["status"] == "done" for r in doc["runs"])
    for r in doc["runs"]:
        shape = r["shape"]
        fpt = _flops_per_token_of_built_model(shape["dim"], shape["n_layers"], shape["n_heads"], 32)
        assert r["flops_per_token"] == pytest.approx(fpt)
        trained = read_metrics(out / r["run_dir"])[-1]["tokens_seen"]  # the trainer's own count
        assert abs(trained - r["budget"] / fpt) <= 256, (r["run_dir"], trained, r["budget"] / fpt)
        assert r["tokens"] == trained and math.isfinite(r["val_loss"])
        assert 0 < r["nll"] and 0 <= r["acc"] <= 1 and r["n"] == 5 and 0.2 <= r["chance"] <= 1 / 3
        assert (out / r["run_dir"] / "final").is_dir()

    # Rerun: everything is done, nothing is trained (the runs' metrics are untouched).
    before = {r["run_dir"]: (out / r["run_dir"] / "metrics.jsonl").read_bytes() for r in doc["runs"]}
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("skipped" in x for x in lines) == 9, lines
    assert all((out / d / "metrics.jsonl").read_bytes() == b for d, b in before.items())

    # An interrupted run (marked running, no final model yet) is the only one the next sweep touches.
    doc["runs"][4]["status"] = "running"
    (out / "sweep.json").write_text(json.dumps(doc))
    import shutil

    shutil.rmtree(out / doc["runs"][4]["run_dir"] / "final")
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum("skipped" in x for x in lines) == 8 and (out / doc["runs"][4]["run_dir"] / "final").is_dir()

    # Another run file under the same --out is refused rather than mixed in.
    err = _one_line_error(capsys, [*argv, "optim.lr=3e-3"])
    assert "trained with other settings" in err

    fit_dir = tmp_path / "fit"
    assert main(["scaling", "fit", str(out), "--out", str(fit_dir)]) == 0
    table = capsys.readouterr().out
    assert "tokens*(C) = A * C^alpha" in table and "Llama 3's fit" in table
    fit = json.loads((fit_dir / "fit.json").read_text())
    assert [f["budget"] for f in fit["isoflops"]] == [2e9, 4e9, 8e9]
    assert fit["tokens_power_law"]["dof"] == 1 and fit["downstream"]["n_runs"] == 9
    for name in ("scaling-isoflops.png", "scaling-power-law.png", "scaling-nll-accuracy.png"):
        assert (fit_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
