"""Reward models (llamalab.finetune.reward; Llama 2 §3.2.2).

References: the margin loss by hand (Table 27's levels); the score of each sequence against
transformers' ``LlamaForSequenceClassification`` holding the same weights (its last non-padding
token); loss and gradients against TRL's ``RewardTrainer.compute_loss`` on that model; the
calibration table on a hand-made case; a whole run that learns a preference, resumes, exports a
model that ``llamalab reward score`` reads back, with the PNG and the per-level table.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from llamalab.finetune.reward import (
    HEAD_FILE,
    MARGINS,
    accuracy_by_level,
    attach_reward_head,
    calibration_table,
    load_reward_model,
    pair_margin,
    reward_loss,
    sequence_rewards,
)
from llamalab.train.config import ConfigError, load_config
from llamalab.train.metrics import read_metrics

transformers = pytest.importorskip("transformers")
from test_finetune import _hf_dir_of_base, _jsonl, _run_file, base, cut_back  # noqa: E402,F401  (the tiny checkpoint)


# --------------------------------------------------------------------------------------------
# The loss, the margins and the figures, by hand
# --------------------------------------------------------------------------------------------


def test_margin_loss_hand_computed() -> None:
    assert MARGINS["small"] == {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3,
                                "negligibly_better": 0.0}
    assert [MARGINS["large"][k] for k in MARGINS["small"]] == [3.0, 2.0, 1.0, 0.0]
    assert pair_margin(None, "better", "small") == pytest.approx(2 / 3)
    assert pair_margin(None, "better", "large") == 2.0
    assert pair_margin(0.25, "better", "large") == 0.25  # an explicit margin wins
    assert pair_margin(0.25, "better", "off") == 0.0  # Llama 3: none
    assert pair_margin(None, None, "small") == 0.0
    with pytest.raises(ValueError, match="reward.margin"):
        pair_margin(None, "better", "medium")
    # -log sigmoid(1.0 - 0.2 - 2/3) = log(1 + exp(-(0.8 - 2/3)))
    got = reward_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.2, 0.5]), torch.tensor([2 / 3, 0.0]))
    want = [math.log1p(math.exp(-(0.8 - 2 / 3))), math.log1p(math.exp(1.5))]
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-6, atol=0)
    # The gradient against its float64 re-statement: d mean(loss) / d r_c = -sigmoid(-(r_c - r_r - m)) / B.
    c = torch.tensor([1.0, -1.0, 0.3], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([2 / 3, 0.0, 3.0], dtype=torch.float64)
    reward_loss(c, r, m).mean().backward()
    want_c = [-1 / (1 + math.exp(ci - ri - mi)) / 3 for ci, ri, mi in zip([1.0, -1.0, 0.3], [0.2, 0.5, 0.3], m.tolist())]
    torch.testing.assert_close(c.grad, torch.tensor(want_c, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(r.grad, -c.grad, rtol=1e-12, atol=0)


def test_accuracy_by_level_and_calibration_by_hand() -> None:
    diffs = [2.0, -1.0, 0.5, 3.0, -0.5, 1.0]
    levels = ["better", "better", "significantly_better", "significantly_better", None, None]
    acc = accuracy_by_level(diffs, levels)
    # Llama 2 Table 8's order: significantly better first; pairs without a level; then all.
    assert list(acc) == ["significantly_better", "better", "unlabelled", "all"]
    assert acc["significantly_better"] == {"pairs": 2, "accuracy": 1.0}
    assert acc["better"] == {"pairs": 2, "accuracy": 0.5}
    assert acc["unlabelled"] == {"pairs": 2, "accuracy": 0.5}
    assert acc["all"] == {"pairs": 6, "accuracy": 4 / 6}
    # Each pair counted both ways: d=[2,-1] -> points (2,1) (-2,0) (-1,1) (1,0); two bins of two.
    table = calibration_table([2.0, -1.0], bins=2)
    assert [r["n"] for r in table] == [2, 2]
    assert table[0]["score_diff"] == pytest.approx(-1.5) and table[0]["win_rate"] == 0.5
    assert table[1]["score_diff"] == pytest.approx(1.5) and table[1]["win_rate"] == 0.5
    assert table[1]["predicted"] == pytest.approx(1 / (1 + math.exp(-1.5)))


# --------------------------------------------------------------------------------------------
# Against transformers' sequence classifier and TRL's reward loss
# --------------------------------------------------------------------------------------------


def _pair_models(base: Path, tmp: Path) -> tuple[Any, Any, int]:
    """Our trunk + scalar head and transformers' LlamaForSequenceClassification with the same weights."""
    import llamalab

    lm = llamalab.load(base)
    ours = lm.model.float().train()
    head = attach_reward_head(ours, std=0.5, seed=4)
    pad = 0
    hf = transformers.LlamaForSequenceClassification.from_pretrained(_hf_dir_of_base(base, tmp), num_labels=1,
                                                                     pad_token_id=pad).float().train()
    with torch.no_grad():
        hf.score.weight.copy_(head.weight)
    return ours, hf, pad


