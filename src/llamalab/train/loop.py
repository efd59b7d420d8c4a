"""The pretraining loop: ``train(cfg)`` runs a :class:`~llamalab.train.config.TrainConfig` to the end.

One step, as LLaMA trains (Touvron et al. 2023a, §2.2)::

    for each of grad_accum micro-batches:            # global_batch_tokens / (seq_len * micro * world)
        tokens, doc_ids = next(loader)               # (micro, seq_len + 1), a seeded mixture of shards
        h = model.hidden_states(tokens[:, :-1], doc_ids=...)  # bf16 autocast if train.precision = "bf16"
        loss = cross_entropy(h @ output.T, tokens[:, 1:])     # mean over the micro-batch's tokens,
                                                              # fused and chunked (train/loss.py)
        (loss / grad_accum).backward()
    norm = clip_grad_norm(params, 1.0)               # global L2 norm, before clipping
    if loss and norm are finite: AdamW step          # else: skip, zero the gradients, count it
    lr schedule step (warmup + cosine)

Around it: Llama 3-style stages (batch, length, RoPE base and mixture change at token counts;
the loader and the RoPE table are rebuilt when a stage begins), validation loss on held-out
shards, one ``metrics.jsonl`` record per step, atomic checkpoints every N steps (weights,
AdamW, schedule, loader position, RNG states) and automatic resume from the newest one,
SIGTERM -> checkpoint and a clean exit, and at the end the model exported as a native
checkpoint (``RUN_DIR/final``, with the tokenizer) that ``llamalab generate`` reads.

Everything that can be checked is checked before any compute: the config (``ConfigError``), the
shards (``DataError``: missing, too short, mixed tokenizers) and the vocabulary (shards or
tokenizer with more ids than the model). Run it in one process (``llamalab pretrain``) or in
several (``torchrun ... -m llamalab.cli pretrain``: FSDP2 over the processes).
"""

from __future__ import annotations

import glob
import math
import os
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llamalab.checkpoint.native import load_weights
from llamalab.config import ModelConfig
from llamalab.data import DataError, MixtureLoader, eval_batches, find_shards, read_shard
from llamalab.model import Transformer
from llamalab.precision import cpu_flags, resolve_precision
from llamalab.train.config import ConfigError, StageSettings, TrainConfig
from llamalab.train.objective import Objective, StepBatches
from llamalab.train.metrics import PEAK_FLOPS, MetricsWriter, flops_per_token, mfu, read_metrics
from llamalab.train.optim import build_optimizer, build_scheduler, clip_grad_norm
from llamalab.allocator import reuse_freed_memory
from llamalab.train.loss import linear_cross_entropy
from llamalab.train.speed import onednn_mm_t, resolve_onednn_linear, use_matmul_attention, use_onednn_linear
from llamalab.train.parallelize import (
    all_reduce_mean,
    build_mesh,
    clip_grad_norm_,
    full_tensor_init,
    data_parallel_rank_and_size,
    device_type,
    export_full_state_dict,
    init_distributed,
    load_sharded,
    parallelize,
    save_sharded,
)
from llamalab.train.state import (
    STATE_FILE,
    _rng_state,
    _set_rng_state,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)

__all__ = ["PretrainObjective", "TrainingError", "export_native", "format_summary", "resolve_shards", "run", "train",
           "unigram_entropy"]


class TrainingError(RuntimeError):
    """The run stopped on its own (non-finite losses): the message says why and what is intact."""


# ---------------------------------------------------------------- data, checked before compute


def resolve_shards(pattern: str, key: str) -> list[Path]:
    """The shards a config entry names: a glob (``data/web/*.json``; any of a shard's three files
    matches), a directory (every shard in it) or one shard. DataError naming ``key`` if none."""
    if glob.has_magic(pattern):
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise DataError(f"{key}={pattern!r}: no files match; expected token shards (llamalab tokenize)")
        candidates = [m for m in matches if Path(m).is_dir() or m.endswith((".json", ".tokens", ".docs.npy"))]
        if not candidates:
            raise DataError(f"{key}={pattern!r}: matches {matches[0]} ...; expected token shards "
                            f"(NAME.json + NAME.tokens + NAME.docs.npy)")
        paths = find_shards(candidates)
    else:
        if not Path(pattern).exists() and not Path(pattern + ".json").exists():
            raise DataError(f"{key}={pattern!r}: no such file or directory; expected token shards "
                            f"(llamalab tokenize)")
        paths = find_shards(pattern)
    for p in paths:
        read_shard(p)  # raises DataError naming the file
    return paths


