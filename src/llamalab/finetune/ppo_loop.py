"""The PPO loop of Llama 2-Chat (§3.2.3), an objective of the training loop (``finetune.method = "ppo"``).

Four models take part; two are trained:

- **policy** π_θ: ``model.checkpoint``, trained in full or with LoRA adapters;
- **reference** π_0: the starting policy, frozen: a copy (full fine-tuning) or the policy itself
  with its adapters switched off (LoRA: no second copy);
- **value model** V: a separate trunk with a scalar head, trained beside the policy; started from
  the reward model (``ppo.value_init = "reward_model"``), as torchtune's PPO recipe does. Separate
  rather than a second head on the policy's trunk (TRL's older default) because the two losses
  pull one trunk in different directions, and the reward model already maps a (prompt, answer)
  to a score, which is what the value of the last state should be; ``"policy"`` starts it from
  the policy's weights with a new head instead (for a reward that is not a model);
- **reward**: the helpfulness reward model, optionally gated by a safety reward model (Llama 2
  eq. 3, ``finetune/ppo.py: gated_reward``), or ``ppo.reward = "answer"``: 1 when the answer
  checks against the prompt's ``"answer"`` (``rejection.answer_matches``), else 0.

One **iteration** (``_rollout``): ``ppo.batch_size`` prompts are answered once each by the policy
through the generation engine (KV cache, ``forward_batch_size`` rows a batch; the plain model,
so the weights being trained and their adapters are what samples); the answers are scored and
shaped (Llama 2: WHITEN(LOGIT(R_c)) over the batch; an answer that never ends scores
``no_eos_penalty``); one no-gradient pass each gives the policy's and the reference's log-probs
of the answer tokens, the values and the entropy; the per-token KL penalty and the score at the
last token make the rewards, and GAE their advantages. Then ``epochs`` passes over the answers in
minibatches of ``minibatch_size`` rows, one optimizer step each (the loop's AdamW, clipping,
precision, micro-batches, metrics), with PPO's clipped loss (``finetune/ppo.py: ppo_loss``).

Logged per step (``metrics.jsonl``, ``llamalab plot``): the loss parts, clip fraction, ratio and
approximate KL of the step; the iteration's figures as ``rollout_*`` (mean score, shaped
reward, KL to the reference summed over an answer, entropy, answer length, share ended, accuracy
where prompts have answers); every ``eval.every`` steps the held-out prompts (``ppo.eval_prompts``,
greedy by default) as ``val_*``. The best held-out policy is kept (``run_dir/ppo-best.pt``),
``ppo.patience`` evaluations without improvement stop the run, and ``final/`` is the best policy
(``ppo.export = "best"``) or the last.

Resume: a checkpoint holds the iteration's rollout (tensors, a few MB) and where in its minibatches
the run is; the draws of iteration *i* are seeded by (seed, i) alone and the minibatch order by
(seed, i, epoch), so a run killed anywhere continues as it would have gone on.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamalab.finetune.lora import (
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    effective_weight,
    frozen_linears_in,
    load_adapter_state_dict,
)
from llamalab.finetune.objectives import _expand, _Finetune, adapters_and_head, load_adapters_and_head
from llamalab.finetune.ppo import (
    entropy_from_logits,
    gae,
    gated_reward,
    kl_penalized_rewards,
    masked_mean,
    ppo_loss,
    whiten,
)
from llamalab.finetune.rejection import PromptRecord, answer_matches, read_prompts, sample_seed
from llamalab.finetune.reward import HEAD_FILE, attach_reward_head, reward_head
from llamalab.train.config import ConfigError, TrainConfig
from llamalab.train.loss import linear_token_logprobs
from llamalab.train.objective import StepBatches

__all__ = ["ActorCritic", "BEST_FILE", "PPOObjective", "shape_scores"]

BEST_FILE = "ppo-best.pt"
EVAL_DIR = "ppo-eval"


class ActorCritic(nn.Module):
    """The two trained models of a PPO run as one module, so that the training loop's optimizer,
    clipping and checkpoints hold both: ``policy`` (a Transformer) and ``value`` (a trunk whose
    ``output`` is a scalar head)."""

    def __init__(self, policy: nn.Module, value: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.value = value
        self.config = policy.config  # what the loop reports (layers, dim)


def shape_scores(scores: Tensor, ended: Tensor, *, shaping: str = "llama2", penalize_no_eos: bool = True,
                 penalty: float = -3.0) -> Tensor:
    """The rewards given at the last answer token, from the batch's scores (B,) in score space
    (a reward model's raw output, i.e. LOGIT(R_c); NaN where none could be computed).

    ``shaping="llama2"``: whitened over the batch's finite scores (zero mean, unit variance;
    Llama 2 eq. 4), ``"raw"``: as they are (torchtune, TRL). Answers with a NaN score, and with
    ``penalize_no_eos`` those that never ended (``ended`` False), get ``penalty`` instead.
    """
    valid = torch.isfinite(scores)
    filled = torch.where(valid, scores, torch.zeros_like(scores))
    if shaping == "llama2":
        out = whiten(filled, valid, shift_mean=False) if int(valid.sum()) > 1 else filled * 0
    elif shaping == "raw":
        out = filled
    else:
        raise ValueError(f"ppo.shaping={shaping!r}: expected 'llama2' or 'raw'")
    bad = ~valid | (~ended.bool() if penalize_no_eos else torch.zeros_like(valid))
    return torch.where(bad, torch.full_like(out, penalty), out)


def _same_tokenizer(a: Any, b: Any) -> bool:
    probe = "Hello, world! 1234 + 5678 = 6912.\n  Ünïcödé — ok?"
    return a.vocab_size == b.vocab_size and a.encode(probe) == b.encode(probe)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class PPOObjective(_Finetune):
    """PPO with Llama 2's reward (see the module doc)."""

    name = "ppo"
    needs_train_data = False

    def __init__(self, cfg: TrainConfig, world_size: int = 1) -> None:
        if world_size > 1:
            raise ConfigError("finetune.method = \"ppo\" runs in one process (generation and four models in one "
                              "place); run it without torchrun")
        super().__init__(cfg, world_size)
        p = cfg.ppo
        self.steps_per_iter = p.batch_size // p.minibatch_size * p.epochs
        steps = p.iterations * self.steps_per_iter
        self._total_steps = min(steps, cfg.finetune.max_steps) if cfg.finetune.max_steps else steps
        self.iteration = 0  # rollouts made
        self.steps_taken = 0
        self.buffer: dict[str, Any] | None = None
        self.best: float | None = None
        self.best_step: int | None = None
        self.since_best = 0
        self.history: list[dict[str, float]] = []  # held-out figures by step
        self.exported: str | None = None
        self.autocast: Callable[[], Any] = nullcontext

    # -- data
    def _load_data(self) -> None:
        from llamalab.generate.chat import chat_stop_ids, encode_chat

        p = self.cfg.ppo
        if p.reward == "model" and not p.reward_model:
            raise ConfigError("ppo.reward_model: not set; expected a reward model directory (final/ of a llamalab "
                              "finetune run with finetune.method = \"reward\"), or ppo.reward = \"answer\"")
        for key in ("reward_model", "safety_reward_model"):
            path = getattr(p, key)
            if path and not (Path(path) / HEAD_FILE).is_file():
                raise ConfigError(f"ppo.{key}: {path}: not a reward model (no {HEAD_FILE})")
        if p.safety_reward_model and p.reward != "model":
            raise ConfigError("ppo.safety_reward_model: the safety gate applies to reward-model scores; "
                              "with ppo.reward = \"answer\" leave it empty")
        if p.value_init == "reward_model" and not p.reward_model:
            raise ConfigError("ppo.value_init = \"reward_model\": no ppo.reward_model to start the value model from; "
                              "set ppo.value_init = \"policy\"")
        if not p.prompts:
            raise ConfigError("ppo.prompts: empty; expected JSONL prompt files ({\"prompt\": ...} or {\"messages\": ...})")
        encode = lambda m: encode_chat(self.tokenizer, list(m), fmt=self.fmt)  # noqa: E731
        longest = min(self.ckpt.config.max_seq_len, self.cfg.train.seq_len)
        max_len = longest - p.max_new_tokens
        if max_len < 1:
            raise ConfigError(f"ppo.max_new_tokens={p.max_new_tokens} leaves no room for a prompt in "
                              f"{longest} tokens (train.seq_len, the model's context)")
        self.train_files = _expand(p.prompts, "ppo.prompts")
        self.prompts, summary = read_prompts(self.train_files, encode=encode, max_len=max_len)
        val_summary = None
        self.eval_prompts: list[PromptRecord] = []
        if p.eval_prompts:
            self.eval_prompts, val_summary = read_prompts(_expand(p.eval_prompts, "ppo.eval_prompts"), encode=encode,
                                                          max_len=max_len)
        self._summaries("prompts", summary, val_summary)
        self.mixture = None
        for name, recs in (("ppo.prompts", self.prompts), ("ppo.eval_prompts", self.eval_prompts)):
            missing = [r for r in recs if r.answer is None]
            if p.reward == "answer" and missing:
                raise ConfigError(f"{name}: ppo.reward = \"answer\" needs an \"answer\" in every prompt record; "
                                  f"{missing[0].file} line {missing[0].line} has none ({len(missing)} in all)")
        if p.stop_metric == "accuracy" and (not self.eval_prompts or any(r.answer is None for r in self.eval_prompts)):
            raise ConfigError("ppo.stop_metric = \"accuracy\" needs ppo.eval_prompts whose records all have an \"answer\"")
        if not self.prompts:
            raise ConfigError(f"ppo.prompts: no usable prompts in {', '.join(map(str, self.train_files))} "
                              f"({summary.format().splitlines()[0]})")
        self.prompt_ids = [encode(r.messages) for r in self.prompts]
        self.eval_ids = [encode(r.messages) for r in self.eval_prompts]
        self.stops = tuple(sorted(chat_stop_ids(self.tokenizer, self.fmt)))
        self.n_units = len(self.prompts)

    def describe(self) -> list[str]:
        p = self.cfg.ppo
        reward = ("the answer checked against the prompt's \"answer\"" if p.reward == "answer" else
                  f"reward model {p.reward_model}" + (f", gated by safety model {p.safety_reward_model} "
                                                      f"(< {p.safety_threshold:g})" if p.safety_reward_model else ""))
        return [f"ppo: {len(self.prompts):,} prompts, {len(self.eval_prompts):,} held out; {p.iterations} iterations of "
                f"{p.batch_size} answers, {p.minibatch_size} a gradient step, {p.epochs} epoch(s): "
                f"{self.steps_per_iter} steps an iteration, {self._total_steps} in all",
                f"ppo: reward {reward}, shaping {p.shaping}; beta {p.kl_coef:g}; value model from "
                f"{'the reward model' if p.value_init == 'reward_model' else 'the policy'}; reference "
                f"{'the policy with its adapters off' if self.lora is not None else 'a frozen copy of the policy'}"]

    def _next_prompts(self, n: int) -> list[int]:
        out = []
        for k in range(self.consumed, self.consumed + n):
            epoch, j = divmod(k, self.n_units)
            if not hasattr(self, "_perm") or self._perm_epoch != epoch:
                self._perm, self._perm_epoch = self._order(epoch), epoch
            out.append(int(self._perm[j]))
        self.consumed += n
        return out

    # -- models
    def build_model(self, device: torch.device, precision: str, mesh: Any) -> nn.Module:
        from safetensors.torch import load_file

        from llamalab.checkpoint import read_checkpoint
        from llamalab.checkpoint.base import build_model
        from llamalab.finetune.reward import load_reward_model
        from llamalab.train.parallelize import parallelize

        p, t = self.cfg.ppo, self.cfg.train
        self.device, self.precision = device, precision
        # LoRA at bf16: the frozen linears of both models held in bf16 from the build on (autocast
        # would cast them at every forward; the export merges into the fp32 starting weights).
        hold = frozen_linears_in(torch.bfloat16) if self.lora is not None and precision == "bf16" else None
        policy = build_model(self.ckpt, dtype=torch.float32, device=device, hold=hold).train()
        if self.lora is not None:
            apply_lora(policy, self.lora)
        if p.value_init == "reward_model":
            rm_ckpt = read_checkpoint(p.reward_model)
            if rm_ckpt.tokenizer is None or not _same_tokenizer(rm_ckpt.tokenizer, self.tokenizer):
                raise ConfigError(f"ppo.value_init = \"reward_model\": {p.reward_model} has another tokenizer than "
                                  f"the policy (the value model reads the policy's tokens); set ppo.value_init = "
                                  f"\"policy\"")
            value = build_model(rm_ckpt, dtype=torch.float32, device=device, hold=hold).train()
            if self.lora is not None:
                apply_lora(value, self.lora)
            head = attach_reward_head(value)
            with torch.no_grad():
                head.weight.copy_(load_file(str(Path(p.reward_model) / HEAD_FILE))["weight"])
        else:
            value = build_model(self.ckpt, dtype=torch.float32, device=device, hold=hold).train()
            if self.lora is not None:
                apply_lora(value, self.lora)
            attach_reward_head(value, seed=self.cfg.seed)
        head = reward_head(value)
        head.to(device)
        head.weight.requires_grad_(True)
        self.base_cast = hold is not None
        self.ref = None
        if self.lora is None:
            self.ref = build_model(self.ckpt, dtype=torch.float32, device=device).eval().requires_grad_(False)
        self.rm = self.safety_rm = None
        if p.reward == "model":
            # Frozen: held in the run's precision (bf16 halves them; autocast would cast them anyway).
            rm_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            self.rm = load_reward_model(p.reward_model, device=device, dtype=rm_dtype)
            self.rm.model.requires_grad_(False)
            if p.safety_reward_model:
                self.safety_rm = load_reward_model(p.safety_reward_model, device=device, dtype=rm_dtype)
                self.safety_rm.model.requires_grad_(False)
        if t.activation_checkpointing != "none" or t.compile:
            for m in (policy, value):
                parallelize(m, None, dp_shard=False, activation_checkpointing=t.activation_checkpointing,
                            compile=t.compile)
        self.n_vocab = min(self.tokenizer.vocab_size, policy.config.vocab_size)
        return ActorCritic(policy, value)

    def start(self, model: nn.Module, device: torch.device, tokens_seen: int, dp_rank: int, dp_size: int,
              extra: dict[str, Any], autocast: Callable[[], Any] | None = None) -> None:
        from llamalab.train.speed import onednn_mm_t

        super().start(model, device, tokens_seen, dp_rank, dp_size, extra, autocast)
        self.autocast = autocast or nullcontext
        self.mm_t = onednn_mm_t if getattr(model, "_onednn_linear", False) else None
        if self.ref is not None:
            # The loop's speed-ups swap module classes in the trained model (oneDNN linears, matmul
            # attention); the reference takes the same ones, so that its log-probs are the policy's
            # to the last bit until the policy moves (KL exactly 0 at the start).
            for mp, mr in zip(model.policy.modules(), self.ref.modules()):
                if type(mr) is not type(mp) and isinstance(mp, type(mr)):
                    mr.__class__ = type(mp)

    def checkpoint_weights(self, model: nn.Module) -> dict[str, Tensor] | None:
        return None if self.lora is None else adapters_and_head(model, model.value, "value.output.weight")

    def load_weights(self, model: nn.Module, weights: dict[str, Tensor], source: str) -> None:
        if self.lora is None:
            model.load_state_dict(weights, strict=True)
        else:
            load_adapters_and_head(model, model.value, "value.output.weight", weights, source, "value head")

    def flops_per_token(self, model: nn.Module, seq_len: int) -> float | None:
        return None  # generation and four models' passes: no single honest FLOPs-per-token figure

    def checkpoint_extra(self, model: nn.Module) -> dict[str, Any]:
        return {"iteration": self.iteration}

    def data_state(self) -> dict[str, Any]:
        b = self.buffer
        live = b is not None and b["next"] < len(b["steps"])
        return {"consumed": self.consumed, "iteration": self.iteration, "steps_taken": self.steps_taken,
                "buffer": b if live else None, "best": self.best, "best_step": self.best_step,
                "since_best": self.since_best, "history": self.history}

    def load_data_state(self, state: dict[str, Any] | None, extra: dict[str, Any]) -> None:
        state = state or {}
        self.consumed = int(state.get("consumed", 0))
        self.iteration = int(state.get("iteration", 0))
        self.steps_taken = int(state.get("steps_taken", 0))
        self.buffer = state.get("buffer")
        self.best, self.best_step = state.get("best"), state.get("best_step")
        self.since_best = int(state.get("since_best", 0))
        self.history = list(state.get("history", []))

    # -- passes over answers
    def _gather(self, hidden: Tensor, plen: Tensor, width: int) -> Tensor:
        """The hidden states (b, width, D) that predict each answer token: position plen - 1 + k
        for the k-th (the input is the sequence without its last token)."""
        idx = (plen.to(hidden.device).unsqueeze(1) - 1 + torch.arange(width, device=hidden.device))
        idx = idx.clamp(max=hidden.shape[1] - 1)
        return hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def _targets(self, tokens: Tensor, plen: Tensor, mask: Tensor) -> Tensor:
        idx = plen.unsqueeze(1) + torch.arange(mask.shape[1], device=tokens.device)
        got = tokens.gather(1, idx.clamp(max=tokens.shape[1] - 1))
        return got.masked_fill(~mask, -100)

    def _logprobs(self, policy: nn.Module, tokens: Tensor, plen: Tensor, mask: Tensor, temperature: float,
                  *, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
        """Log-probabilities (b, T) of the answer tokens under ``policy`` at ``temperature`` (0 on
        padding), and with ``entropy`` the mean entropy of those next-token distributions."""
        tokens, plen, mask = tokens.to(self.device), plen.to(self.device), mask.to(self.device)
        hidden = self._gather(policy.hidden_states(tokens[:, :-1]), plen, mask.shape[1])
        targets = self._targets(tokens, plen, mask)
        head = policy.output
        if self.lora is not None and self.lora.dropout and hasattr(head, "_lora_handle"):
            logits = head(hidden)[..., :self.n_vocab].float() / temperature  # dropout needs the module's call
            lp = torch.log_softmax(logits, -1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
        else:
            weight = effective_weight(head)[:self.n_vocab]
            lp = linear_token_logprobs(hidden / temperature, weight, targets, mm_t=self.mm_t)
            logits = None
        ent = None
        if entropy:
            with torch.no_grad():
                if logits is not None:
                    ent = entropy_from_logits(logits, mask)
                else:  # a few thousand answer tokens at a time: never (rows x tokens x vocab) logits at once
                    h = hidden[mask] / temperature
                    weight = effective_weight(head)[:self.n_vocab]
                    total = torch.zeros((), dtype=torch.float64, device=h.device)
                    for k in range(0, h.shape[0], 2048):
                        logp = torch.log_softmax((h[k:k + 2048] @ weight.t().to(h.dtype)).float(), dim=-1)
                        total += (-(logp.exp() * logp).sum(-1)).double().sum()
                    ent = (total / max(h.shape[0], 1)).float()
        return lp.float(), ent

    def _values(self, value: nn.Module, tokens: Tensor, plen: Tensor, mask: Tensor) -> Tensor:
        """V(s) (b, T) of the state before each answer token (the value head at that position)."""
        tokens, plen = tokens.to(self.device), plen.to(self.device)
        hidden = self._gather(value.hidden_states(tokens[:, :-1]), plen, mask.shape[1])
        head = reward_head(value)
        return F.linear(hidden, head.weight.to(hidden.dtype)).squeeze(-1).float() * mask.to(self.device)

    def _chunks(self, n: int) -> list[slice]:
        fb = self.cfg.ppo.forward_batch_size
        return [slice(k, min(k + fb, n)) for k in range(0, n, fb)]

    def _trim(self, tokens: Tensor, plen: Tensor, rlen: Tensor, *per_token: Tensor) -> tuple[Tensor, ...]:
        """Cut a slice of rows to its own longest sequence and answer."""
        width, t = int((plen + rlen).max()), int(rlen.max())
        return (tokens[:, :width], *(x[:, :t] for x in per_token))

    @torch.no_grad()
    def _generate(self, policy: nn.Module, prompts: Sequence[list[int]], temperature: float, seed: int,
                  round_: int) -> list[Any]:
        """Answers of the policy as it is now; the draws of chunk c are seeded by (seed, round_, c)."""
        from llamalab.generate.engine import GenerationConfig, Generator

        gen = Generator(self._snapshot(policy), self.tokenizer)
        out = []
        for c, sl in enumerate(self._chunks(len(prompts))):
            cfg = GenerationConfig(max_new_tokens=self.cfg.ppo.max_new_tokens, temperature=temperature,
                                   seed=sample_seed(seed, round_, c), stop_ids=self.stops)
            out += gen.generate(list(prompts[sl]), cfg)
        return out

    def _snapshot(self, policy: nn.Module) -> nn.Module:
        """A plain copy of the policy as it is now, adapters folded in, in the run's precision: the
        engine's fast path (fused matrices, its decode kernels: ~2.4x the plain model at batch 1)
        rebuilds the weights it reads, which the trained model must not have done to it."""
        from llamalab.checkpoint.base import Checkpoint, build_model
        from llamalab.finetune.lora import lora_modules

        state = {k: v.detach() for k, v in policy.state_dict().items() if ".lora_" not in k}
        for name, module in lora_modules(policy):
            state[f"{name}.weight"] = effective_weight(module).detach()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        return build_model(Checkpoint(config=policy.config, state_dict=state, tokenizer=None, format="ppo-snapshot",
                                      path=Path(self.cfg.run_dir)), dtype=dtype, device=self.device)

    def _pack(self, prompts: Sequence[list[int]], results: Sequence[Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Prompt + answer rows, right-padded: tokens (B, S), prompt and answer lengths, answer mask (B, T)."""
        seqs = [list(p) + list(r.ids) for p, r in zip(prompts, results)]
        plen = torch.tensor([len(p) for p in prompts])
        rlen = torch.tensor([len(r.ids) for r in results])
        tokens = torch.full((len(seqs), max(len(s) for s in seqs)), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)] = torch.tensor(s)
        mask = torch.arange(int(rlen.max())).unsqueeze(0) < rlen.unsqueeze(1)
        return tokens, plen, rlen, mask

    def _scores(self, recs: Sequence[PromptRecord], texts: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        """Scores in score space (B,) (NaN: none) and correctness (B,) where every prompt has an answer."""
        p = self.cfg.ppo
        correct = None
        if all(r.answer is not None for r in recs):
            correct = torch.tensor([float(answer_matches(t, r.answer)) for r, t in zip(recs, texts)])
        if p.reward == "answer":
            assert correct is not None
            return correct.clone(), correct
        convs = [[*r.messages, {"role": "assistant", "content": t}] for r, t in zip(recs, texts)]
        fb = p.forward_batch_size
        with self.autocast():
            helpful = torch.tensor(self.rm.score(convs, batch_size=fb, too_long="nan"))
            if self.safety_rm is None:
                return helpful, correct
            safety = torch.tensor(self.safety_rm.score(convs, batch_size=fb, too_long="nan"))
        tagged = torch.tensor([r.tag == "safety" for r in recs])
        gated = gated_reward(helpful.nan_to_num(0.0), safety.nan_to_num(0.0), tagged, p.safety_threshold)
        score = torch.logit(gated, eps=1e-6)
        return torch.where(helpful.isnan() | safety.isnan(), torch.full_like(score, math.nan), score), correct

    @torch.no_grad()
    def _passes(self, model: ActorCritic, tokens: Tensor, plen: Tensor, rlen: Tensor, mask: Tensor,
                temperature: float, values: bool = True) -> dict[str, Tensor]:
        """Policy and reference log-probs, values and the entropy, ``forward_batch_size`` rows at a time."""
        b, t = mask.shape
        out = {"logprobs": torch.zeros(b, t), "ref_logprobs": torch.zeros(b, t), "values": torch.zeros(b, t)}
        ent_sum, ent_n = 0.0, 0
        was = model.training
        model.eval()
        try:
            for sl in self._chunks(b):
                tk, m = self._trim(tokens[sl], plen[sl], rlen[sl], mask[sl])
                w = m.shape[1]
                with self.autocast():
                    lp, ent = self._logprobs(model.policy, tk, plen[sl], m, temperature, entropy=True)
                    if self.ref is None:
                        with adapters_disabled(model.policy):
                            ref, _ = self._logprobs(model.policy, tk, plen[sl], m, temperature)
                    else:
                        ref, _ = self._logprobs(self.ref, tk, plen[sl], m, temperature)
                    if values:
                        out["values"][sl, :w] = self._values(model.value, tk, plen[sl], m).cpu()
                out["logprobs"][sl, :w], out["ref_logprobs"][sl, :w] = lp.cpu(), ref.cpu()
                n = int(m.sum())
                ent_sum += float(ent) * n
                ent_n += n
        finally:
            model.train(was)
        out["entropy"] = torch.tensor(ent_sum / max(ent_n, 1))
        return out

    def _rollout(self, say: Callable[[str], None]) -> dict[str, Any]:
        """One iteration's answers, rewards and advantages, and its plan of minibatches."""
        p = self.cfg.ppo
        model: ActorCritic = self.model
        t0 = time.perf_counter()
        idx = self._next_prompts(p.batch_size)
        recs = [self.prompts[i] for i in idx]
        prompts = [self.prompt_ids[i] for i in idx]
        results = self._generate(model.policy, prompts, p.temperature, self.cfg.seed, self.iteration)
        gen_s = time.perf_counter() - t0
        tokens, plen, rlen, mask = self._pack(prompts, results)
        ended = torch.tensor([r.finish_reason == "stop" for r in results])
        scores, correct = self._scores(recs, [r.text for r in results])
        shaped = shape_scores(scores, ended, shaping=p.shaping, penalize_no_eos=p.penalize_no_eos,
                              penalty=p.no_eos_penalty)
        passes = self._passes(model, tokens, plen, rlen, mask, p.temperature)
        rewards, kl = kl_penalized_rewards(shaped, passes["logprobs"], passes["ref_logprobs"], mask, p.kl_coef)
        adv, ret = gae(rewards, passes["values"], mask, gamma=p.gamma, lam=p.lam, whiten_advantages=p.whiten_advantages)
        steps = []
        per = p.batch_size // p.minibatch_size
        for epoch in range(p.epochs):
            order = np.random.default_rng([self.cfg.seed, self.iteration, epoch]).permutation(len(idx))
            steps += [order[k * p.minibatch_size:(k + 1) * p.minibatch_size].tolist() for k in range(per)]
        finite = scores[torch.isfinite(scores)]
        stats = {"rollout_score": float(finite.mean()) if len(finite) else math.nan,
                 "rollout_reward": float(shaped.mean()),
                 "rollout_kl": float(kl.sum(-1).mean()),
                 "rollout_entropy": float(passes["entropy"]),
                 "rollout_response_len": float(rlen.float().mean()),
                 "rollout_ended": float(ended.float().mean()),
                 "rollout_value": float(masked_mean(passes["values"], mask)),
                 "rollout_s": time.perf_counter() - t0, "rollout_generate_s": gen_s}
        if correct is not None:
            stats["rollout_accuracy"] = float(correct.mean())
        self.iteration += 1
        say(f"ppo: iteration {self.iteration}/{self.cfg.ppo.iterations}: score {stats['rollout_score']:.3f}"
            + (f", accuracy {100 * stats['rollout_accuracy']:.1f}%" if correct is not None else "")
            + f", KL {stats['rollout_kl']:.4f}, entropy {stats['rollout_entropy']:.3f}, answer "
            f"{stats['rollout_response_len']:.1f} tokens ({100 * stats['rollout_ended']:.0f}% ended); "
            f"{stats['rollout_s']:.1f} s (generation {gen_s:.1f} s)")
        return {"tokens": tokens, "plen": plen, "rlen": rlen, "mask": mask, "logprobs": passes["logprobs"],
                "values": passes["values"], "advantages": adv, "returns": ret, "steps": steps, "next": 0,
                "stats": stats, "iteration": self.iteration}

    # -- the step
    def step_batches(self, tokens_seen: int, say: Callable[[str], None]) -> StepBatches:
        if self.buffer is None or self.buffer["next"] >= len(self.buffer["steps"]):
            self.buffer = self._rollout(say)
        b = self.buffer
        rows = torch.tensor(b["steps"][b["next"]])
        b["next"] += 1
        self.steps_taken += 1
        total = float(b["mask"][rows].sum())
        items = []
        for k in range(0, len(rows), self.micro):
            r = rows[k:k + self.micro]
            tk, lp, v, adv, ret, m = self._trim(b["tokens"][r], b["plen"][r], b["rlen"][r], b["logprobs"][r],
                                                b["values"][r], b["advantages"][r], b["returns"][r], b["mask"][r])
            batch = {"tokens": tk, "plen": b["plen"][r], "logprobs": lp, "values": v, "advantages": adv,
                     "returns": ret, "mask": m}
            items.append((batch, float(m.sum()) / total))
        n_tokens = int((b["plen"][rows] + b["rlen"][rows]).sum())
        return StepBatches(items, n_tokens, int((b["plen"][rows] + b["rlen"][rows]).max()))

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.cfg.ppo
        m = batch["mask"].to(self.device)
        lp, _ = self._logprobs(model.policy, batch["tokens"], batch["plen"], m, p.temperature)
        v = self._values(model.value, batch["tokens"], batch["plen"], m)
        dev = lambda x: x.to(self.device)  # noqa: E731
        loss, stats = ppo_loss(lp, dev(batch["logprobs"]), dev(batch["advantages"]), v, dev(batch["values"]),
                               dev(batch["returns"]), m, clip=p.clip, value_clip=p.value_clip, value_coef=p.value_coef)
        stats = {**stats, **{k: torch.tensor(x, dtype=torch.float32) for k, x in self.buffer["stats"].items()
                             if not math.isnan(x)}}
        return loss, stats

    # -- held out
    def evaluate(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, float] | None:
        if not self.eval_prompts:
            return None
        p = self.cfg.ppo
        limit = min(len(self.eval_prompts), self.cfg.eval.batches * p.forward_batch_size)
        recs, prompts = self.eval_prompts[:limit], self.eval_ids[:limit]
        # The same draws at every evaluation: the seed does not move with the iteration.
        results = self._generate(model.policy, prompts, p.eval_temperature, self.cfg.seed + 1, 0)
        tokens, plen, rlen, mask = self._pack(prompts, results)
        texts = [r.text for r in results]
        scores, correct = self._scores(recs, texts)
        passes = self._passes(model, tokens, plen, rlen, mask, 1.0, values=False)
        kl = ((passes["logprobs"] - passes["ref_logprobs"]) * mask).sum(-1)
        finite = scores[torch.isfinite(scores)]
        out = {"val_reward": float(finite.mean()) if len(finite) else math.nan, "val_kl": float(kl.mean()),
               "val_response_len": float(rlen.float().mean()),
               "val_ended": float(np.mean([r.finish_reason == "stop" for r in results]))}
        if correct is not None:
            out["val_accuracy"] = float(correct.mean())
        step = self.steps_taken
        folder = Path(self.cfg.run_dir) / EVAL_DIR
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / f"step-{step:06d}.jsonl").open("w", encoding="utf-8") as f:
            for i, (r, res) in enumerate(zip(recs, results)):
                row = {"key": r.key, "messages": list(r.messages), "response": res.text,
                       "finish_reason": res.finish_reason, "score": None if math.isnan(float(scores[i])) else float(scores[i]),
                       "kl": float(kl[i])}
                if correct is not None:
                    row["correct"] = bool(correct[i])
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._track(step, out, model)
        return out

    def _track(self, step: int, figures: dict[str, float], model: nn.Module) -> None:
        """Keep the best held-out policy (in run_dir/ppo-best.pt) and count evaluations since."""
        metric = figures.get(f"val_{self.cfg.ppo.stop_metric}", math.nan)
        self.history.append({"step": step, **figures})
        print(f"ppo: held out at step {step}: reward {figures['val_reward']:.4f}"
              + (f", accuracy {100 * figures['val_accuracy']:.1f}%" if "val_accuracy" in figures else "")
              + f", KL {figures['val_kl']:.4f}, answer {figures['val_response_len']:.1f} tokens"
              + ("" if math.isnan(metric) or (self.best is not None and metric <= self.best) else " (the best so far)"),
              file=sys.stderr, flush=True)
        if math.isnan(metric):
            return
        if self.best is None or metric > self.best:
            self.best, self.best_step, self.since_best = metric, step, 0
            if self.cfg.ppo.export == "best":
                policy = model.policy
                state = adapter_state_dict(policy) if self.lora is not None else policy.state_dict()
                _atomic_save({"step": step, "metric": metric,
                              "weights": {k: v.detach().to("cpu", copy=True) for k, v in state.items()}},
                             Path(self.cfg.run_dir) / BEST_FILE)
        else:
            self.since_best += 1

    def stop_reason(self) -> str | None:
        p = self.cfg.ppo
        if p.patience and self.since_best >= p.patience:
            return (f"held-out {p.stop_metric} has not improved for {self.since_best} evaluation(s) (ppo.patience = "
                    f"{p.patience}); the best, {self.best:.4f}, was at step {self.best_step}")
        return None

    # -- the result
    def export(self, run_dir: Path, model: nn.Module, distributed: bool) -> Path | None:
        p = self.cfg.ppo
        policy = model.policy
        best = Path(self.cfg.run_dir) / BEST_FILE
        self.exported = "last"
        if p.export == "best" and self.best_step is not None and self.best_step != self.steps_taken and best.is_file():
            saved = torch.load(best, map_location="cpu", weights_only=True)
            if self.lora is not None:
                load_adapter_state_dict(policy, saved["weights"], source=str(best))
            else:
                policy.load_state_dict(saved["weights"], strict=True)
            self.exported = f"best (step {saved['step']})"
            self.notes.append(f"final/ is the policy of step {saved['step']}, the best held-out {p.stop_metric} "
                              f"({saved['metric']:.4f}); the last step's weights are in checkpoints/")
        return super().export(run_dir, policy, distributed)

    def summary(self) -> dict[str, Any]:
        out = {**super().summary(), "iterations": self.iteration, "exported": self.exported}
        if self.history:
            first = self.history[0]
            best = next((h for h in self.history if h["step"] == self.best_step), self.history[-1])
            out["held_out"] = {"first": first, "best": best, "last": self.history[-1], "history": self.history}
            keys = [k for k in ("val_reward", "val_accuracy", "val_kl", "val_response_len") if k in first]
            line = f"held out (step {first['step']} -> step {best['step']}, the best): " + ", ".join(
                f"{k[4:].replace('_', ' ')} " + (f"{100 * first[k]:.1f}% -> {100 * best[k]:.1f}%" if k == "val_accuracy"
                                                 else f"{first[k]:.4f} -> {best[k]:.4f}") for k in keys)
            self.notes.append(line)
            out["notes"] = self.notes
        return out