def _ragged(pad: int, lengths: list[int], vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), max(lengths)), pad, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(1, vocab, (n,), generator=g)  # never the pad id inside a row
    return tokens


def test_scores_equal_transformers_sequence_classifier(base: Path, tmp_path: Path) -> None:
    ours, hf, pad = _pair_models(base, tmp_path)
    lengths = [9, 17, 4, 17]
    tokens = _ragged(pad, lengths, ours.config.vocab_size)
    with torch.no_grad():
        want = hf(input_ids=tokens, attention_mask=(tokens != pad).long()).logits.squeeze(-1)
        got = sequence_rewards(ours, tokens, torch.tensor(lengths))
        full = sequence_rewards(ours, tokens, torch.tensor(lengths), full_forward=True)
    assert want.abs().max() > 0.05
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, want, rtol=1e-5, atol=1e-5)


def test_loss_and_gradients_equal_trls_reward_trainer(base: Path, tmp_path: Path) -> None:
    from trl import RewardTrainer

    ours, hf, pad = _pair_models(base, tmp_path)
    lengths = [12, 7, 15, 10, 9, 15]  # 3 chosen, then 3 rejected
    tokens = _ragged(pad, lengths, ours.config.vocab_size, seed=2)
    margin = torch.tensor([1.0, 2 / 3, 0.0])
    # TRL's own compute_loss, on a stand-in for the trainer's state it reads.
    fake = SimpleNamespace(model=SimpleNamespace(training=False), args=SimpleNamespace(center_rewards_coefficient=None),
                           accelerator=SimpleNamespace(gather=lambda t: t, gather_for_metrics=lambda t: t),
                           _metrics={"eval": {k: [] for k in ("num_tokens", "min_reward", "mean_reward", "max_reward",
                                                              "accuracy", "margin")}},
                           _total_train_tokens=0)
    trl_loss = RewardTrainer.compute_loss(fake, hf, {"input_ids": tokens, "attention_mask": (tokens != pad).long(),
                                                     "margin": margin})
    trl_loss.backward()
    r = sequence_rewards(ours, tokens, torch.tensor(lengths))
    loss = reward_loss(r[:3], r[3:], margin).mean()
    loss.backward()
    assert math.isclose(float(loss.detach()), float(trl_loss.detach()), rel_tol=1e-5)
    pairs = [(ours.output.weight, hf.score.weight), (ours.tok_embeddings.weight, hf.model.embed_tokens.weight),
             (ours.layers[0].feed_forward.w2.weight, hf.model.layers[0].mlp.down_proj.weight),
             (ours.layers[1].attention.wv.weight, hf.model.layers[1].self_attn.v_proj.weight)]
    for a, b in pairs:
        assert b.grad.abs().max() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-4 * float(b.grad.abs().max()))


# --------------------------------------------------------------------------------------------
# Whole runs
# --------------------------------------------------------------------------------------------

LEVELS = ["significantly_better", "better", "slightly_better", "negligibly_better"]