def unigram_entropy(paths: list[Path]) -> float:
    """Entropy (nats) of the token distribution of ``paths``: the loss of the best model that
    ignores context (fitted on these very tokens), the baseline a language model must beat."""
    shards = [read_shard(p) for p in paths]
    if not shards:
        return float("nan")
    counts = np.zeros(max(s.vocab_size for s in shards), dtype=np.int64)
    for shard in shards:
        c = np.bincount(np.asarray(shard.tokens), minlength=len(counts))
        counts[: len(c)] += c[: len(counts)]
    if counts.sum() == 0:
        return float("nan")
    prob = counts[counts > 0] / counts.sum()
    return float(-(prob * np.log(prob)).sum())


@dataclass
class _Data:
    sources: dict[str, list[Path]]
    val: list[Path] | None
    vocab_size: int
    tokenizer_path: Path | None
    unigram: float | None = None
    notes: list[str] = field(default_factory=list)


def _tokenizer_file_from_meta(meta: dict[str, Any]) -> Path | None:
    name = str((meta.get("tokenizer") or {}).get("name") or "")
    if ":" in name:
        path = Path(name.split(":", 1)[1])
        if path.is_file():
            return path
    return None


def _preflight(cfg: TrainConfig, model_cfg: ModelConfig) -> _Data:
    """Resolve and check every shard, the vocabulary and the tokenizer; raise before any compute."""
    if not cfg.data.sources:
        raise ConfigError("data.sources: no training data; add [data.sources.NAME] with shards = \"DIR/*.json\"")
    sources = {name: resolve_shards(src.shards, f"data.sources.{name}.shards")
               for name, src in cfg.data.sources.items()}
    val = resolve_shards(cfg.data.val_shards, "data.val_shards") if cfg.data.val_shards else None
    metas = [(p, read_shard(p).meta) for paths in [*sources.values(), val or []] for p in paths]
    hashes = {(m.get("tokenizer") or {}).get("sha256") for _, m in metas} - {None}
    if len(hashes) > 1:
        raise DataError(f"{metas[0][0]}: the training and validation shards were written by different tokenizers "
                        f"({len(hashes)} distinct); expected one tokenizer throughout")
    vocab = max(int(m["vocab_size"]) for _, m in metas)
    for p, m in metas:
        if int(m["vocab_size"]) > model_cfg.vocab_size:
            tok = (m.get("tokenizer") or {}).get("name", "?")
            raise ConfigError(f"{p}: the shards' tokenizer ({tok}) has vocab_size {m['vocab_size']} but the model "
                              f"has vocab_size {model_cfg.vocab_size}; set model.overrides.vocab_size = "
                              f"{m['vocab_size']} (or re-tokenize)")
    tok_path: Path | None = None
    if cfg.data.tokenizer:
        tok_path = Path(cfg.data.tokenizer)
        if not tok_path.exists():
            raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: no such file")
    else:
        tok_path = _tokenizer_file_from_meta(metas[0][1])
    if tok_path is not None:
        from llamalab.data import tokenizer_identity
        from llamalab.tokenizer import load_tokenizer

        tok = load_tokenizer(tok_path)
        if tok.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"{tok_path}: the tokenizer has {tok.vocab_size} tokens but the model has vocab_size "
                              f"{model_cfg.vocab_size}; set model.overrides.vocab_size = {tok.vocab_size}")
        sha = tokenizer_identity(tok).get("sha256")
        if hashes and sha is not None and sha not in hashes:
            if cfg.data.tokenizer:
                raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r}: not the tokenizer the shards were "
                                  f"written with (sha256 differs)")
            tok_path = None  # the file named in the metadata has changed since: do not ship it
    data = _Data(sources=sources, val=val, vocab_size=vocab, tokenizer_path=tok_path)
    stages = cfg.resolved_stages()
    for st in stages:  # every stage's loader can be built (enough tokens for its seq_len)
        _make_loader(cfg, data, st, 0, 1)
    if val is not None:
        n_val = sum(read_shard(p).n_tokens for p in val)
        longest = max(st.seq_len for st in stages)
        if n_val < longest + 1:
            raise DataError(f"data.val_shards={cfg.data.val_shards!r}: {n_val} tokens; expected at least "
                            f"seq_len + 1 = {longest + 1}")
        data.unigram = unigram_entropy(val)
    return data


def _make_loader(cfg: TrainConfig, data: _Data, stage: StageSettings, rank: int, world_size: int) -> MixtureLoader:
    sources = {name: (data.sources[name], w) for name, w in stage.mixture.items() if w > 0}
    # Each stage draws its own seeded order (its seq_len differs, so it cannot continue the last one's).
    return MixtureLoader(sources, seq_len=stage.seq_len, batch_size=stage.micro_batch_size,
                         seed=cfg.seed + stage.index, rank=rank, world_size=world_size)


# ---------------------------------------------------------------- small helpers


