"""The PPO loop (finetune/ppo_loop.py) on a tiny model: the rollout's tensors against an
independent computation (the engine's own samples, the full model's log-softmax, the reward
model's scores of every prefix, a float64 GAE), a run whose reward goes up while the KL term
holds the policy near the reference, exact resume from a mid-iteration checkpoint, early
stopping that exports the best policy, bad configs, and Llama 2's recipes."""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import _jsonl, base  # noqa: E402,F401  (the tiny checkpoint)
from test_rejection import _reward_dir  # noqa: E402

from llamalab.finetune.ppo_loop import PPOObjective, shape_scores  # noqa: E402
from llamalab.train.config import ConfigError, load_config  # noqa: E402
from llamalab.train.metrics import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    recs = []
    for i in range(40):
        a, b = rng.randrange(10), rng.randrange(10)
        recs.append({"prompt": f"{a}+{b}?", "answer": a + b, "id": f"q{i}"})
    return _jsonl(tmp_path_factory.mktemp("ppo-prompts") / "prompts.jsonl", recs)


def _ppo_file(tmp: Path, base: Path, rm: Path | None, prompts: Path, *, extra: str = "", ppo: str = "",
              run: str = "run") -> Path:
    reward = f'reward_model = "{rm}"' if rm is not None else 'reward = "answer"\nvalue_init = "policy"'
    text = f"""
run_dir = "{tmp / run}"
seed = 3
[model]
checkpoint = "{base}"
[finetune]
method = "ppo"
[ppo]
{reward}
prompts = ["{prompts}"]
eval_prompts = ["{prompts}"]
iterations = 3
batch_size = 16
minibatch_size = 8
forward_batch_size = 8
max_new_tokens = 6
kl_coef = 0.05
penalize_no_eos = false         # a random model never ends its answer
{ppo}
[train]
seq_len = 128
micro_batch_size = 4
precision = "fp32"
log_every = 1000
[optim]
lr = 2e-3
warmup_steps = 0
min_lr_ratio = 1.0
[eval]
every = 0
batches = 2
[checkpoint]
every = 0
keep_last = 0
{extra}
"""
    path = tmp / f"{run}.toml"
    path.write_text(text)
    return path


def test_shape_scores_by_hand() -> None:
    s = torch.tensor([1.0, 3.0, float("nan"), 5.0, 7.0])
    ended = torch.tensor([True, True, True, True, False])
    # The finite scores 1, 3, 5, 7: mean 4, unbiased std sqrt(20/3).
    z = (torch.tensor([1.0, 3.0, 5.0, 7.0]) - 4.0) / (20 / 3) ** 0.5
    got = shape_scores(s, ended, shaping="llama2", penalize_no_eos=True, penalty=-3.0)
    assert torch.allclose(got, torch.tensor([z[0], z[1], -3.0, z[2], -3.0]), atol=1e-6)
    got = shape_scores(s, ended, shaping="llama2", penalize_no_eos=False, penalty=-2.0)
    assert torch.allclose(got, torch.tensor([z[0], z[1], -2.0, z[2], z[3]]), atol=1e-6)
    assert torch.equal(shape_scores(s, ended, shaping="raw", penalty=-3.0), torch.tensor([1.0, 3.0, -3.0, 5.0, -3.0]))
    # One finite score cannot be whitened: it is 0 (the batch's mean), not NaN.
    assert torch.equal(shape_scores(torch.tensor([2.0, float("nan")]), torch.tensor([True, True])),
                       torch.tensor([0.0, -3.0]))
    with pytest.raises(ValueError, match="shaping"):
        shape_scores(s, ended, shaping="whiten")


def _gae64(rewards: np.ndarray, values: np.ndarray, n: int, gamma: float, lam: float) -> np.ndarray:
    adv, running = np.zeros(n), 0.0
    for t in reversed(range(n)):
        nxt = values[t + 1] if t + 1 < n else 0.0
        running = rewards[t] + gamma * nxt - values[t] + gamma * lam * running
        adv[t] = running
    return adv


