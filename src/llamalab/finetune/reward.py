"""Reward models (Llama 2 §3.2.2): the model's trunk with a scalar head, trained on preference pairs.

- **Head.** :func:`attach_reward_head` replaces the next-token head of a loaded
  :class:`~llamalab.model.Transformer` with ``nn.Linear(dim, 1)`` from outside (the model file has
  no second class), as Llama 2 does ("the classification head for next-token prediction is
  replaced with a regression head"). The score of a sequence is the head at its last token, the
  token HF's ``LlamaForSequenceClassification`` uses (its last non-padding token).
- **Loss** (Llama 2 eq. 2): ``-log sigmoid(r(x, y_c) - r(x, y_r) - m(r))``, the margin ``m`` by
  preference level (Table 27): ``small`` = 1, 2/3, 1/3, 0 and ``large`` = 3, 2, 1, 0 for
  significantly better, better, slightly better, negligibly better; ``off`` (Llama 3 removed it)
  uses none. A record's explicit ``margin`` wins over its level (except with ``off``).
- **Evaluation**: accuracy on held-out pairs overall and per preference level (Llama 2 Table 8's
  layout) and a calibration table: the held-out score differences binned, each pair counted both
  ways (d, chosen won) and (-d, rejected lost), the empirical win rate per bin beside the
  Bradley-Terry prediction sigmoid(d) that the loss trains towards. Plotted as PNG.
- **On disk**: ``final/`` is an ordinary checkpoint of the trained trunk (with the starting
  model's next-token head, so every tool can still read it) plus ``reward_head.safetensors``
  and ``reward.json`` (head, margin mode, held-out figures). :func:`load_reward_model` reads it
  back; ``llamalab reward score`` scores JSONL responses with it.

Training is one more objective of the training loop (:class:`RewardObjective`, built by
``finetune/objectives.py`` for ``finetune.method = "reward"``): full or LoRA (the head is always
trained in full), FSDP2 under torchrun, checkpoints and resume, as SFT and DPO.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamalab.finetune.data import (
    MISSING_FIELD,
    NOT_OBJECT,
    PREFERENCE_LEVELS,
    PROMPT_NOT_ENDING_WITH_USER,
    WRONG_TYPE,
    DataSummary,
    RecordError,
    _iter_json_lines,
    _messages,
    encode_conversation,
)

__all__ = [
    "HEAD_FILE",
    "MARGINS",
    "META_FILE",
    "RewardModel",
    "accuracy_by_level",
    "attach_reward_head",
    "calibration_table",
    "load_reward_model",
    "pair_margin",
    "plot_calibration",
    "reward_loss",
    "sequence_rewards",
]

HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward.json"
NO_LEVEL = "unlabelled"  # pairs without a preference level, in the per-level table

# Llama 2 Table 27: the margin m(r) by preference level.
MARGINS: dict[str, dict[str, float]] = {
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}


# ---------------------------------------------------------------- the head and the loss


def attach_reward_head(model: nn.Module, *, std: float = 0.02, seed: int = 0) -> nn.Linear:
    """Replace ``model.output`` (the next-token head) with a scalar head ``nn.Linear(dim, 1)``.

    Initialised N(0, std²) from a generator seeded with ``seed`` (HF's ``initializer_range``
    0.02), so every process of a sharded run draws the same head. A head tied to the embedding
    table is untied (the embeddings stay). Returns the head.
    """
    old = model.output
    w = old.weight
    dim = w.shape[1]
    device = w.device if w.device.type != "meta" else torch.device("cpu")
    head = nn.Linear(dim, 1, bias=False, device=device, dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        head.weight.copy_(torch.randn(1, dim, generator=g) * std)
    model.output = head
    return head


def reward_head(model: nn.Module) -> nn.Linear:
    """The scalar head of a model made by :func:`attach_reward_head` (ValueError otherwise)."""
    head = getattr(model, "output", None)
    if not isinstance(head, nn.Linear) or head.out_features != 1:
        raise ValueError("the model has no scalar reward head (attach_reward_head)")
    return head


def sequence_rewards(model: nn.Module, tokens: Tensor, lengths: Tensor | None = None, *, full_forward: bool = False,
                     input_pos: Tensor | None = None, mask: Tensor | None = None,
                     slots: Tensor | None = None) -> Tensor:
    """The reward of each right-padded row of ``tokens`` (B, S): the scalar head at its last real
    token (``lengths`` (B,) real tokens a row). Or, for sequences sharing rows
    (``finetune/data.py: share_prompts``), at ``slots`` (N,), flat into the (B * S) slots, with the
    pass's ``input_pos`` and ``mask``. ``full_forward``: through ``model(tokens)`` (needed under
    FSDP, whose hooks are on forward()); else only the chosen hidden states meet the head.
    Returns (B,) or (N,) fp32."""
    if slots is None:
        last = (lengths.to(tokens.device) - 1).clamp(min=0)
        slots = torch.arange(tokens.shape[0], device=tokens.device) * tokens.shape[1] + last
    slots = slots.to(tokens.device)
    kw = {} if mask is None else {"input_pos": input_pos.to(tokens.device), "mask": mask.to(tokens.device)}
    if full_forward:
        return model(tokens, **kw).flatten(0, 1)[slots, 0].float()
    h = model.hidden_states(tokens, **kw).flatten(0, 1)[slots]
    head = reward_head(model)
    return F.linear(h, head.weight.to(h.dtype)).squeeze(-1).float()


def pair_margin(margin: float | None, preference: str | None, mode: str) -> float:
    """The margin m(r) of one pair: 0 with ``mode`` "off"; else the record's explicit ``margin`` if
    it has one, else its level's in Llama 2 Table 27 (``mode`` "small" or "large"), else 0."""
    if mode == "off":
        return 0.0
    if mode not in MARGINS:
        raise ValueError(f"reward.margin={mode!r}: expected 'small', 'large' or 'off'")
    if margin is not None:
        return float(margin)
    return MARGINS[mode].get(preference or "", 0.0)


