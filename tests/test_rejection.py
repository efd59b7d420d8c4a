"""Rejection-sampling fine-tuning (finetune/rejection.py): best-of-k by order statistics against
every subset, answer checks, prompt records, exact resume after a kill, selection across
iterations, the report by hand, and the whole command (sample, select, SFT, before/after)."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import _jsonl, base  # noqa: E402,F401  (the tiny checkpoint)

from llamalab.finetune.rejection import (  # noqa: E402
    SamplingPlan,
    answer_matches,
    best_of_k_curve,
    expected_best_of,
    parse_prompt_record,
    read_prompts,
    run_sampling,
    sample_seed,
    sampling_report,
    select_best,
)


def test_expected_best_of_equals_the_mean_over_every_subset() -> None:
    rng = random.Random(0)
    rewards = [rng.gauss(0, 1) for _ in range(7)] + [0.25, 0.25]  # ties too
    for k in range(1, len(rewards) + 1):
        subsets = list(itertools.combinations(rewards, k))
        want = sum(max(s) for s in subsets) / len(subsets)
        assert expected_best_of(rewards, k) == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert expected_best_of(rewards, 1) == pytest.approx(sum(rewards) / len(rewards))
    assert expected_best_of(rewards, len(rewards)) == max(rewards)
    assert best_of_k_curve([[1.0, 3.0], [0.0, 2.0]]) == [pytest.approx(1.5), pytest.approx(2.5)]
    with pytest.raises(ValueError, match="k=0"):
        expected_best_of(rewards, 0)


@pytest.mark.parametrize("text,answer,ok", [
    ("12 + 7 = 19", "19", True), ("The answer is 19. Or 20?", "19", True), ("It is 1,000.", "1000", True),
    ("19 is wrong, it is 18", "19", False), ("no number here", "3", False), ("-4", "-4", True),
    ("The capital is Paris.", "Paris", True), ("A Parisian answer", "Paris", False), ("", "Paris", False),
])
def test_answer_checks(text: str, answer: str, ok: bool) -> None:
    assert answer_matches(text, answer) is ok


def test_prompt_records_and_what_is_set_aside(tmp_path: Path) -> None:
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert parse_prompt_record({"prompt": "2+2?", "answer": 4, "id": 7, "tag": "safety"}) == (
        ({"role": "user", "content": "2+2?"},), "7", "safety", "4")
    # A conversation ending with the assistant gives its prompt; so does a preference pair.
    assert parse_prompt_record({"messages": conv})[0] == (conv[0],)
    assert parse_prompt_record({"prompt": "q", "chosen": "a", "rejected": "b"})[0] == ({"role": "user", "content": "q"},)
    path = _jsonl(tmp_path / "p.jsonl", [
        {"prompt": "fine"}, {"prompt": 3}, {"messages": [{"role": "system", "content": "s"}]}, {"prompt": "x", "answer": [1]},
        {"messages": [{"role": "user", "content": "again"}]}, {"prompt": "y" * 50}])
    prompts, summary = read_prompts([path], encode=lambda m: list(m[-1]["content"].encode()), max_len=20)
    assert [p.messages[-1]["content"] for p in prompts] == ["fine", "again"]
    assert [p.index for p in prompts] == [0, 1] and prompts[1].line == 5
    assert [(s.line, s.reason) for s in summary.set_aside] == [
        (2, "wrong type"), (3, "prompt does not end with a user turn"), (4, "wrong type"), (6, "over-long")]
    assert prompts[0].key != prompts[1].key and len(prompts[0].key) == 16


def test_sample_seed_depends_on_its_arguments_only() -> None:
    assert sample_seed(0, 5, 1) == sample_seed(0, 5, 1)
    assert len({sample_seed(0, 5, 1), sample_seed(0, 6, 1), sample_seed(0, 5, 0), sample_seed(1, 5, 1)}) == 4
    assert 0 <= sample_seed(123, 10**9, 3) < 2**63


def _reward_dir(base: Path, tmp: Path, seed: int = 0) -> Path:
    """A reward model directory: the tiny trunk with a random (seeded) scalar head."""
    from safetensors.torch import save_file

    out = tmp / f"rm{seed}"
    shutil.copytree(base, out)
    g = torch.Generator().manual_seed(seed)
    save_file({"weight": torch.randn(1, 64, generator=g)}, str(out / "reward_head.safetensors"))
    (out / "reward.json").write_text(json.dumps({"chat_format": "auto"}))
    return out


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(2)
    recs: list[Any] = []
    for i in range(6):
        a, b = rng.randrange(10), rng.randrange(10)
        recs.append({"prompt": f"{a}+{b}?", "answer": a + b, "id": f"q{i}"})
    recs.append({"prompt": 5})  # set aside
    return _jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", recs)


def _strip_times(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("gen_s", "score_s")} for r in recs]


def test_sampling_resumes_exactly_after_a_kill(base: Path, prompt_file: Path, tmp_path: Path) -> None:
    """A run stopped after 2 prompts, with a half-written third line (a kill mid-write), then
    resumed, writes the same samples and rewards as an uninterrupted run; the rewards are the
    reward model's scores of the conversations."""
    import llamalab
    from llamalab.finetune.reward import load_reward_model
    from llamalab.generate.engine import Generator

    lm = llamalab.load(base)
    gen = Generator(lm.model, lm.tokenizer)
    rm = load_reward_model(_reward_dir(base, tmp_path))
    prompts, _ = read_prompts([prompt_file])
    plan = SamplingPlan(k=3, temperatures=[0.7, 1.3], max_new_tokens=12, seed=4)
    score = lambda c: rm.score(c, too_long="nan")  # noqa: E731  (random tokens can outgrow the context)
    whole = run_sampling(gen, prompts, plan, tmp_path / "whole", score=score, progress=False)
    assert len(whole) == 6 and all(len(r["samples"]) == 6 for r in whole)
    part = run_sampling(gen, prompts, plan, tmp_path / "part", score=score, progress=False, stop_after=2)
    assert len(part) == 2
    with (tmp_path / "part" / "samples.jsonl").open("a") as f:
        f.write('{"index": 2, "key": "q2", "sam')
    resumed = run_sampling(gen, prompts, plan, tmp_path / "part", score=score, progress=False)
    assert _strip_times(resumed) == _strip_times(whole)
    lines = (tmp_path / "part" / "samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == list(range(6))
    # Rewards are the model's scores; the answers are checked.
    r0 = whole[0]
    convs = [[*r0["messages"], {"role": "assistant", "content": s["text"]}] for s in r0["samples"]]
    want = [None if x != x else pytest.approx(x, abs=1e-5) for x in rm.score(convs, too_long="nan")]
    assert [s["reward"] for s in r0["samples"]] == want and any(w is not None for w in want)
    assert all(s["correct"] == answer_matches(s["text"], r0["answer"]) for s in r0["samples"])
    assert {s["temperature"] for s in r0["samples"]} == {0.7, 1.3}
    # Another plan in the same directory is refused, naming what differs.
    with pytest.raises(ValueError, match="different plan.*plan"):
        run_sampling(gen, prompts, SamplingPlan(k=2, max_new_tokens=12), tmp_path / "part", score=score, progress=False)


def _rec(key: str, samples: list[tuple[str, float, str, bool]], tag: str | None = None) -> dict[str, Any]:
    return {"index": 0, "key": key, "messages": [{"role": "user", "content": key}], "tag": tag, "answer": "1",
            "samples": [{"text": t, "reward": r, "finish_reason": f, "correct": c, "temperature": 1.0, "tokens": 3}
                        for t, r, f, c in samples], "gen_s": 1.0, "score_s": 0.5}


def test_selection_and_report_by_hand() -> None:
    recs = [_rec("a", [("x", 0.1, "stop", False), ("y", 0.9, "stop", True), ("z", 2.0, "length", False)]),
            _rec("b", [("  ", 5.0, "stop", False), ("w", -1.0, "stop", False)], tag="safety"),
            _rec("c", [("", 1.0, "stop", False), ("v", 3.0, "length", True)])]
    sel = select_best(recs)
    # a: the truncated 2.0 is not selectable; b: the empty answer is not; c: nothing is.
    assert [(s["key"], s["messages"][-1]["content"], s["reward"]) for s in sel] == [("a", "y", 0.9), ("b", "w", -1.0)]
    assert sel[1]["tag"] == "safety" and sel[0]["correct"] is True
    assert [s["key"] for s in select_best(recs, drop_truncated=False)] == ["a", "b", "c"]
    earlier = [{"key": "a", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "old"}],
                "reward": 1.5, "origin_dir": "runs/it1", "correct": True},
               {"key": "b", "messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "low"}],
                "reward": -2.0, "origin_dir": "runs/it1"}]
    sel2 = select_best(recs, earlier=earlier)
    assert [(s["messages"][-1]["content"], s["origin"]) for s in sel2] == [("old", "runs/it1"), ("w", "current")]
    rep = sampling_report(recs, sel2)
    row = rep["by_temperature"]["1"]
    assert rep["samples"] == 7 and rep["samples_per_s"] == pytest.approx(7 / 4.5)
    assert row["accuracy"] == pytest.approx(2 / 7) and row["any_correct"] == pytest.approx(2 / 3)
    # The RM's picks: a -> y (correct), b -> w (wrong), c -> none (wrong): 1 of 3.
    assert row["rm_pick_accuracy"] == pytest.approx(1 / 3)
    assert row["truncated"] == pytest.approx(2 / 7) and row["k"] == 2
    # k=1: the mean of each prompt's mean reward; k=2: a's 3 pairs give 0.9, 2, 2; b and c have one pair each.
    assert row["best_of_k"] == [pytest.approx((1.0 + 2.0 + 2.0) / 3), pytest.approx((4.9 / 3 + 5.0 + 3.0) / 3)]
    assert rep["selected"] == {"n": 2, "mean_reward": pytest.approx(0.25), "from_earlier": 1, "accuracy": 0.5}