def test_a_rollout_equals_an_independent_computation(base: Path, prompts: Path, tmp_path: Path) -> None:
    """Iteration 1 of a run: the answers are the engine's own samples from the starting model
    with the run's seeds; the old log-probs are the full model's log-softmax at each answer token
    (at the sampling temperature); the values are the reward model's scores of every prefix
    (the value model starts as the reward model); the entropy the mean over answer tokens of the
full model's next-token entropies; KL is exactly 0 (policy = reference); the
    rewards are the reward model's scores of the answers, whitened; the advantages a float64
    GAE, whitened. The first step's ratio is 1 and nothing is clipped."""
    import llamalab
    from llamalab.finetune.reward import load_reward_model, sequence_rewards
    from llamalab.finetune.rejection import read_prompts, sample_seed
    from llamalab.generate.chat import encode_chat
    from llamalab.generate.engine import GenerationConfig, Generator

    rm_dir = _reward_dir(base, tmp_path)
    cfg = load_config(_ppo_file(tmp_path, base, rm_dir, prompts, ppo="temperature = 0.8\ngamma = 0.9\nlam = 0.8"))
    obj = PPOObjective(cfg)
    model = obj.build_model(torch.device("cpu"), "fp32", None)
    obj.start(model, torch.device("cpu"), 0, 0, 1, {}, None)
    plan = obj.step_batches(0, lambda m: None)
    buf = obj.buffer
    assert buf is not None and buf["iteration"] == 1 and len(buf["steps"]) == 2

    # The prompts of iteration 1 (the seeded epoch order) and the engine's samples for them.
    recs, _ = read_prompts([prompts])
    order = np.random.default_rng([3, 0]).permutation(len(recs))[:16]
    lm = llamalab.load(base)
    gen = Generator(lm.model, lm.tokenizer)
    ids = [encode_chat(lm.tokenizer, list(recs[i].messages)) for i in order]
    want = []
    for c in range(2):
        gc = GenerationConfig(max_new_tokens=6, temperature=0.8, seed=sample_seed(3, 0, c), stop_ids=obj.stops)
        want += gen.generate(ids[8 * c:8 * c + 8], gc)
    rm = load_reward_model(rm_dir)
    scores = rm.score([[*recs[i].messages, {"role": "assistant", "content": r.text}] for i, r in zip(order, want)],
                      too_long="nan")
    finite = np.array([s for s in scores if s == s], dtype=np.float64)
    shaped = [(s - finite.mean()) / finite.std(ddof=1) if s == s else -3.0 for s in scores]
    adv_all, mask_all = [], []
    ent_sum, ent_n = 0.0, 0
    for i, r in enumerate(want):
        p, n = len(ids[i]), len(r.ids)
        assert buf["plen"][i] == p and buf["rlen"][i] == n
        seq = torch.tensor(ids[i] + r.ids)
        assert torch.equal(buf["tokens"][i, :p + n], seq)
        with torch.no_grad():
            logits = lm.model(seq[None])[0].double() / 0.8
            lp = torch.log_softmax(logits, -1)[torch.arange(p - 1, p + n - 1), seq[p:]]
            values = torch.stack([sequence_rewards(rm.model, seq[None, :p + k], torch.tensor([p + k]))[0]
                                  for k in range(n)])
        logp = torch.log_softmax(logits[p - 1:p + n - 1], -1)
        ent_sum += float(-(logp.exp() * logp).sum(-1).sum())
        ent_n += n
        assert torch.allclose(buf["logprobs"][i, :n].double(), lp, atol=1e-4)
        assert torch.allclose(buf["values"][i, :n], values, atol=1e-4)
        assert torch.all(buf["logprobs"][i, n:] == 0) and not buf["mask"][i, n:].any()
        rewards = np.zeros(n)
        rewards[-1] = shaped[i]  # KL is 0: the per-token penalty vanishes
        adv_all.append(_gae64(rewards, values.double().numpy(), n, 0.9, 0.8))
        mask_all.append(n)
    flat = np.concatenate(adv_all)
    white = (flat - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8) + flat.mean()
    got = torch.cat([buf["advantages"][i, :n] for i, n in enumerate(mask_all)]).double().numpy()
    assert np.allclose(got, white, atol=1e-4)
    assert buf["stats"]["rollout_kl"] == 0.0
    assert buf["stats"]["rollout_entropy"] == pytest.approx(ent_sum / ent_n, abs=1e-4)
    assert buf["stats"]["rollout_score"] == pytest.approx(float(finite.mean()), abs=1e-5)
    # The first minibatch: the policy has not moved, so the ratio is 1 and nothing is clipped.
    batch, weight = plan.items[0]
    loss, stats = obj.loss(model, batch)
    assert float(stats["ratio"]) == pytest.approx(1.0, abs=1e-6) and float(stats["clip_fraction"]) == 0.0
    assert float(stats["approx_kl"]) == pytest.approx(0.0, abs=1e-7)
    assert sum(w for _, w in plan.items) == pytest.approx(1.0)