def _peak(cfg: TrainConfig, device: torch.device, precision: str) -> tuple[str | None, float | None]:
    name = cfg.train.peak_flops
    if name == "auto":
        if device.type == "cuda":
            gpu = torch.cuda.get_device_name(device)
            name = "h100-sxm-bf16" if ("H100" in gpu or "H200" in gpu) else "a100-bf16" if "A100" in gpu else None
        else:
            onednn = resolve_onednn_linear(cfg.train.onednn_linear, device) and not dist.is_initialized()
            fp32 = "cpu-dev-fp32-onednn" if onednn else "cpu-dev-fp32-mkl"
            if "avx512f" not in cpu_flags():  # the peaks above are the AVX-512 machine's
                fp32 = "cpu-avx2-fp32"
            name = "cpu-dev-bf16" if precision == "bf16" else fp32
    return name, (PEAK_FLOPS[name] if name else None)


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak, KiB on Linux


def _peak_rss_mb() -> float:
    """The process's largest resident set so far (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _NoBar:
    """Stand-in for tqdm when it is missing or the bar is off: prints a line every few steps."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str) -> None:
        if self.enabled:
            print(f"step {self.n}: {text}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, total: int, initial: int, label: str = "pretrain") -> Any:
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                        desc=label)
        except ImportError:
            pass
    return _NoBar(enabled)


