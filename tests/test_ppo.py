"""PPO's parts (finetune/ppo.py): Llama 2's safety gate and reward shaping on hand-made scores, and
whitening, per-token KL rewards, GAE and the clipped losses against hand-computed cases and
torchtune's own functions (torchtune 0.6.1, installed without its dependencies; its modules are
loaded from their files, since `import torchtune` needs torchao)."""

from __future__ import annotations

import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from llamalab.finetune.ppo import (
    SAFETY_THRESHOLD,
    apply_no_eos_penalty,
    entropy_from_logits,
    gae,
    gated_reward,
    kl_penalized_rewards,
    masked_var,
    ppo_loss,
    shaped_reward,
    whiten,
)


@pytest.fixture(scope="module")
def tt() -> types.SimpleNamespace:
    """torchtune's rlhf.rewards and rlhf.loss.ppo, loaded from the installed files."""
    spec = importlib.util.find_spec("torchtune")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchtune is not installed (make install puts it in with --no-deps)")
    root = Path(list(spec.submodule_search_locations)[0])

    def load(name: str, path: Path) -> types.ModuleType:
        s = importlib.util.spec_from_file_location(name, path)
        assert s is not None and s.loader is not None
        mod = importlib.util.module_from_spec(s)
        s.loader.exec_module(mod)
        return mod

    rewards = load("_tt_rewards", root / "rlhf" / "rewards.py")
    saved = {k: sys.modules.get(k) for k in ("torchtune",)}
    stub = types.ModuleType("torchtune")
    stub.rlhf = rewards  # ppo.py does `from torchtune import rlhf` for masked_mean
    sys.modules["torchtune"] = stub
    try:
        ppo = load("_tt_ppo", root / "rlhf" / "loss" / "ppo.py")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return types.SimpleNamespace(rewards=rewards, ppo=ppo)


def test_safety_gate_by_hand() -> None:
    """Llama 2 eq. 3: the safety score decides where the prompt is tagged safety or σ(safety) < 0.15."""
    cut = math.log(SAFETY_THRESHOLD / (1 - SAFETY_THRESHOLD))  # σ(cut) = 0.15, cut = -1.7346
    helpful = torch.tensor([2.0, 2.0, 2.0, 2.0, -1.0])
    safety = torch.tensor([1.0, cut - 0.01, cut + 0.01, -3.0, 0.5])
    tagged = torch.tensor([False, False, False, True, True])
    got = gated_reward(helpful, safety, tagged)
    want = [torch.sigmoid(torch.tensor(x)).item() for x in (2.0, cut - 0.01, 2.0, -3.0, 0.5)]
    assert got.tolist() == pytest.approx(want, abs=1e-7)


def test_shaped_reward_is_the_whitened_raw_score() -> None:
    """LOGIT reverses the sigmoid, so R̃_c = the chosen model's raw score, whitened (zero mean, unit
    sample variance) over the batch."""
    helpful = torch.tensor([0.5, 1.5, -0.5, 3.0])
    safety = torch.tensor([2.0, -2.5, 1.0, 0.0])
    tagged = torch.tensor([False, False, True, False])
    raw = [0.5, -2.5, 1.0, 3.0]  # gate: helpful, safety (σ(-2.5) < 0.15), safety (tagged), helpful
    mean = sum(raw) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in raw) / 3)
    got = shaped_reward(helpful, safety, tagged)
    assert got.tolist() == pytest.approx([(x - mean) / std for x in raw], abs=1e-5)
    assert apply_no_eos_penalty(torch.tensor([1.0, 2.0]), torch.tensor([True, False])).tolist() == [1.0, -3.0]


def _batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([5, 3, 1, 4])
    mask = torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)
    values = torch.randn(4, 5, generator=g) * mask
    logp = -torch.rand(4, 5, generator=g) * 3 * mask
    ref = -torch.rand(4, 5, generator=g) * 3 * mask
    scores = torch.randn(4, generator=g)
    return mask, values, logp, ref, scores, lengths


def test_whitening_equals_torchtune(tt: types.SimpleNamespace) -> None:
    mask, values, *_ = _batch()
    for shift in (True, False):
        torch.testing.assert_close(whiten(values, mask, shift_mean=shift),
                                   tt.rewards.whiten(values, mask, shift_mean=shift))
        torch.testing.assert_close(whiten(values, shift_mean=shift), tt.rewards.whiten(values, shift_mean=shift))
    centered = values - (values * mask).sum() / mask.sum()
    torch.testing.assert_close(masked_var(values, mask), tt.rewards.masked_var(centered, mask))