@pytest.fixture(scope="module")
def reward_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pairs whose chosen answer gives the sum and whose rejected one declines, at Llama 2's four
    levels (and some with an explicit margin), plus two bad records."""
    rng = random.Random(5)
    recs: list[Any] = []
    for i in range(64):
        a, b = rng.randrange(10), rng.randrange(10)
        rec = {"prompt": f"{a}+{b}?", "chosen": f"It is {a + b}.", "rejected": "No idea, sorry.",
               "preference": LEVELS[i % 4]}
        if i % 8 == 7:
            rec["margin"] = 0.5
        recs.append(rec)
    recs.append({"prompt": "x", "chosen": "same", "rejected": "same"})  # set aside: identical
    recs.append({"prompt": "x", "chosen": "a", "rejected": "b", "preference": "much_better"})  # unknown level
    return _jsonl(tmp_path_factory.mktemp("reward") / "pairs.jsonl", recs)


def test_reward_run_learns_exports_and_scores(base: Path, reward_data: Path, tmp_path: Path) -> None:
    from llamalab.finetune.objectives import finetune

    run_file = _run_file(tmp_path, base, reward_data, "reward", lora=False,
                         extra='[reward]\nmargin = "small"\n')
    cfg = load_config(run_file, ["finetune.epochs=8", "eval.at_start=true", "optim.lr=1e-3",
                                 "optim.warmup_fraction=0.1"])
    summary = finetune(cfg, progress=False)
    run = tmp_path / "run"
    recs = read_metrics(run)
    assert recs[0]["step"] == 0 and "val_accuracy" in recs[0]
    train = [r for r in recs if "accuracy" in r]
    assert train and summary["objective"] == "reward"
    # 56 steps, optim.warmup_fraction 0.1 -> warmup max(2, ceil(5.6)) = 6 steps to the peak 1e-3.
    lr = {r["step"]: r["lr"] for r in recs if "lr" in r}
    assert lr[1] == pytest.approx(1e-3 / 6) and lr[6] == pytest.approx(1e-3) and lr[5] < 1e-3
    assert summary["val_accuracy"] == 1.0 and summary["val_reward_margin"] > 1.0
    assert summary["data"]["train"]["set_aside"] == 2
    final = run / "final"
    assert (final / HEAD_FILE).is_file() and (final / "calibration.png").stat().st_size > 1000
    meta = json.loads((final / "reward.json").read_text())
    held = meta["held_out"]
    assert held["accuracy_by_level"]["all"]["accuracy"] == 1.0 and held["pairs"] == 8
    assert set(held["accuracy_by_level"]) <= {*LEVELS, "all"}
    # final/ is an ordinary checkpoint too (the trunk + the starting next-token head).
    import llamalab

    lm = llamalab.load(final)
    assert lm.model.output.weight.shape[0] == lm.model.config.vocab_size
    # Read back: the same score for a held-out-like pair, chosen above rejected.
    rm = load_reward_model(final)
    s = rm.score([[{"role": "user", "content": "3+4?"}, {"role": "assistant", "content": "It is 7."}],
                  [{"role": "user", "content": "3+4?"}, {"role": "assistant", "content": "No idea, sorry."}]])
    assert s[0] > s[1]
    # The CLI: scores, the accuracy table, bad records set aside with line numbers.
    scored = tmp_path / "scored.jsonl"
    inp = _jsonl(tmp_path / "in.jsonl", [{"prompt": "3+4?", "chosen": "It is 7.", "rejected": "No idea, sorry.",
                                         "preference": "better"},
                                        {"prompt": "3+4?", "response": "It is 7."},
                                        {"prompt": 3}])
    proc = subprocess.run([sys.executable, "-m", "llamalab.cli", "reward", "score", "--model", str(final),
                           "--input", str(inp), "--out", str(scored), "--json", "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["records"] == 2 and report["set_aside"] == 1 and "in.jsonl:3" in proc.stderr
    assert report["accuracy_by_level"]["better"]["accuracy"] == 1.0
    rows = [json.loads(x) for x in scored.read_text().splitlines()]
    assert rows[0]["reward_chosen"] == pytest.approx(s[0], abs=1e-4)
    assert rows[1]["reward"] == pytest.approx(s[0], abs=1e-4)
    bad = subprocess.run([sys.executable, "-m", "llamalab.cli", "reward", "score", "--model", str(base),
                          "--input", str(inp)], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "not a reward model" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "llamalab.cli", "reward", "score", "--model", str(final),
                              "--input", str(tmp_path / "nope.jsonl")], capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "--input" in missing.stderr and "nope.jsonl" in missing.stderr
    assert "Traceback" not in missing.stderr and "scoring" not in missing.stderr


def test_lora_reward_run_trains_the_head_and_resumes(base: Path, reward_data: Path, tmp_path: Path) -> None:
    """LoRA on the trunk, the head in full; resumed from its step-4 checkpoint (later checkpoints
    and metrics removed, as if killed there), the run retraces steps 5-8 exactly."""
    from llamalab.finetune.objectives import finetune

    run_file = _run_file(tmp_path, base, reward_data, "reward", lora=True)
    steps = ["finetune.max_steps=8", "eval.every=0", "checkpoint.every=4"]
    run = tmp_path / "run"
    first = finetune(load_config(run_file, steps), progress=False)
    assert first["n_trainable"] < first["n_params"] / 5
    whole = [r["loss"] for r in read_metrics(run) if "loss" in r]
    cut_back(run, 4)
    finetune(load_config(run_file, steps), progress=False)
    again = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert len(again) == len(whole) == 8 and whole[-1] < whole[0]
    for g, w in zip(again, whole):
        assert math.isclose(g, w, rel_tol=1e-6, abs_tol=1e-7), (again, whole)
    assert (run / "adapter" / "adapter.safetensors").is_file() and (run / "final" / HEAD_FILE).is_file()


def test_bad_reward_config_fails_before_compute(base: Path, reward_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reward.margin"):
        load_config(_run_file(tmp_path, base, reward_data, "reward", lora=False), ["reward.margin=medium"])
    with pytest.raises(ConfigError, match="optim.warmup_fraction"):
        load_config(_run_file(tmp_path, base, reward_data, "reward", lora=False), ["optim.warmup_fraction=1.5"])


@pytest.mark.parametrize("share", [True, False])
def test_three_way_ranking_with_edited_answers(base: Path, tmp_path: Path, share: bool) -> None:
    """Llama 3: a record with an edited answer gives three comparisons (edited > chosen >
    rejected), the level's margin on chosen-vs-rejected only; a batch's loss is the mean over its
    comparisons, each side scored as if alone (padding does not move a score; nor, with
    ``finetune.share_prompt``, the other sides in the pair's one row)."""
    from llamalab.finetune.data import IDENTICAL_PAIR, RecordError, parse_preference_record
    from llamalab.finetune.objectives import RewardObjective

    recs = [{"prompt": "2+2?", "chosen": "4", "rejected": "5", "edited": "It is 4.", "preference": "better"},
            {"prompt": "1+2?", "chosen": "It is 3.", "rejected": "No.", "preference": "significantly_better"},
            {"prompt": "3+3?", "chosen": "6", "rejected": "I will not say, it is a secret.", "edited": "6, as 3+3=6."}]
    data = _jsonl(tmp_path / "edited.jsonl", recs)
    cfg = load_config(_run_file(tmp_path, base, data, "reward", lora=False),
                      ["finetune.val_fraction=0", f"finetune.share_prompt={str(share).lower()}"])
    obj = RewardObjective(cfg)
    assert [p.edited is not None for p in obj.pairs] == [True, False, True]
    model = obj.build_model(torch.device("cpu"), "fp32", None)
    obj.device = torch.device("cpu")
    batch = obj._collate([0, 1, 2], obj.pairs)
    # 8 sides: one row a pair (sharing their prompt), or one row a side
    assert batch["comparisons"] == 7 and batch["tokens"].shape[0] == (3 if share else 8)
    assert batch["slots"].shape == (8,) if share else "slots" not in batch
    with torch.no_grad():
        loss, stats, _ = obj._loss(model, batch)

    @torch.no_grad()
    def alone(sample: Any) -> float:
        t = torch.tensor(sample.tokens, dtype=torch.long)[None]
        return float(sequence_rewards(model, t, torch.tensor([t.shape[1]])))

    s = [{k: alone(getattr(p, k)) for k in ("chosen", "rejected", "edited") if getattr(p, k) is not None}
         for p in obj.pairs]
    lg = lambda hi, lo, m=0.0: math.log1p(math.exp(-(hi - lo - m)))  # noqa: E731
    terms = [lg(s[0]["chosen"], s[0]["rejected"], 2 / 3), lg(s[0]["edited"], s[0]["chosen"]),
             lg(s[0]["edited"], s[0]["rejected"]), lg(s[1]["chosen"], s[1]["rejected"], 1.0),
             lg(s[2]["chosen"], s[2]["rejected"]), lg(s[2]["edited"], s[2]["chosen"]),
             lg(s[2]["edited"], s[2]["rejected"])]
    assert float(loss) == pytest.approx(sum(terms) / 7, rel=1e-5)
    assert float(stats["reward_margin"]) == pytest.approx(
        sum(x["chosen"] - x["rejected"] for x in s) / 3, rel=1e-4, abs=1e-6)
    # A step weighs each micro-batch by its comparisons.
    obj.micro = 2
    obj.start(model, torch.device("cpu"), 0, 0, 1, {})
    weights = [w for _, w in obj.step_batches(0, print).items]
    assert sum(weights) == pytest.approx(1.0)
    with pytest.raises(RecordError) as e:
        parse_preference_record({"prompt": "x", "chosen": "a", "rejected": "b", "edited": "a"})
    assert e.value.reason == IDENTICAL_PAIR


# --------------------------------------------------------------------------------------------
# Mixtures (Llama 2's helpfulness and safety reward-model data)
# --------------------------------------------------------------------------------------------


def test_mix_sources_by_hand() -> None:
    from llamalab.finetune.data import mix_sources

    helpful, safety, open_ = list(range(100)), [f"s{i}" for i in range(30)], [f"o{i}" for i in range(200)]
    # Helpfulness RM: all helpful + an equal amount from safety and open data -> 100 + 50 + 50.
    out, report = mix_sources([("helpful", helpful, 1.0, None), ("safety", safety, None, 0.25),
                               ("open", open_, None, 0.25)], seed=0)
    assert [r["taken"] for r in report] == [100, 50, 50] and len(out) == 200
    assert out[:100] == helpful  # taken whole: in order
    s = [x for x in out if isinstance(x, str) and x.startswith("s")]
    assert len(s) == 50 and set(s) == set(safety)  # 30 < 50: one whole copy, then 20 distinct more
    assert sorted(s).count("s0") in (1, 2) and len(set(x for x in out if str(x).startswith("o"))) == 50
    # Safety RM: safety data + 10% helpfulness -> 30 + round(0.1 * 30 / 0.9) = 3.
    out, report = mix_sources([("safety", safety, 1.0, None), ("helpful", helpful, None, 0.1)], seed=0)
    assert [r["taken"] for r in report] == [30, 3] and len(set(out[30:])) == 3
    # A fraction below one samples, seeded; the same seed gives the same draw.
    a, _ = mix_sources([("open", open_, 0.1, None)], seed=3)
    b, _ = mix_sources([("open", open_, 0.1, None)], seed=3)
    assert a == b and len(a) == 20 and len(set(a)) == 20
    with pytest.raises(ValueError, match="no usable records"):
        mix_sources([("a", helpful, 1.0, None), ("b", [], None, 0.5)], seed=0)


def test_reward_run_on_a_mixture_reports_each_source(base: Path, reward_data: Path, tmp_path: Path) -> None:
    from llamalab.finetune.objectives import RewardObjective

    other = _jsonl(tmp_path / "other.jsonl", [{"prompt": f"q{i}", "chosen": "Sure, here it is.",
                                               "rejected": "No."} for i in range(40)])
    extra = f'''[[finetune.sources]]
name = "helpful"
files = ["{reward_data}"]
fraction = 1.0
[[finetune.sources]]
name = "safety"
files = ["{other}"]
share = 0.5
'''
    run_file = _run_file(tmp_path, base, reward_data, "reward", lora=False, extra=extra)
    text = run_file.read_text().replace(f'train_data = ["{reward_data}"]\n', "")
    run_file.write_text(text)
    cfg = load_config(run_file, ["finetune.val_fraction=0.125"])
    obj = RewardObjective(cfg)
    # 64 good pairs -> 56 after holding out 8; 40 -> 35 after 5; the share makes them equal.
    assert [(m["name"], m["available"], m["taken"]) for m in obj.mixture] == [("helpful", 56, 56), ("safety", 35, 56)]
    assert len(obj.pairs) == 112 and len(obj.val_pairs) == 13
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(run_file, ["finetune.sources.1.fraction=0.5"])
    two_shares = f'[[finetune.sources]]\nfiles = ["{other}"]\nshare = 0.6\n' \
                 f'[[finetune.sources]]\nfiles = ["{other}"]\nshare = 0.5\n'
    with pytest.raises(ConfigError, match="sum to 1.1"):
        load_config(_run_file(tmp_path, base, reward_data, "reward", lora=False, extra=two_shares))