class _SigtermFlag:
    """Set by SIGTERM (a scheduler's preemption notice); the loop checks it between steps."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> "_SigtermFlag":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption support
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _any_rank(flag: bool, device: torch.device) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# ---------------------------------------------------------------- checkpoints (1 or N processes)


def _save(run_dir: Path, step: int, model: nn.Module, optimizer: Any, scheduler: Any, objective: Objective,
          extra: dict[str, Any], keep_last: int, distributed: bool, keep_from: int | None = None) -> Path:
    if not distributed:
        return save_checkpoint(run_dir, step, model, optimizer, scheduler, objective.data_state(), extra, keep_last,
                               weights=objective.checkpoint_weights(model), keep_from=keep_from)
    # N processes: DCP shards of model and optimizer, one RNG file per rank, then rank 0 seals it.
    import json

    rank = dist.get_rank()
    dst = checkpoint_dir(run_dir, step)
    tmp = dst.with_name(f".{dst.name}.tmp-dist")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    # Only what trains: frozen parameters (LoRA's base) are rebuilt from the starting weights at resume.
    save_sharded(tmp / "dcp", model, optimizer, extra={"step": step}, trainable_only=True)
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        torch.save({"scheduler": scheduler.state_dict(), "loader": objective.data_state(), "step": step},
                   tmp / "trainer.pt")
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "time": time.time(), "extra": extra}, indent=2))
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
        if keep_last > 0:
            for old_step, old in list_checkpoints(run_dir)[:-keep_last]:
                if keep_from is None or old_step < keep_from:
                    shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return dst


def _load(path: Path, model: nn.Module, optimizer: Any, scheduler: Any, objective: Objective,
          distributed: bool) -> tuple[int, dict[str, Any], dict[str, Any]]:
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        if distributed:
            raise TrainingError(f"{path}: a single-process checkpoint; resuming it on several processes is not "
                                f"supported (resume with one process, or start a new run_dir)")
        return load_checkpoint(path, model, optimizer, scheduler, apply_weights=objective.load_weights)
    import json

    load_sharded(path / "dcp", model, optimizer, trainable_only=True)
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng = path / f"rng-rank{rank}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    meta = json.loads((path / STATE_FILE).read_text())
    return int(meta["step"]), trainer["loader"], meta["extra"]


def export_native(run_dir: Path, model: nn.Module, tokenizer: Any, distributed: bool, *,
                  name: str = "final", source_format: str = "llamalab-train") -> Path | None:
    """``run_dir/NAME``: a native checkpoint (fp32 weights, config, tokenizer) for generate/convert/eval.

    ``tokenizer``: a loaded tokenizer, a path to one, or None. With FSDP every rank gathers and
    rank 0 writes (the others return None)."""
    from llamalab.checkpoint import write_checkpoint
    from llamalab.checkpoint.base import Checkpoint

    state = export_full_state_dict(model) if distributed else model.state_dict()
    if distributed and dist.get_rank() != 0:
        return None
    if isinstance(tokenizer, (str, os.PathLike)):
        from llamalab.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    ckpt = Checkpoint(config=model.config, state_dict=state, tokenizer=tokenizer, format=source_format,
                      path=run_dir)
    dst = run_dir / name
    if dst.exists():
        shutil.rmtree(dst)
    return write_checkpoint(ckpt, dst, to="native")


def _replace_dir(src: Path, dst: Path, distributed: bool) -> None:
    """Rename ``src`` to ``dst`` (rank 0), replacing it."""
    if not distributed or dist.get_rank() == 0:
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(src, dst)
    if distributed:
        dist.barrier()


@torch.no_grad()
def average_into(model: nn.Module, paths: list[Path], objective: Objective, distributed: bool) -> None:
    """Set ``model``'s parameters to the uniform mean of the training checkpoints ``paths``
    (Polyak averaging, as Llama 3 §3.4.3 makes its final model from the anneal's checkpoints).

    Each checkpoint is loaded into the model (one layout for one process and for FSDP shards) and
    folded into a running mean kept in float64 (float32 under FSDP, to halve the extra memory), so
    only one checkpoint's weights and the mean are held at a time."""
    if not paths:
        raise TrainingError("checkpoint averaging: no checkpoints of the anneal to average")
    params = dict(model.named_parameters())
    mean: dict[str, Tensor] = {}
    for k, path in enumerate(paths, start=1):
        if distributed:
            load_sharded(path / "dcp", model)
        else:
            weights, _files = load_weights(path)
            if model.config.tie_embeddings and "tok_embeddings.weight" in weights:
                weights.setdefault("output.weight", weights["tok_embeddings.weight"])
            objective.load_weights(model, weights, str(path))
        for name, p in params.items():
            x = p.detach().to(torch.float32 if distributed else torch.float64)
            if k == 1:
                mean[name] = x.clone()
            else:
                mean[name] += (x - mean[name]) / k
    for name, p in params.items():
        p.copy_(mean[name].to(p.dtype))


# ---------------------------------------------------------------- pretraining as an objective


def _set_rope(model: Transformer, stage: StageSettings, device: torch.device) -> bool:
    """Give the model the stage's RoPE base and scaling (the rotary table is rebuilt; no weight changes)."""
    if model.config.rope_theta == stage.rope_theta and model.config.rope_scaling == stage.rope_scaling:
        return False
    model.config = model.config.replace(rope_theta=stage.rope_theta, rope_scaling=stage.rope_scaling)
    model.init_buffers(device)
    return True


@torch.no_grad()
def _evaluate(model: Transformer, data: _Data, stage: StageSettings, cfg: TrainConfig, device: torch.device,
              autocast: Any, dp_rank: int, dp_size: int) -> float:
    """Mean cross-entropy per token over ``eval.batches`` fixed held-out micro-batches (all ranks)."""
    model.eval()
    batches = list(eval_batches(data.val, stage.seq_len, stage.micro_batch_size, cfg.eval.batches,
                                rank=dp_rank, world_size=dp_size))
    n = len(batches)
    if dist.is_initialized() and dp_size > 1:  # FSDP needs the same number of forwards on every rank
        t = torch.tensor([n], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        n = int(t.item())
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for tokens, doc_ids in batches[:n]:
        tokens = tokens.to(device)
        docs = doc_ids[:, :-1].to(device) if cfg.train.document_mask else None
        with autocast():
            logits = model(tokens[:, :-1], doc_ids=docs)
        total += F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum").double()
        count += tokens[:, 1:].numel()
    if dist.is_initialized() and dp_size > 1:
        dist.all_reduce(total)
        dist.all_reduce(count)
    model.train()
    return float(total / count)


class PretrainObjective(Objective):
    """Next-token prediction on a seeded mixture of token shards, in Llama 3-style stages."""

    name = "pretrain"

    def __init__(self, cfg: TrainConfig, world_size: int = 1) -> None:
        self.cfg = cfg
        self.model_cfg = cfg.model_config()
        self.data = _preflight(cfg, self.model_cfg)  # raises before any compute
        self.distributed = world_size > 1
        self._loader_state: dict[str, Any] | None = None
        self._saved_stage = 0

    @property
    def total_steps(self) -> int:
        return self.cfg.train.total_steps

    def build_model(self, device: torch.device, precision: str, mesh: Any) -> nn.Module:
        cfg, t = self.cfg, self.cfg.train
        if mesh is not None:
            with torch.device("meta"):
                model = Transformer(self.model_cfg)
            parallelize(model, mesh, dp_shard=True, tp=t.tensor_parallel > 1,
                        mixed_precision="bf16" if precision == "bf16" else "fp32",
                        activation_checkpointing=t.activation_checkpointing, compile=t.compile)
            model.to_empty(device=device)
            torch.manual_seed(cfg.seed)
            with full_tensor_init():  # the very weights of the 1-process run, whatever the layout
                model.init_weights()
            model.init_buffers(device)
            return model
        with torch.device(device):
            model = Transformer(self.model_cfg)
        torch.manual_seed(cfg.seed)  # as above: the weights do not depend on what construction drew
        model.init_weights()
        if t.activation_checkpointing != "none" or t.compile:
            parallelize(model, None, dp_shard=False, activation_checkpointing=t.activation_checkpointing,
                        compile=t.compile)
        return model

    def load_data_state(self, state: dict[str, Any] | None, extra: dict[str, Any]) -> None:
        self._loader_state = state
        self._saved_stage = int(extra.get("stage", 0))

    def start(self, model: nn.Module, device: torch.device, tokens_seen: int, dp_rank: int, dp_size: int,
              extra: dict[str, Any], autocast: Any = None) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.device, self.dp_rank, self.dp_size = device, dp_rank, dp_size
        self.stage = cfg.stage_at(tokens_seen)
        self.loader = _make_loader(cfg, self.data, self.stage, dp_rank, dp_size)
        if self._loader_state is not None and self._saved_stage == self.stage.index:
            self.loader.load_state_dict(self._loader_state)
        _set_rope(model, self.stage, device)
        self.model = model
        # The fused head + loss calls the model's trunk directly, which FSDP's hooks on forward() would
        # not see: sharded runs keep the plain head and F.cross_entropy.
        self.fused_loss = t.fused_loss and not self.distributed
        self.mm_t = onednn_mm_t if getattr(model, "_onednn_linear", False) else None

    def step_batches(self, tokens_seen: int, say: Any) -> StepBatches:
        new_stage = self.cfg.stage_at(tokens_seen)
        if new_stage.index != self.stage.index:
            self.stage = st = new_stage
            self.loader = _make_loader(self.cfg, self.data, st, self.dp_rank, self.dp_size)
            _set_rope(self.model, st, self.device)
            say(f"pretrain: stage {st.index}{' (anneal)' if st.anneal else ''} from {tokens_seen:,} tokens: batch "
                f"{st.global_batch_tokens:,} tokens, seq_len {st.seq_len}, rope_theta {st.rope_theta:g}"
                + (f", rope scaling x{st.rope_scaling.factor:g}" if st.rope_scaling else "")
                + f", mixture {st.mixture}")
        accum = self.stage.grad_accum_steps(self.dp_size)
        before = list(self.loader.taken)
        items = [(next(self.loader), 1.0 / accum) for _ in range(accum)]
        # Every rank plans the whole global batch, so these shares are the step's, not this rank's.
        drawn = [a - b for a, b in zip(self.loader.taken, before)]
        self._shares = {f"mix_{n}": d / max(sum(drawn), 1) for n, d in zip(self.loader.names, drawn)}
        return StepBatches(items, self.stage.global_batch_tokens, self.stage.seq_len)

    def step_figures(self) -> dict[str, float]:
        return dict(getattr(self, "_shares", {}))

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        tokens, doc_ids = batch
        tokens = tokens.to(self.device, non_blocking=True)
        docs = doc_ids[:, :-1].to(self.device, non_blocking=True) if self.cfg.train.document_mask else None
        if self.fused_loss:
            return linear_cross_entropy(model.hidden_states(tokens[:, :-1], doc_ids=docs), model.output.weight,
                                        tokens[:, 1:], mm_t=self.mm_t), {}
        logits = model(tokens[:, :-1], doc_ids=docs)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()), {}

    def evaluate(self, model: nn.Module, autocast: Any) -> dict[str, float] | None:
        if self.data.val is None:
            return None
        return {"val_loss": _evaluate(model, self.data, self.stage, self.cfg, self.device, autocast,
                                      self.dp_rank, self.dp_size)}

    def data_state(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def checkpoint_extra(self, model: nn.Module) -> dict[str, Any]:
        scaling = model.config.rope_scaling
        return {"stage": self.stage.index, "rope_theta": model.config.rope_theta,
                "rope_factor": scaling.factor if scaling is not None else 1.0}

    def flops_per_token(self, model: nn.Module, seq_len: int) -> float | None:
        return flops_per_token(model.config, seq_len)

    def describe(self) -> list[str]:
        if self.data.unigram is None:
            return []
        return [f"pretrain: validation unigram entropy (the no-context baseline) {self.data.unigram:.3f} nats"]

    def export(self, run_dir: Path, model: nn.Module, distributed: bool) -> Path | None:
        return export_native(run_dir, model, self.data.tokenizer_path, distributed)

    def summary(self) -> dict[str, Any]:
        return {"unigram_entropy": self.data.unigram}


# ---------------------------------------------------------------- the loop


def train(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the pretraining run ``cfg`` to ``train.total_steps``; return a summary dict.

    Raises ConfigError / DataError before any compute for a bad config or data, and TrainingError
    when ``train.max_nonfinite_steps`` non-finite steps in a row stop the run (the last
    checkpoint is left as it was). A SIGTERM saves a checkpoint and returns (status "preempted").
    """
    _rank, world_size, _local = init_distributed()
    cfg.validate(world_size)
    return run(cfg, PretrainObjective(cfg, world_size), progress=progress)


def run(cfg: TrainConfig, objective: Objective, *, progress: bool = True) -> dict[str, Any]:
    """The training loop shared by every objective: run (or resume) ``cfg`` for
    ``objective.total_steps`` optimizer steps; return a summary dict (see :func:`train`)."""
    wall0 = time.perf_counter()
    rank, world_size, local_rank = init_distributed()
    distributed = world_size > 1
    main = rank == 0
    run_dir = Path(cfg.run_dir)
    t = cfg.train
    label = objective.name
    total_steps = objective.total_steps

    def say(msg: str) -> None:
        if main:
            bar.write(msg) if bar is not None else print(msg, file=sys.stderr, flush=True)

    bar = None
    if device_type() == "cuda":
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")

    if t.reuse_freed_memory and device.type == "cpu":
        reuse_freed_memory()
    # "auto": bf16 where the device multiplies it natively, else fp32 (an AVX2-only CPU emulates
    # bf16 matrix products ~50x slower than fp32); the config keeps "auto", so a resumed run
    # picks again on the machine it resumes on.
    precision = resolve_precision(t.precision, device, what="training")

    # -- the model: built (parallelized, initialised or loaded) by the objective
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    mesh = build_mesh(world_size, tp=t.tensor_parallel) if distributed else None
    model = objective.build_model(device, precision, mesh)
    model.train()
    for m in model.modules():  # the Transformer inside any wrapper (reward/value heads, FSDP)
        if hasattr(m, "document_attention"):
            m.document_attention = "dense" if t.document_attention == "auto" and t.compile else t.document_attention
    dp_rank, dp_size = data_parallel_rank_and_size(mesh)
    # bf16: autocast in one process; with FSDP2 its mixed-precision policy casts the parameters instead.
    use_autocast = precision == "bf16" and not distributed

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else nullcontext()

    def no_autocast() -> Any:
        return torch.autocast(device.type, enabled=False) if use_autocast else nullcontext()

    o = cfg.optim
    optimizer = build_optimizer(model, o.lr, o.betas, o.weight_decay, o.eps, o.fused,
                                decay_embeddings=o.decay_embeddings)
    anneal_steps = cfg.anneal_steps()
    scheduler = build_scheduler(optimizer, warmup_steps=o.warmup_for(total_steps), total_steps=total_steps,
                                min_lr_ratio=o.min_lr_ratio, schedule=o.schedule, anneal_steps=anneal_steps)
    # Checkpoint averaging (Llama 3): the anneal's checkpoints are saved more often and never pruned.
    anneal_from = total_steps - anneal_steps if anneal_steps else None
    averaging = cfg.checkpoint.average_anneal and anneal_from is not None
    anneal_every = cfg.checkpoint.anneal_every or cfg.checkpoint.every
    keep_from = anneal_from + 1 if averaging else None

    # -- resume
    step, tokens_seen, skipped, in_a_row = 0, 0, 0, 0
    extra: dict[str, Any] = {}
    if main:
        for stale in (run_dir / "checkpoints").glob(".step-*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
    if distributed:
        dist.barrier()
    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None:
        step, loader_state, extra = _load(resume_from, model, optimizer, scheduler, objective, distributed)
        tokens_seen = int(extra.get("tokens_seen", 0))
        skipped = int(extra.get("skipped_nonfinite", 0))
        objective.load_data_state(loader_state, extra)
    start_step = step

    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_params = sum(p.numel() for p in model.parameters())
    if distributed:
        n_params = n_trainable = model.config.num_params()
    peak_name, peak = _peak(cfg, device, precision)
    metrics = MetricsWriter(run_dir, resume_step=step, tensorboard=t.tensorboard) if main else None
    bar = _progress_bar(progress and main, total_steps, step, label)
    onednn = resolve_onednn_linear(t.onednn_linear, device) and not distributed
    say(f"{label}: {model.config.n_layers} layers, dim {model.config.dim}, {n_params / 1e6:.1f}M parameters"
        + (f" ({n_trainable / 1e6:.2f}M trained)" if n_trainable != n_params else "")
        + f", {world_size} process(es) on {device.type}, {precision}"
        + (f" (precision auto: {'native bf16' if precision == 'bf16' else 'no native bf16 here'})"
           if t.precision == "auto" else "")
        + (f", fp32 GEMMs in {'oneDNN' if onednn else 'MKL'}" if precision == "fp32" and device.type == "cpu" else "")
        + f"; run_dir {run_dir}"
        + (f"; resuming from {resume_from} (step {step})" if resume_from is not None else ""))
    for line in objective.describe():
        say(line)

    if onednn and use_onednn_linear(model):
        model._onednn_linear = True  # the fused loss's head products in oneDNN too
    if t.matmul_attention and device.type == "cpu":
        use_matmul_attention(model)  # (it keeps SDPA itself in fp32)
    objective.start(model, device, tokens_seen, dp_rank, dp_size, extra, autocast)
    inject = set(t.inject_nonfinite_at)
    last_saved = step if resume_from is not None else -1
    last_loss = last_val = float("nan")
    last_eval: dict[str, float] = {}
    if main:  # the figures a resumed (or already complete) run starts from
        for rec in read_metrics(run_dir):
            if isinstance(rec.get("loss"), float):
                last_loss = rec["loss"]
            if isinstance(rec.get("val_loss"), float):
                last_val = rec["val_loss"]
                last_eval = {k: v for k, v in rec.items() if k.startswith("val_") and isinstance(v, float)}
    start_eval: dict[str, float] | None = None
    if cfg.eval.at_start and cfg.eval.batches and step == 0:
        start_eval = objective.evaluate(model, autocast)
        if start_eval and metrics is not None:
            metrics.log(0, **start_eval)
            say(f"{label}: before training: " + ", ".join(f"{k} {v:.4f}" for k, v in start_eval.items()))
    elif cfg.eval.at_start and main:
        start_eval = next((r for r in read_metrics(run_dir) if r.get("step") == 0), None)
        if start_eval is not None:
            start_eval = {k: v for k, v in start_eval.items() if k.startswith("val_")}
    session_tokens, session_time = 0, 0.0
    seq_len = t.seq_len
    status = "completed" if step < total_steps else "already complete"
    extra_of = lambda: {"tokens_seen": tokens_seen, "skipped_nonfinite": skipped,  # noqa: E731
                        **objective.checkpoint_extra(model), "config": cfg.to_dict()}
    try:
        with _SigtermFlag() as sigterm:
            while step < total_steps:
                if _any_rank(sigterm.raised, device):
                    path = _save(run_dir, step, model, optimizer, scheduler, objective, extra_of(),
                                 cfg.checkpoint.keep_last, distributed, keep_from) if last_saved != step else \
                        checkpoint_dir(run_dir, step)
                    say(f"{label}: SIGTERM: saved checkpoint {path} (step {step}); exiting. Run the same "
                        f"command to resume.")
                    status = "preempted"
                    break

                reason = objective.stop_reason()
                if reason:
                    say(f"{label}: stopping early at step {step}: {reason}")
                    status = "stopped early" if step > start_step or resume_from is None else "already stopped early"
                    break

                t0 = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                plan = objective.step_batches(tokens_seen, say)
                seq_len = plan.seq_len
                loss_sum = torch.zeros((), device=device)
                stat_sums: dict[str, Tensor] = {}
                # One autocast region around the step's micro-batches: autocast keeps its bf16 casts of
                # the trained weights until the outermost region ends, so they are made once a step
                # (the weights change only at optimizer.step) instead of once a micro-batch. Backward
                # runs outside autocast, as it would after each micro-batch's own region.
                with autocast():
                    for micro, (batch, weight) in enumerate(plan.items):
                        if distributed:
                            model.set_requires_gradient_sync(micro == len(plan.items) - 1)
                        with autocast():
                            loss, stats = objective.loss(model, batch)
                        if step + 1 in inject:
                            loss = loss * float("nan")
                        with no_autocast():
                            (loss * weight).backward()
                            loss_sum += loss.detach().float() * weight
                            for k, v in stats.items():
                                stat_sums[k] = stat_sums.get(k, 0.0) + v.detach().float() * weight
                train_loss = all_reduce_mean(loss_sum)
                # Each process logged its share of the step's figures (weighted as its loss): average them.
                stat_sums = {k: all_reduce_mean(v) for k, v in stat_sums.items()}
                if distributed:
                    grad_norm = clip_grad_norm_(model.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf"))
                else:
                    grad_norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], o.grad_clip)
                finite = bool(torch.isfinite(train_loss) and torch.isfinite(grad_norm))
                if finite:
                    optimizer.step()
                    in_a_row = 0
                else:  # skip: the weights and AdamW moments stay as they were
                    skipped += 1
                    in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                tokens_seen += plan.tokens
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                session_tokens += plan.tokens
                session_time += dt
                tok_s = plan.tokens / dt
                fpt = objective.flops_per_token(model, plan.seq_len)
                step_mfu = mfu(tok_s, fpt, peak * world_size) if (peak and fpt) else None
                last_loss = float(train_loss) if finite else last_loss

                val = None
                if cfg.eval.every and cfg.eval.batches and (step % cfg.eval.every == 0 or step == total_steps):
                    val = objective.evaluate(model, autocast)
                    if val:
                        last_eval = val
                        last_val = val.get("val_loss", last_val)

                if metrics is not None:
                    record: dict[str, Any] = {
                        "loss": float(train_loss), "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                        "mfu": step_mfu, "tokens_seen": tokens_seen, **objective.checkpoint_extra(model),
                        "skipped_nonfinite": skipped, "rss_mb": round(_rss_mb(), 1),
                        "peak_rss_mb": round(_peak_rss_mb(), 1)}
                    record.update(batch_tokens=plan.tokens, seq_len=plan.seq_len, **objective.step_figures())
                    record.update({k: float(v) for k, v in stat_sums.items()})
                    if device.type == "cuda":
                        record["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                    if val:
                        record.update(val)
                    metrics.log(step, **record)
                bar.update(1)
                if step % t.log_every == 0 or step == total_steps or val:
                    text = f"loss {last_loss:.3f}"
                    if not math.isnan(last_val):
                        text += f" val {last_val:.3f}"
                    text += f" lr {lr:.2e} {tok_s:,.0f} tok/s"
                    if step_mfu is not None:
                        text += f" mfu {step_mfu:.1%}"
                    bar.set_postfix_str(text)

                if not finite:
                    say(f"{label}: step {step}: non-finite loss ({float(train_loss)}) or gradient norm "
                        f"({float(grad_norm)}); update skipped ({in_a_row} in a row, {skipped} in all)")
                    if t.max_nonfinite_steps and in_a_row >= t.max_nonfinite_steps:
                        last = latest_checkpoint(run_dir)
                        raise TrainingError(
                            f"stopped at step {step}: the loss or gradient norm was non-finite for {in_a_row} steps "
                            f"in a row (train.max_nonfinite_steps = {t.max_nonfinite_steps}); the last good checkpoint "
                            f"is {last if last is not None else 'none (nothing saved yet)'}, left intact; lower "
                            f"optim.lr or check the data, then run again to resume from it")
                periodic = bool(cfg.checkpoint.every) and step % cfg.checkpoint.every == 0
                in_anneal = averaging and step > anneal_from and (step - anneal_from) % anneal_every == 0
                if (periodic or in_anneal) and step < total_steps and in_a_row == 0:
                    _save(run_dir, step, model, optimizer, scheduler, objective, extra_of(), cfg.checkpoint.keep_last,
                          distributed, keep_from)
                    last_saved = step

            final = None
            if status != "preempted":
                if last_saved != step and (resume_from is None or step != start_step):
                    _save(run_dir, step, model, optimizer, scheduler, objective, extra_of(), cfg.checkpoint.keep_last,
                          distributed, keep_from)
                if status in ("completed", "stopped early") or not (run_dir / "final").exists():
                    if averaging and step > anneal_from:
                        objective.export(run_dir, model, distributed)  # the last weights, kept beside the mean
                        _replace_dir(run_dir / "final", run_dir / "final-last", distributed)
                        paths = [p for s_, p in list_checkpoints(run_dir) if s_ > anneal_from]
                        say(f"{label}: final = the mean of the anneal's {len(paths)} checkpoints "
                            f"(steps {anneal_from + 1}-{step}); the last step's weights are in final-last")
                        average_into(model, paths, objective, distributed)
                    final = objective.export(run_dir, model, distributed)
                else:
                    final = run_dir / "final"
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    tok_s = session_tokens / session_time if session_time else None
    fpt = objective.flops_per_token(model, seq_len)
    summary: dict[str, Any] = {
        "objective": label, "status": status, "run_dir": str(run_dir), "steps": step, "start_step": start_step,
        "tokens_seen": tokens_seen, "n_params": n_params, "n_trainable": n_trainable, "train_loss": last_loss,
        "val_loss": last_val if not math.isnan(last_val) else None,
        **{k: v for k, v in last_eval.items() if k != "val_loss"},
        "tokens_per_s": tok_s, "mfu": mfu(tok_s, fpt, peak * world_size) if (tok_s and peak and fpt) else None,
        "peak_flops": peak_name, "skipped_nonfinite": skipped, "wall_s": time.perf_counter() - wall0,
        "final": str(final) if final is not None else None, "world_size": world_size,
    }
    if start_eval:
        summary["before"] = start_eval
    summary.update(objective.summary())
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a few lines for a person."""
    label = s.get("objective", "pretrain")
    lines = [f"{label}: {s['status']} at step {s['steps']} ({s['tokens_seen']:,} tokens) in {s['wall_s']:.0f} s"]
    figs = [f"train loss {s['train_loss']:.4f}"]
    if s.get("val_loss") is not None:
        figs.append(f"val loss {s['val_loss']:.4f}")
    for k, v in s.items():
        if k.startswith("val_") and k != "val_loss" and isinstance(v, float):
            figs.append(f"{k[4:].replace('_', ' ')} {v:.4f} (held out)")
    if s.get("before"):
        figs.append("before training: " + ", ".join(f"{k[4:].replace('_', ' ')} {v:.4f}" for k, v in s["before"].items()))
    if s.get("unigram_entropy") is not None:
        figs.append(f"unigram baseline {s['unigram_entropy']:.4f} (val tokens' entropy, nats)")
    lines.append("  " + ", ".join(figs))
    if s.get("tokens_per_s"):
        perf = f"  {s['tokens_per_s']:,.0f} tokens/s"
        if s.get("mfu") is not None:
            perf += f", MFU {s['mfu']:.1%} of {s['peak_flops']} ({PEAK_FLOPS[s['peak_flops']] / 1e9:,.0f} GFLOP/s)"
        lines.append(perf)
    if s.get("skipped_nonfinite"):
        lines.append(f"  {s['skipped_nonfinite']} step(s) skipped for non-finite loss or gradients")
    for line in s.get("notes", []):
        lines.append(f"  {line}")
    if s.get("final"):
        lines.append(f"  final model: {s['final']}  (llamalab generate --model {s['final']} \"...\")")
    return "\n".join(lines)