def reward_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """Llama 2's binary ranking loss per pair: ``-log sigmoid(r_c - r_r - m)`` ((B,) in, (B,) out)."""
    return -F.logsigmoid(chosen - rejected - margin)


# ---------------------------------------------------------------- held-out figures


def accuracy_by_level(diffs: Sequence[float], levels: Sequence[str | None]) -> dict[str, dict[str, float]]:
    """Held-out accuracy (share of pairs with r_c > r_r) per preference level, in Llama 2 Table 8's
    order, then the pairs without a level, then "all": ``{level: {"pairs": n, "accuracy": a}}``."""
    d = np.asarray(diffs, dtype=np.float64)
    lv = np.asarray([x or NO_LEVEL for x in levels], dtype=object)
    out: dict[str, dict[str, float]] = {}
    for name in (*PREFERENCE_LEVELS, NO_LEVEL):
        sel = lv == name
        if sel.any():
            out[name] = {"pairs": int(sel.sum()), "accuracy": float((d[sel] > 0).mean())}
    if len(d):
        out["all"] = {"pairs": int(len(d)), "accuracy": float((d > 0).mean())}
    return out


def calibration_table(diffs: Sequence[float], bins: int = 10) -> list[dict[str, float]]:
    """Score difference -> win rate: each pair counted as (d, won) and (-d, lost), binned into
    ``bins`` equal-count bins of d; per bin the mean d, the empirical win rate and sigmoid(mean d)."""
    d = np.asarray(diffs, dtype=np.float64)
    if not len(d):
        return []
    x = np.concatenate([d, -d])
    y = np.concatenate([np.ones_like(d), np.zeros_like(d)])
    order = np.argsort(x, kind="stable")
    out = []
    for part in np.array_split(order, min(bins, len(x))):
        if not len(part):
            continue
        mid = float(x[part].mean())
        out.append({"score_diff": mid, "win_rate": float(y[part].mean()), "predicted": 1 / (1 + math.exp(-mid)),
                    "n": int(len(part))})
    return out