def test_kl_rewards_equal_torchtune_and_hand(tt: types.SimpleNamespace) -> None:
    mask, _, logp, ref, scores, lengths = _batch(1)
    got, kl = kl_penalized_rewards(scores, logp, ref, mask, beta=0.01)
    want, want_kl, _ = tt.rewards.get_rewards_ppo(scores, logp, ref, 0.01, valid_score_idxs=lengths - 1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(kl, want_kl)
    # By hand for row 1 (3 tokens): -β·kl at each, the score added at token 2.
    row = [-0.01 * (logp[1, t] - ref[1, t]).item() + (scores[1].item() if t == 2 else 0.0) for t in range(3)]
    assert got[1, :3].tolist() == pytest.approx(row, abs=1e-7) and got[1, 3:].abs().max() == 0


def test_gae_equals_torchtune_and_a_hand_case(tt: types.SimpleNamespace) -> None:
    mask, values, logp, ref, scores, _ = _batch(2)
    rewards, _ = kl_penalized_rewards(scores, logp, ref, mask, beta=0.05)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8)):
        adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
        want_adv, want_ret = tt.rewards.estimate_advantages(values, rewards, gamma, lam, masks=mask)
        torch.testing.assert_close(adv, want_adv)
        torch.testing.assert_close(ret * mask, want_ret * mask)
    # By hand, one row of 3 tokens, no whitening: r = (0, 0, 1), V = (0.5, 0.2, 0.1), γ = 0.9, λ = 0.5.
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.2, 0.1]])
    d2 = 1.0 - 0.1
    d1 = 0.9 * 0.1 - 0.2
    d0 = 0.9 * 0.2 - 0.5
    a2, a1 = d2, d1 + 0.45 * d2
    a0 = d0 + 0.45 * a1
    adv, ret = gae(r, v, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.5, whiten_advantages=False)
    assert adv[0].tolist() == pytest.approx([a0, a1, a2]) and ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.1])


def test_clipped_losses_equal_torchtune_and_a_hand_case(tt: types.SimpleNamespace) -> None:
    mask, values, logp, _, _, _ = _batch(3)
    g = torch.Generator().manual_seed(9)
    old = logp + torch.randn(4, 5, generator=g) * 0.3 * mask
    adv = torch.randn(4, 5, generator=g) * mask
    ret = torch.randn(4, 5, generator=g) * mask
    new_v = values + torch.randn(4, 5, generator=g) * 0.4 * mask
    loss, stats = ppo_loss(logp, old, adv, new_v, values, ret, mask, clip=0.2, value_clip=0.2, value_coef=0.1)
    want = tt.ppo.PPOLoss(epsilon=0.2, value_clip_range=0.2, value_coeff=0.1)(
        old, logp, adv, values, new_v, ret, padding_masks=mask, value_padding_masks=mask)
    torch.testing.assert_close(loss, want[0])
    torch.testing.assert_close(stats["policy_loss"], want[1])
    torch.testing.assert_close(stats["value_loss"], want[2])
    torch.testing.assert_close(stats["clip_fraction"], want[4])
    # By hand: ratio e^0.5 = 1.65 with A = +1 is clipped to 1.2 (policy term -1.2, clipped);
    # ratio e^-0.5 = 0.61 with A = +1 is not (-0.61 > -0.8 ... max(-0.61, -0.8) = -0.61).
    lp, olp = torch.tensor([[0.5, -0.5]]), torch.zeros(1, 2)
    a = torch.ones(1, 2)
    z = torch.zeros(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = ppo_loss(lp, olp, a, z, z, z, m, clip=0.2)
    assert stats["policy_loss"].item() == pytest.approx((-1.2 - math.exp(-0.5)) / 2)
    assert stats["clip_fraction"].item() == 0.5 and loss.item() == pytest.approx(stats["policy_loss"].item())
    assert stats["approx_kl"].item() == pytest.approx(((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.5) - 1 + 0.5)) / 2)


def test_entropy_by_hand() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [1.0, 1e-12, 1e-12]]]))
    got = entropy_from_logits(logits, torch.tensor([[True, False]]))
    assert got.item() == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), abs=1e-6)