def _rs_run_file(tmp: Path, base: Path, rm: Path, prompts: Path, run: str, extra: str = "") -> Path:
    text = f"""
run_dir = "{tmp / run}"
seed = 3
[model]
checkpoint = "{base}"
[finetune]
method = "sft"
epochs = 2
[rejection]
reward_model = "{rm}"
prompts = ["{prompts}"]
eval_prompts = ["{prompts}"]
k = 4
temperatures = [0.8, 1.2]
max_new_tokens = 10
drop_truncated = false          # a random model never ends its answer
{extra}
[train]
seq_len = 256
global_batch_tokens = 1024
micro_batch_size = 4
precision = "fp32"
log_every = 1000
[optim]
lr = 1e-3
warmup_steps = 1
[eval]
every = 1000
[checkpoint]
every = 1000
keep_last = 0
"""
    path = tmp / f"{run}.toml"
    path.write_text(text)
    return path


def test_the_command_samples_selects_fine_tunes_and_resumes(base: Path, prompt_file: Path, tmp_path: Path) -> None:
    rm = _reward_dir(base, tmp_path)
    cmd = [sys.executable, "-m", "llamalab.cli", "rejection-sample", "--no-progress", "--json", "--config"]
    run_file = _rs_run_file(tmp_path, base, rm, prompt_file, "it1")
    proc = subprocess.run([*cmd, str(run_file)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    run = tmp_path / "it1"
    samples = [json.loads(x) for x in (run / "sampling" / "samples.jsonl").read_text().splitlines()]
    selected = [json.loads(x) for x in (run / "selected.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and "prompt.jsonl:7" not in proc.stderr and "prompts.jsonl:7" in proc.stderr
    # Each selected answer is its prompt's best selectable sample (drop_truncated = false here).
    by_key = {r["key"]: r for r in samples}
    for s in selected:
        cands = [x for x in by_key[s["key"]]["samples"] if x["text"].strip() and x["reward"] is not None]
        assert s["reward"] == max(x["reward"] for x in cands)
        assert s["messages"][-1]["content"] in [x["text"] for x in cands]
    # SFT ran on exactly the selected set; the report has both temperatures and before/after.
    assert out["status"] == "completed" and out["data"]["train"]["kept"] == len(selected)
    rep = out["rejection"]
    assert set(rep["by_temperature"]) == {"0.8", "1.2"} and len(rep["by_temperature"]["0.8"]["best_of_k"]) == 4
    assert set(rep["eval"]) == {"before", "after"} and rep["eval"]["before"]["prompts"] == 6
    for f in ("sampling/best-of-k.png", "sampling/rewards.png", "eval-rewards.png", "final/model.safetensors"):
        assert (run / f).exists(), f
    assert (run / "report.json").is_file()
    # Again: everything resumes, nothing is sampled twice.
    before = (run / "sampling" / "samples.jsonl").read_bytes()
    proc = subprocess.run([*cmd, str(run_file)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (run / "sampling" / "samples.jsonl").read_bytes() == before
    # A second iteration keeps the first one's answers as candidates (re-scored by its own model).
    rm2 = _reward_dir(base, tmp_path, seed=1)
    run_file2 = _rs_run_file(tmp_path, base, rm2, prompt_file, "it2",
                             extra=f'keep_from = ["{run}"]')
    proc = subprocess.run([*cmd, str(run_file2), "--sample-only", "rejection.eval_prompts=[]"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rep2 = json.loads(proc.stdout)["rejection"]
    assert not (tmp_path / "it2" / "final").exists()
    sel2 = [json.loads(x) for x in (tmp_path / "it2" / "selected.jsonl").read_text().splitlines()]
    from llamalab.finetune.reward import load_reward_model

    score2 = load_reward_model(rm2).score
    old = {s["key"]: s for s in selected}
    for s in sel2:
        if s["key"] in old:  # never below the earlier answer under the current model
            assert s["reward"] >= score2([old[s["key"]]["messages"]])[0] - 1e-5
    assert rep2["selected"]["from_earlier"] == sum(s["origin"] != "current" for s in sel2)


def test_bad_rejection_config_is_one_line(base: Path, prompt_file: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "llamalab.cli", "rejection-sample", "--no-progress", "--config"]
    run_file = _rs_run_file(tmp_path, base, tmp_path / "no-such-rm", prompt_file, "bad")
    proc = subprocess.run([*cmd, str(run_file)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "rejection.reward_model" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run([*cmd, str(run_file), "rejection.temperatures=[0.0, 1.0]"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "0 is greedy" in proc.stderr


def test_arithmetic_prompts_and_checked_pairs_by_hand() -> None:
    from llamalab.finetune.datasets import arithmetic_prompts, checked_pairs

    qs = arithmetic_prompts(50, offset=0, low=1, high=9, ops="+-")
    more = arithmetic_prompts(50, offset=50, low=1, high=9, ops="+-")
    assert not {q["id"] for q in qs} & {q["id"] for q in more}  # slices never overlap
    for q in qs + more:
        a, op, b = q["id"].partition("+") if "+" in q["id"] else q["id"].partition("-")
        assert int(q["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert f"{a} {op} {b}" in q["prompt"]
    assert arithmetic_prompts(3, seed=0) == arithmetic_prompts(3, seed=0) != arithmetic_prompts(3, seed=1)
    with pytest.raises(ValueError, match="exceeds"):
        arithmetic_prompts(10, offset=160, low=1, high=9)  # 2 * 81 = 162 questions
    msgs = [{"role": "user", "content": "2+2?"}]

    def s(text: str, correct: bool, finish: str = "stop") -> dict[str, Any]:
        return {"text": text, "correct": correct, "finish_reason": finish}

    recs = [{"key": "a", "messages": msgs, "answer": "4",
             "samples": [s("4", True), s("5", False), s("4", True), s("It is 4", True), s("3", False),
                         s("44444", False, "length")]},
            {"key": "b", "messages": msgs, "answer": "4", "samples": [s("4", True), s("4.", True)]},
            {"key": "c", "messages": msgs, "answer": "4", "samples": [s("1", False)]}]
    pairs = checked_pairs(recs, per_prompt=3)
    # a: 2 distinct right ("4", "It is 4"), 2 wrong ("5", "3"; the truncated one is not used) -> 2 pairs.
    assert len(pairs) == 2 and all(p["id"] == "a" for p in pairs)
    assert {p["chosen"] for p in pairs} == {"4", "It is 4"} and {p["rejected"] for p in pairs} == {"5", "3"}
    assert all(p["preference"] == "significantly_better" and p["messages"] == msgs for p in pairs)