def plot_calibration(table: Sequence[dict[str, float]], path: str | Path, title: str = "reward model calibration") -> Path:
    """The calibration table as a PNG: empirical win rate per bin against sigmoid(score difference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    xs = [r["score_diff"] for r in table]
    lo, hi = (min(xs), max(xs)) if xs else (-1.0, 1.0)
    grid = np.linspace(min(lo, -1.0), max(hi, 1.0), 200)
    ax.plot(grid, 1 / (1 + np.exp(-grid)), color="0.6", label="sigmoid(difference) (Bradley-Terry)")
    ax.plot(xs, [r["win_rate"] for r in table], "o-", label="held-out win rate")
    ax.set_xlabel("reward difference r(y) - r(y')")
    ax.set_ylabel("P(y preferred)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def format_accuracy_table(acc: dict[str, dict[str, float]]) -> str:
    """The per-level accuracy as a Markdown table (Llama 2 Table 8's layout: levels as columns)."""
    names = list(acc)
    head = "| | " + " | ".join(n.replace("_", " ") for n in names) + " |"
    rule = "|---|" + "---|" * len(names)
    pairs = "| pairs | " + " | ".join(f"{int(acc[n]['pairs'])}" for n in names) + " |"
    accs = "| accuracy | " + " | ".join(f"{100 * acc[n]['accuracy']:.1f}" for n in names) + " |"
    return "\n".join([head, rule, pairs, accs])


# ---------------------------------------------------------------- a trained reward model


@dataclass
class RewardModel:
    """A trunk with its scalar head, the tokenizer and chat format it was trained with."""

    model: nn.Module
    tokenizer: Any
    fmt: str | None
    meta: dict[str, Any] = field(default_factory=dict)

    @torch.no_grad()
    def score(self, conversations: Sequence[Sequence[dict[str, str]]], *, batch_size: int = 8,
              too_long: str = "error") -> list[float]:
        """Rewards of closed conversations (each ending with the assistant's response), rendered with
        the model's chat format; batched, right-padded.

        A conversation longer than the model's context raises ``ValueError`` (``too_long="error"``)
        or scores NaN (``"nan"``: callers that sample, such as rejection sampling, skip it).
        """
        from llamalab.finetune.data import pad_id_for

        if too_long not in ("error", "nan"):
            raise ValueError(f"score: too_long={too_long!r}; expected 'error' or 'nan'")
        pad = pad_id_for(self.tokenizer)
        ids = [encode_conversation(self.tokenizer, conv, fmt=self.fmt, train_on="last").tokens for conv in conversations]
        context = self.model.config.max_seq_len
        fits = [len(x) <= context for x in ids]
        if too_long == "error" and not all(fits):
            k = fits.index(False)
            raise ValueError(f"reward score: conversation {k} is {len(ids[k])} tokens, more than the reward "
                             f"model's context of {context}")
        rewards = self._score_ids([x for x, ok in zip(ids, fits) if ok], pad, batch_size)
        it = iter(rewards)
        return [next(it) if ok else float("nan") for ok in fits]

    def _score_ids(self, ids: list[list[int]], pad: int, batch_size: int) -> list[float]:
        """Scores of token lists, batched in order of length (a batch is padded to its longest
        member: similar lengths together waste less), returned in the given order."""
        device = next(self.model.parameters()).device
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = [0.0] * len(ids)
        for k in range(0, len(order), batch_size):
            rows = order[k:k + batch_size]
            chunk = [ids[i] for i in rows]
            width = max(len(x) for x in chunk)
            tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
            for i, x in enumerate(chunk):
                tokens[i, :len(x)] = torch.tensor(x)
            lengths = torch.tensor([len(x) for x in chunk])
            for i, r in zip(rows, sequence_rewards(self.model, tokens.to(device), lengths).tolist()):
                out[i] = r
        return out


def save_reward_head(model: nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> None:
    """Write the head (``reward_head.safetensors``) and ``reward.json`` beside a checkpoint."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    save_file({"weight": reward_head(model).weight.detach().to("cpu", torch.float32).contiguous()},
              str(out_dir / HEAD_FILE))
    (out_dir / META_FILE).write_text(json.dumps({"head": "scalar, last token", **meta}, indent=2) + "\n")


def load_reward_model(path: str | Path, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> RewardModel:
    """A reward model written by a ``finetune.method = "reward"`` run (its ``final/``)."""
    from safetensors.torch import load_file

    from llamalab.checkpoint import read_checkpoint
    from llamalab.checkpoint.base import build_model

    path = Path(path)
    head_file = path / HEAD_FILE
    if not head_file.is_file():
        raise FileNotFoundError(f"{path}: not a reward model (no {HEAD_FILE}; train one with "
                                f"llamalab finetune and finetune.method = \"reward\")")
    meta = json.loads((path / META_FILE).read_text()) if (path / META_FILE).is_file() else {}
    ckpt = read_checkpoint(str(path))
    model = build_model(ckpt, dtype=dtype, device=device).eval()
    head = attach_reward_head(model)
    w = load_file(str(head_file))["weight"]
    if tuple(w.shape) != (1, model.config.dim):
        raise ValueError(f"{head_file}: head of shape {tuple(w.shape)}, expected (1, {model.config.dim})")
    with torch.no_grad():
        head.weight.copy_(w)
    head.to(device=device, dtype=dtype)
    fmt = meta.get("chat_format")
    return RewardModel(model, ckpt.tokenizer, None if fmt in (None, "auto") else fmt, meta)


# ---------------------------------------------------------------- scoring JSONL responses


def parse_scoring_record(value: Any) -> dict[str, Any]:
    """What ``llamalab reward score`` reads from one record: ``{"prompt" | "messages", "response"}``
    (one response), ``{..., "chosen", "rejected"}`` (a pair, both scored) or ``{"messages"}`` ending
    with the assistant's turn. Returns ``{"prompt": messages, "responses": {key: text}}``."""
    if not isinstance(value, dict):
        raise RecordError(NOT_OBJECT, f"a JSON {type(value).__name__}")
    if "messages" in value:
        msgs = list(_messages(value["messages"]))
    elif isinstance(value.get("prompt"), str):
        msgs = [{"role": "user", "content": value["prompt"]}]
    else:
        raise RecordError(MISSING_FIELD, "'prompt' (a string) or 'messages'")
    keys = [k for k in ("response", "chosen", "rejected") if k in value]
    if not keys:
        if msgs[-1]["role"] != "assistant":
            raise RecordError(MISSING_FIELD, "'response', or 'chosen' and 'rejected', or messages ending with "
                                               "the assistant's turn")
        return {"prompt": msgs[:-1], "responses": {"reward": msgs[-1]["content"]}}
    if msgs[-1]["role"] != "user":
        raise RecordError(PROMPT_NOT_ENDING_WITH_USER, f"the last message is the {msgs[-1]['role']}'s")
    out = {}
    for k in keys:
        if not isinstance(value[k], str) or not value[k].strip():
            raise RecordError(WRONG_TYPE, f"{k!r} must be a non-empty string")
        out["reward" if k == "response" else f"reward_{k}"] = value[k]
    return {"prompt": msgs, "responses": out}


def score_jsonl(rm: RewardModel, paths: Sequence[str | Path], *, batch_size: int = 8,
                progress: Callable[[int, int], None] | None = None) -> tuple[list[dict[str, Any]], DataSummary]:
    """Every record of ``paths`` with its reward field(s) added (``reward``, or ``reward_chosen`` and
    ``reward_rejected``); bad records go to the summary with their line numbers."""
    summary = DataSummary()
    parsed: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for file, line, value in _iter_json_lines(paths, summary):
        try:
            parsed.append((value, parse_scoring_record(value)))
        except RecordError as e:
            summary.add(file, line, e.reason, e.detail)
    convs, where = [], []
    for i, (_, p) in enumerate(parsed):
        for key, text in p["responses"].items():
            convs.append([*p["prompt"], {"role": "assistant", "content": text}])
            where.append((i, key))
    scores: list[float] = []
    for k in range(0, len(convs), batch_size * 4):
        scores += rm.score(convs[k:k + batch_size * 4], batch_size=batch_size)
        if progress is not None:
            progress(len(scores), len(convs))
    out = [dict(v) for v, _ in parsed]
    for (i, key), s in zip(where, scores):
        out[i][key] = s
    return out, summary