def _scores(run_dir: Path, key: str = "rollout_score") -> list[float]:
    seen: dict[int, float] = {}
    for r in read_metrics(run_dir):
        if key in r:
            seen.setdefault(r["iteration"], r[key])
    return [seen[k] for k in sorted(seen)]


@pytest.mark.slow  # two runs of 30 iterations of 32 answers: ~30 s on 2 cores
def test_ppo_raises_the_reward_and_the_kl_penalty_holds_the_policy_back(base: Path, prompts: Path,
                                                                        tmp_path: Path) -> None:
    """The reward model's mean score of the policy's answers rises over a run; with a larger β the
    policy ends nearer the reference (smaller KL) and gains less."""
    from llamalab.finetune.objectives import finetune

    rm_dir = _reward_dir(base, tmp_path)
    out = {}
    for beta in (0.0, 1.0):
        cfg = load_config(_ppo_file(tmp_path, base, rm_dir, prompts, run=f"b{beta}"),
                          ["ppo.iterations=30", "ppo.batch_size=32", f"ppo.kl_coef={beta}", "optim.lr=5e-3", "eval.every=120",
                           "eval.at_start=true"])
        summary = finetune(cfg, progress=False)
        out[beta] = (_scores(Path(cfg.run_dir)), _scores(Path(cfg.run_dir), "rollout_kl"), summary)
    scores, kls, summary = out[0.0]
    assert np.mean(scores[-5:]) > np.mean(scores[:5]) + 0.5, scores
    held = summary["held_out"]
    assert held["last"]["val_reward"] > held["first"]["val_reward"] + 0.5 and held["first"]["val_kl"] == 0.0
    b_scores, b_kls, _ = out[1.0]
    assert np.mean(b_kls[-5:]) < 0.5 * np.mean(kls[-5:]), (b_kls, kls)
    assert np.mean(b_scores[-5:]) < np.mean(scores[-5:])
    # The per-iteration figures are plotted.
    from llamalab.train.metrics import plot_run

    names = {p.name for p in plot_run(Path(out[0.0][2]["run_dir"]))}
    assert {"ppo_reward.png", "ppo_kl.png", "ppo_losses.png", "ppo_entropy.png"} <= names


@pytest.mark.parametrize("lora", [False, True])
def test_ppo_resumes_mid_iteration_exactly(base: Path, prompts: Path, tmp_path: Path, lora: bool) -> None:
    """A run resumed from its step-3 checkpoint (in the middle of iteration 2, the rollout in the
    checkpoint) logs the same losses and rollouts as one that never stopped, and ends with the
    same policy; with LoRA the checkpoint holds both models' adapters and the value head."""
    from safetensors.torch import load_file

    from llamalab.finetune.objectives import finetune

    rm_dir = _reward_dir(base, tmp_path)
    over = [f"finetune.lora={str(lora).lower()}"]
    whole = load_config(_ppo_file(tmp_path, base, rm_dir, prompts, run="whole"), over)
    finetune(whole, progress=False)
    part = load_config(_ppo_file(tmp_path, base, rm_dir, prompts, run="part"), [*over, "checkpoint.every=3"])
    finetune(part, progress=False)
    run = Path(part.run_dir)
    # As if killed after step 4: the step-3 checkpoint is the last one, the rest never happened.
    shutil.rmtree(run / "checkpoints" / "step-000006")
    shutil.rmtree(run / "final")
    summary = finetune(part, progress=False)
    assert summary["start_step"] == 3 and summary["steps"] == 6
    a, b = read_metrics(Path(whole.run_dir)), read_metrics(run)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, 7))
    for key in ("loss", "policy_loss", "value_loss", "rollout_score", "rollout_kl", "grad_norm"):
        assert [r[key] for r in b] == [r[key] for r in a], key
    wa = load_file(str(Path(whole.run_dir) / "final" / "model.safetensors"))
    wb = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_early_stopping_exports_the_best_policy(base: Path, prompts: Path, tmp_path: Path) -> None:
    """Held-out accuracy of a random model stays 0, so it never beats the start: with patience 1
    the run stops at the first evaluation after the start, and final/ is the starting policy."""
    from safetensors.torch import load_file

    from llamalab.finetune.objectives import finetune

    rm_dir = _reward_dir(base, tmp_path)
    cfg = load_config(_ppo_file(tmp_path, base, rm_dir, prompts, ppo="patience = 1\nstop_metric = \"accuracy\""),
                      ["eval.every=2", "eval.at_start=true"])
    summary = finetune(cfg, progress=False)
    assert summary["status"] == "stopped early" and summary["steps"] == 2
    assert summary["exported"] == "best (step 0)"
    assert [h["step"] for h in summary["held_out"]["history"]] == [0, 2]
    start = load_file(str(base / "model.safetensors"))
    final = load_file(str(Path(cfg.run_dir) / "final" / "model.safetensors"))
    assert all(torch.equal(start[k].float(), final[k]) for k in start)
    rows = [json.loads(x) for x in (Path(cfg.run_dir) / "ppo-eval" / "step-000002.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["correct"] is False for r in rows)
    # Run again: the run has stopped; it says so and does not train on.
    again = finetune(cfg, progress=False)
    assert again["status"] == "already stopped early" and again["steps"] == 2


def test_a_programmatic_reward_scores_the_checked_answer(base: Path, tmp_path: Path) -> None:
    """ppo.reward = "answer": 1 when the answer checks, else 0; every prompt must have one."""
    p = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "answer": 2}, {"prompt": "2+2?", "answer": 4}])
    cfg = load_config(_ppo_file(tmp_path, base, None, p), ["ppo.batch_size=2", "ppo.minibatch_size=2"])
    obj = PPOObjective(cfg)
    scores, correct = obj._scores(obj.prompts, ["It is 2.", "5"])
    assert scores.tolist() == [1.0, 0.0] and correct.tolist() == [1.0, 0.0]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1?", "answer": 2}, {"prompt": "no answer"}])
    with pytest.raises(ConfigError, match=r"bad.jsonl line 2 has none"):
        PPOObjective(load_config(_ppo_file(tmp_path, base, None, bad)))


