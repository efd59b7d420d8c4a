"""Training measurements: FLOPs per token, MFU, the ``metrics.jsonl`` trace and its plots.

FLOP accounting (PaLM, Chowdhery et al. 2022, appendix B): training costs, per token,

    6 * N  +  12 * n_layers * dim * seq_len

- ``N`` = the parameters that take part in a matrix multiply: every parameter except the
  input embedding table (a lookup), *including* the output head (``vocab * dim``; with tied
  embeddings the shared matrix is counted once, as the head). The RMSNorm gains are in N too
  (negligible). This is what torchtitan and nanoGPT count; "non-embedding" here means "not the
  input embedding".
- ``6 N``: 2 FLOPs per multiply-add in the forward pass, twice that in the backward pass.
- ``12 * n_layers * dim * seq_len``: the attention scores ``Q K^T`` and the weighted sum ``A V``
  (each ``2 * seq_len * dim`` per token forward, times 3 with backward), counted over the full
  ``seq_len`` x ``seq_len`` square as PaLM does -- no halving for the causal mask, no softmax.
  ``dim`` is ``n_heads * head_dim`` (the query width) also with grouped-query attention.

Activation recomputation is not counted (this is *model* FLOPs utilisation, not hardware).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from llamalab.config import ModelConfig

__all__ = ["PEAK_FLOPS", "MetricsWriter", "flops_per_token", "mfu", "plot_run", "read_metrics"]

METRICS_FILE = "metrics.jsonl"

# Peak dense FLOP/s to divide by; always say which one an MFU figure uses.
PEAK_FLOPS: dict[str, float] = {
    "cpu-dev-fp32-mkl": 200e9,      # the 2-core development machine, measured (shared/MACHINE-FACTS.md)
    "cpu-dev-fp32-onednn": 440e9,   # same machine, fp32 matmul through oneDNN
    "cpu-dev-bf16": 860e9,          # same machine, bf16 matmul (oneDNN, avx512_bf16)
    "cpu-avx2-fp32": 170e9,         # the 2-core AVX2-only EPYC, fp32 MKL matmul, quiet machine: 1024^3 172, 2048^3 156, 4096x288x768 164 GFLOP/s (74-106 when shared)
    "a100-bf16": 312e12,            # NVIDIA datasheet, dense
    "h100-sxm-bf16": 989e12,        # NVIDIA datasheet, dense (H200: the same compute)
}


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: ``6 N + 12 n_layers dim seq_len`` (see the module docstring)."""
    n_matmul = config.num_params(include_embeddings=False) + config.vocab_size * config.dim  # + output head
    return 6.0 * n_matmul + 12.0 * config.n_layers * config.n_heads * config.head_dim * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware's peak (0..1)."""
    return tokens_per_s * flops_per_token / peak_flops


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # tensors, numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/Inf; a non-finite value is logged as null
    return value


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl``; a torn last line (a crash mid-write) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class MetricsWriter:
    """Append one JSON object per line to ``run_dir/metrics.jsonl``, flushed as it is written.

    ``resume_step``: the step a run resumes from. Records with a larger ``step`` (written after
    that checkpoint by the run that crashed) are dropped first, so the trace has each step once.
    Without it an existing file is appended to as it is. Only one process (rank 0) should write.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, resume_step: int | None = None,
                 tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(run_dir) if not isinstance(r.get("step"), int) or r["step"] <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:  # the same numbers as scalars under run_dir/tensorboard (`tensorboard --logdir`)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("metrics.tensorboard = true needs the tensorboard package: "
                                  "pip install tensorboard") from e
            # purge_step: a resumed run's events after its checkpoint are hidden, as in metrics.jsonl
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step is not None else None)

    def log(self, step: int, **metrics: Any) -> dict[str, Any]:
        """Write ``{"step": step, "time": unix seconds, **metrics}``; returns the record."""
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=int(step), walltime=record["time"])
            self._tb.flush()
        return record

    def close(self) -> None:
        """Close the file (and the TensorBoard writer)."""
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def plot_run(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Draw ``loss.png`` (``loss`` and ``val_loss`` against step), ``lr.png`` (``lr``), for DPO
    runs ``reward_accuracy.png`` and ``reward_margin.png`` (train and held out), for reward
    models and PPO ``accuracy.png``, and for PPO ``ppo_reward``, ``ppo_kl``, ``ppo_losses``,
    ``ppo_clip``, ``ppo_entropy`` and ``ppo_response_len`` from ``metrics.jsonl``, into
    ``out_dir`` (default: ``run_dir/plots``); returns the files written.
    A plot whose metrics never appear is skipped."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend state, works headless
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{Path(run_dir) / METRICS_FILE}: no metrics to plot")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
        return [p[0] for p in pts], [p[1] for p in pts]

    written = []
    for name, keys, ylabel in [("loss", [("loss", "train"), ("val_loss", "validation")], "loss (nats)"),
                               ("lr", [("lr", "learning rate")], "learning rate"),
                               # DPO runs (finetune/objectives.py): the implicit rewards' accuracy and margin
                               ("reward_accuracy", [("reward_accuracy", "train"),
                                                    ("val_reward_accuracy", "held out")], "chosen > rejected"),
                               ("reward_margin", [("reward_margin", "train"), ("val_reward_margin", "held out")],
                                "reward margin (chosen - rejected)"),
                               # reward models (share of pairs ranked right) and PPO (answers checked)
                               ("accuracy", [("accuracy", "train"), ("rollout_accuracy", "rollouts (sampled)"),
                                             ("val_accuracy", "held out")], "accuracy"),
                               # PPO runs (finetune/ppo_loop.py): per iteration, and held out
                               ("ppo_reward", [("rollout_score", "rollouts (sampled)"), ("val_reward", "held out")],
                                "reward score"),
                               ("ppo_kl", [("rollout_kl", "rollouts (sampled)"), ("val_kl", "held out")],
                                "KL(policy || reference) per answer (nats)"),
                               ("ppo_losses", [("policy_loss", "policy (clipped surrogate)"),
                                               ("value_loss", "value")], "loss"),
                               ("ppo_clip", [("clip_fraction", "clip fraction"), ("approx_kl", "approx. KL to the "
                                                                                  "rollout policy")], "share / nats"),
                               ("ppo_entropy", [("rollout_entropy", "rollouts")], "entropy per token (nats)"),
                               ("ppo_response_len", [("rollout_response_len", "rollouts (sampled)"),
                                                     ("val_response_len", "held out")], "answer tokens")]:
        lines = [(series(k), label) for k, label in keys]
        if not any(xs for (xs, _), _ in lines):
            continue
        fig = Figure(figsize=(7, 4), dpi=100)
        ax = fig.add_subplot()
        for (xs, ys), label in lines:
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if label in ("validation", "held out") else None,
                        markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{Path(run_dir).name}: {name}")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        written.append(path)
    path = _plot_schedule(records, out, Path(run_dir).name, Figure)
    if path is not None:
        written.append(path)
    return written


def _plot_schedule(records: list[dict[str, Any]], out: Path, title: str, figure: Any) -> Path | None:
    """``schedule.png`` for a staged run (Llama 3): lr, batch, length, RoPE and each source's share
    against the tokens seen, one panel each; None when nothing but the lr changes."""
    recs = [r for r in records if isinstance(r.get("batch_tokens"), int) and "tokens_seen" in r]
    if len({(r["batch_tokens"], r.get("seq_len"), r.get("rope_theta"), r.get("rope_factor")) for r in recs}) < 2:
        return None
    x = [r["tokens_seen"] - r["batch_tokens"] for r in recs]  # where each step begins
    mixes = sorted({k for r in recs for k in r if k.startswith("mix_")})
    panels = [("learning rate", [("lr", "lr")]), ("batch (tokens)", [("batch_tokens", "batch")]),
              ("sequence length", [("seq_len", "seq_len")]),
              ("RoPE base", [("rope_theta", "base"), ("rope_factor", "scaling factor")])]
    if mixes:
        panels.append(("share of sequences", [(k, k[4:]) for k in mixes]))
    fig = figure(figsize=(7, 2 * len(panels)), dpi=100)
    axes = fig.subplots(len(panels), 1, sharex=True)
    for ax, (ylabel, keys) in zip(axes, panels):
        for key, label in keys:
            ys = [r.get(key, float("nan")) for r in recs]
            if key == "rope_factor":  # its own axis, dashed: it changes where the base often does
                twin = ax.twinx()
                twin.step(x, ys, where="post", color="C1", linestyle="--")
                twin.set_ylabel("scaling factor (dashed)", color="C1")
            else:
                ax.step(x, ys, where="post", label=label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(keys) > 1 and keys[1][0] != "rope_factor":
            ax.legend(fontsize=8)
    axes[-1].set_xlabel("tokens seen")
    axes[0].set_title(f"{title}: schedule")
    fig.tight_layout()
    path = out / "schedule.png"
    fig.savefig(path)
    return path