@pytest.mark.parametrize("override,match", [
    ("ppo.minibatch_size=5", "not a multiple of ppo.minibatch_size"),
    ("ppo.temperature=0", "ppo.temperature=0"),
    ("eval.every=3", "PPO takes 2 optimizer steps an iteration"),
    ("ppo.lam=1.5", "ppo.lam=1.5"),
])
def test_bad_ppo_configs_fail_before_compute(base: Path, prompts: Path, tmp_path: Path, override: str,
                                            match: str) -> None:
    path = _ppo_file(tmp_path, base, _reward_dir(base, tmp_path), prompts)
    with pytest.raises(ConfigError, match=match):
        load_config(path, [override])


def test_missing_reward_parts_are_named(base: Path, prompts: Path, tmp_path: Path) -> None:
    path = _ppo_file(tmp_path, base, _reward_dir(base, tmp_path), prompts)
    with pytest.raises(ConfigError, match="ppo.reward_model: not set"):
        PPOObjective(load_config(path, ["ppo.reward_model=\"\"", "ppo.value_init=\"policy\""]))
    with pytest.raises(ConfigError, match="not a reward model"):
        PPOObjective(load_config(path, [f"ppo.reward_model=\"{base}\""]))
    with pytest.raises(ConfigError, match="value_init"):
        PPOObjective(load_config(path, ["ppo.reward=\"answer\"", "ppo.reward_model=\"\""]))


@pytest.mark.parametrize("name,beta,iterations", [("llama2-ppo-7b", 0.01, 200), ("llama2-ppo-70b", 0.005, 400)])
def test_ppo_recipes_carry_llama2s_constants(base: Path, name: str, beta: float, iterations: int) -> None:
    # Each recipe names its real checkpoint; a tiny stand-in with a long enough context checks the rest.
    cfg = load_config(REPO / "configs" / "finetune" / f"{name}.toml",
                      [f"model.checkpoint={base}", "model.overrides.max_seq_len=8192"])
    p, o = cfg.ppo, cfg.optim
    assert cfg.finetune.method == "ppo" and p.kl_coef == beta and p.iterations == iterations
    assert (p.batch_size, p.minibatch_size, p.epochs, p.clip) == (512, 64, 1, 0.2)
    assert (o.lr, tuple(o.betas), o.eps, o.weight_decay, o.grad_clip) == (1e-6, (0.9, 0.95), 1e-5, 0.1, 1.0)
    assert o.min_lr_ratio == 1.0 and o.warmup_steps == 0  # constant
    assert p.shaping == "llama2" and p.safety_reward_model and p.safety_threshold == 0.15
    assert p.patience > 0 and p.eval_prompts
