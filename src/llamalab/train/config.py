"""``TrainConfig``: one pretraining run, as a tree of dataclasses filled from TOML.

The defaults are the LLaMA recipe (Touvron et al. 2023a, §2.2 and table 2, 7B row): AdamW
β = (0.9, 0.95), weight decay 0.1, gradient clipping 1.0, 2,000 warmup steps, cosine decay to
10% of the peak lr 3e-4, batches of 4M tokens of 2,048-token sequences, ~1T tokens
(250,000 steps); eps 1e-5 as Llama 2 states it. A run file changes what it needs::

    run_dir = "runs/tiny"
    seed = 1

    [model]
    preset = "tiny"
    overrides = { n_layers = 4 }

    [data.sources.web]
    shards = "data/web/*.bin"
    weight = 0.9

    [train]
    global_batch_tokens = 16384
    seq_len = 256
    micro_batch_size = 8
    total_steps = 2000

    [[stages]]                 # Llama 3-style stage: from this many tokens on ...
    start_tokens = 100_000_000
    seq_len = 512              # ... longer sequences, another mixture
    mixture = { web = 0.5, code = 0.5 }

``load_config(path, ["optim.lr=3e-4", "train.seq_len=512"])`` applies ``key=value``
overrides (values in TOML syntax; a bare word is a string). Unknown keys, wrong types and
impossible batch arithmetic raise :class:`ConfigError` with one line naming the key and
where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import tomllib
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llamalab.config import PRESETS, ModelConfig, RopeScaling, get_preset

__all__ = ["CheckpointSection", "ConfigError", "DPOSection", "DataSection", "PPOSection", "DataSource", "EvalSection",
           "FinetuneSection", "FinetuneSource", "LoraSection", "ModelSection", "RewardSection",
           "OptimSection", "Stage", "StageSettings", "TrainConfig", "TrainSection", "grad_accum_steps",
           "load_config", "tokens_after_steps"]


class ConfigError(ValueError):
    """A bad run configuration: one line naming the key (and the file or override it came from)."""


# ---------------------------------------------------------------- the tree


@dataclass
class ModelSection:
    """A preset name (:data:`llamalab.config.PRESETS`) and ModelConfig fields to change."""

    preset: str = "llama1-7b"
    overrides: dict[str, Any] = field(default_factory=dict)
    # Start from these weights (a path in any checkpoint format, or a registered name such as
    # "smollm2-135m-instruct"): fine-tuning. The checkpoint's config replaces the preset's.
    checkpoint: str | None = None

    def build(self) -> ModelConfig:
        """The ModelConfig this section describes."""
        if self.checkpoint:
            return _checkpoint_config(self.checkpoint).replace(**self.overrides)
        return get_preset(self.preset, **self.overrides)


@functools.lru_cache(maxsize=8)
def _checkpoint_config(source: str) -> ModelConfig:
    from llamalab.checkpoint import read_checkpoint
    from llamalab.checkpoint.base import CheckpointError

    try:
        return read_checkpoint(source).config
    except FileNotFoundError as e:
        raise ConfigError(f"model.checkpoint={source!r}: no such file or directory ({e.filename or e}); download "
                          f"the checkpoint or set model.checkpoint=PATH (a Meta, HF, GGUF or llamalab checkpoint)") from None
    except CheckpointError as e:
        raise ConfigError(f"model.checkpoint={source!r}: {e}") from None


@dataclass
class FinetuneSource:
    """One source of a fine-tuning mixture (``[[finetune.sources]]``): JSONL ``files`` (or globs)
    and either ``fraction`` (take this share of the source's records, seeded; > 1 repeats them)
    or ``share`` (size the source to this share of the whole mixture, sampled from it). Llama 2's
    helpfulness reward model: helpful data ``fraction = 1`` + safety and open data ``share = 0.25``
    each (an equal amount in all); its safety model: safety data ``fraction = 1`` + helpful data
    ``share = 0.1``."""

    files: list[str]
    name: str = ""
    fraction: float | None = None
    share: float | None = None


@dataclass
class FinetuneSection:
    """Post-training (``llamalab finetune``): the method, its JSONL data and how it is rendered.

    ``train_data``/``val_data``: JSONL files or globs (conversations for SFT, preference pairs for
    DPO; formats in docs/finetune.md). Without ``val_data``, ``val_fraction`` of the training
    records (seeded) is held out. Steps: ``epochs`` passes over the training rows at
    ``train.global_batch_tokens / train.seq_len`` sequences a step (``max_steps`` > 0 caps them).
    """

    method: Literal["sft", "dpo", "reward", "ppo"] = "sft"
    train_data: list[str] = field(default_factory=list)
    sources: list[FinetuneSource] = field(default_factory=list)  # a mixture, beside/instead of train_data
    val_data: list[str] = field(default_factory=list)
    val_fraction: float = 0.0
    chat_format: Literal["auto", "template", "llama3", "llama2"] = "auto"  # auto: the tokenizer's own
    train_on: Literal["assistant", "last", "all"] = "assistant"  # which turns carry SFT loss
    packing: bool = True  # SFT: several samples per sequence, document-masked, positions restarting
    # DPO and reward models: each pair one row, the tokens its sides start with computed once (a mask
    # keeps each side from seeing the others: the figures of separate rows, for fewer tokens)
    share_prompt: bool = True
    epochs: float = 2.0
    max_steps: int = 0
    lora: bool = False  # train LoRA adapters ([lora]) instead of every weight
    shuffle: bool = True


@dataclass
class LoraSection:
    """LoRA adapters (finetune/lora.py): rank, alpha, dropout and the linears they go on (Meta names)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wv", "wo", "w1", "w2", "w3"])


@dataclass
class DPOSection:
    """Llama 3's DPO (§4.1.4): beta 0.1, NLL of the chosen response weighted 0.2, formatting tokens masked.

    ``reference``: where pi_ref's log-probs come from. "cached": computed once with the starting
    weights before training and kept in run_dir (a full fine-tune holds no second model);
    "adapters-off": the same model with its LoRA adapters disabled, per batch; "auto": the
    latter with LoRA, else the former.
    """

    beta: float = 0.1
    nll_weight: float = 0.2
    mask_formatting: bool = True
    reference: Literal["auto", "cached", "adapters-off"] = "auto"


@dataclass
class RewardSection:
    """Reward models (Llama 2 §3.2.2, ``finetune.method = "reward"``): the margin m(r) of the
    ranking loss -log sigmoid(r_c - r_r - m(r)) by preference level (Table 27): "small" (1, 2/3,
    1/3, 0), "large" (3, 2, 1, 0) or "off" (Llama 3); a record's own ``margin`` wins over its level."""

    margin: Literal["small", "large", "off"] = "small"


@dataclass
class RejectionSection:
    """Rejection-sampling fine-tuning (Llama 2 §3.2.3; ``llamalab rejection-sample``, docs/rlhf.md):
    K samples per prompt from ``model.checkpoint``, scored by ``reward_model``, the best kept as
    SFT targets for the ``[finetune]`` / ``[optim]`` settings of the same run file."""

    reward_model: str = ""  # a reward run's final/ directory
    prompts: list[str] = field(default_factory=list)  # JSONL prompt files (or globs)
    eval_prompts: list[str] = field(default_factory=list)  # held out: sampled before and after the SFT step
    k: int = 4  # samples per prompt and temperature (Llama 3: "typically between 10 and 30")
    temperatures: list[float] = field(default_factory=lambda: [1.0])  # several = a sweep (Llama 2 Fig. 8)
    max_new_tokens: int = 256
    top_p: float = 1.0
    top_k: int = 0
    keep_from: list[str] = field(default_factory=list)  # earlier iterations' run dirs (Llama 2 from RLHF-V4)
    drop_truncated: bool = True  # answers cut by max_new_tokens are never selected
    precision: Literal["fp32", "bf16"] = "fp32"  # sampling and scoring
    eval_k: int = 1  # samples per held-out prompt
    eval_temperature: float = 0.0  # 0 = greedy


@dataclass
class PPOSection:
    """PPO (Llama 2 §3.2.3; ``finetune.method = "ppo"``, ``finetune/ppo_loop.py``, docs/rlhf.md).

    An iteration samples ``batch_size`` prompts of ``prompts`` once each from the policy (the
    engine, KV cache, batched ``forward_batch_size`` rows a call), scores the answers, and takes
    ``epochs`` passes of gradient steps of ``minibatch_size`` answers over them (Llama 2: 512
    and 64, one step per minibatch). Optimizer steps = ``iterations * batch_size / minibatch_size
    * epochs``; ``eval.every`` and ``checkpoint.every`` count those steps.
    """

    reward: Literal["model", "answer"] = "model"  # answer: 1 if the prompt's "answer" is given, else 0
    reward_model: str = ""  # helpfulness reward model (a reward run's final/)
    safety_reward_model: str = ""  # optional: Llama 2's gate (R_s when tagged safety or R_s < threshold)
    safety_threshold: float = 0.15
    shaping: Literal["llama2", "raw"] = "llama2"  # llama2: WHITEN(LOGIT(R_c)) over the batch; raw: the score
    value_init: Literal["reward_model", "policy"] = "reward_model"  # the value model's starting weights
    prompts: list[str] = field(default_factory=list)
    eval_prompts: list[str] = field(default_factory=list)  # held out: early stopping and before/after
    iterations: int = 200
    batch_size: int = 512  # prompts (answers) per iteration
    minibatch_size: int = 64  # answers per gradient step
    epochs: int = 1  # passes over an iteration's answers
    forward_batch_size: int = 16  # rows per generation call and per no-gradient forward pass
    max_new_tokens: int = 256
    temperature: float = 1.0  # sampling (and the log-probs' temperature); no top-p/top-k: PPO stays on-policy
    kl_coef: float = 0.01  # beta: 0.01 for 7B/13B, 0.005 for 34B/70B
    clip: float = 0.2
    value_clip: float = 0.2
    value_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    penalize_no_eos: bool = True  # an answer cut by max_new_tokens scores no_eos_penalty
    no_eos_penalty: float = -3.0
    eval_temperature: float = 0.0  # 0 = greedy
    patience: int = 0  # held-out evaluations without improvement before stopping (0 = never stop early)
    stop_metric: Literal["reward", "accuracy"] = "reward"
    export: Literal["best", "last"] = "best"  # final/: the best held-out policy or the last one


@dataclass
class DataSource:
    """One source of tokenized shards and its sampling weight in the mixture."""

    shards: str
    weight: float = 1.0


@dataclass
class DataSection:
    """Training sources ``{name: {shards: glob, weight}}``, the validation shards, and the tokenizer
    file (copied into the final model; by default the one the shards' metadata names, if it exists)."""

    sources: dict[str, DataSource] = field(default_factory=dict)
    val_shards: str | None = None
    tokenizer: str | None = None


@dataclass
class TrainSection:
    """Batch shape, length, precision and the step's safety net.

    ``global_batch_tokens`` is split into ``micro_batch_size`` sequences of ``seq_len`` per
    process and forward/backward; the rest is gradient accumulation (:func:`grad_accum_steps`).
    """

    total_steps: int = 250_000
    global_batch_tokens: int = 4_194_304
    seq_len: int = 2048
    micro_batch_size: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where native (llamalab/precision.py)
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    compile: bool = False
    fused_loss: bool = True  # output head + cross-entropy in chunks, no full logits (train/loss.py; 1 process)
    reuse_freed_memory: bool = True  # CPU: glibc keeps freed memory, no page faults every step (allocator.py)
    # CPU, 1 process: fp32 matrix products in oneDNN instead of MKL (train/speed.py). "auto": where
    # that is faster, CPUs with AVX-512 (~2x there; ~0.5x on an AVX2-only CPU, measured).
    onednn_linear: bool | Literal["auto"] = "auto"
    matmul_attention: bool = True  # CPU, bf16: attention as two batched products, not the flash kernel (train/speed.py)
    tensor_parallel: int = 1  # processes per tensor-parallel group; the rest of the world is FSDP (data parallel)
    log_every: int = 10
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars under run_dir/tensorboard
    max_nonfinite_steps: int = 3
    document_mask: bool = False  # Llama 3: attend only within each packed document
    # How: "segments" (per-document attention, no S x S mask), "dense" (an S x S mask), "auto"
    # (segments for documents of 8+ tokens on average; dense under train.compile, which would
    # otherwise specialise a graph on each document layout).
    document_attention: Literal["auto", "segments", "dense"] = "auto"
    peak_flops: str = "auto"  # the PEAK_FLOPS entry MFU divides by ("auto": from the device and precision)
    inject_nonfinite_at: list[int] = field(default_factory=list)  # testing: make these steps' loss NaN


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule (see :mod:`llamalab.train.optim`)."""

    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-5
    weight_decay: float = 0.1
    decay_embeddings: bool = True
    grad_clip: float = 1.0
    warmup_steps: int = 2000
    # A share of the run's steps, for recipes that state warmup so (Llama 2's reward model: 3%,
    # at least 5): the warmup is max(warmup_steps, ceil(warmup_fraction * total steps)).
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "linear-anneal"] = "cosine"
    anneal_steps: int | None = None
    # Llama 3 states its anneal in tokens ("the final 40M tokens"): steps = ceil(tokens / the batch
    # in force during the anneal). Give this or anneal_steps, not both.
    anneal_tokens: int | None = None
    fused: bool | None = None

    def warmup_for(self, total_steps: int) -> int:
        """The warmup steps of a run of ``total_steps``: max(warmup_steps, ceil(warmup_fraction * total))."""
        return max(self.warmup_steps, math.ceil(self.warmup_fraction * total_steps))


@dataclass
class Stage:
    """From ``start_tokens`` tokens seen on, change some of the batch shape, RoPE base and scaling
    or mixture (Llama 3 doubled its batch at 252M and 2.87T tokens and lengthened the context at
    the end). ``anneal = true`` instead of ``start_tokens``: the stage begins with the learning
    rate's linear anneal (Llama 3's up-sampled high-quality mixture over its last 40M tokens); it
    must be the last stage. Unset fields keep the previous stage's values."""

    start_tokens: int | None = None
    anneal: bool = False
    global_batch_tokens: int | None = None
    seq_len: int | None = None
    micro_batch_size: int | None = None
    rope_theta: float | None = None
    rope_scaling: dict[str, float] | None = None  # RopeScaling's fields (Llama 3.1: factor 8, ...)
    mixture: dict[str, float] | None = None


@dataclass
class EvalSection:
    """Validation loss every ``every`` steps over ``batches`` micro-batches (0: never)."""

    every: int = 1000
    batches: int = 20
    at_start: bool = False  # also evaluate the starting weights, logged as step 0 (fine-tuning: the base's figures)


@dataclass
class CheckpointSection:
    """Save every ``every`` steps (0: only at the end), keep the newest ``keep_last`` (0: all).

    ``average_anneal`` (Llama 3 §3.4.3, Polyak averaging): during the learning rate's linear
    anneal also save every ``anneal_every`` steps (0: every ``every`` steps), keep all of those,
    and export as ``final`` the mean of the anneal's checkpoints (the last step's weights go to
    ``final-last``)."""

    every: int = 1000
    keep_last: int = 3
    average_anneal: bool = False
    anneal_every: int = 0


@dataclass(frozen=True)
class StageSettings:
    """The settings in force during one stage, every field resolved."""

    index: int
    start_tokens: int
    global_batch_tokens: int
    seq_len: int
    micro_batch_size: int
    rope_theta: float
    mixture: dict[str, float]
    rope_scaling: RopeScaling | None = None
    anneal: bool = False

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per process per optimizer step."""
        key = "train" if self.index == 0 else f"stages[{self.index - 1}]"
        return grad_accum_steps(self.global_batch_tokens, self.seq_len, self.micro_batch_size, world_size, key=key)


@dataclass
class TrainConfig:
    """A whole pretraining run."""

    run_dir: str = "runs/default"
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    stages: list[Stage] = field(default_factory=list)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    lora: LoraSection = field(default_factory=LoraSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    reward: RewardSection = field(default_factory=RewardSection)
    rejection: RejectionSection = field(default_factory=RejectionSection)
    ppo: PPOSection = field(default_factory=PPOSection)

    def to_dict(self) -> dict[str, Any]:
        """Plain (JSON-serialisable) dict; :meth:`from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config", world_size: int = 1) -> "TrainConfig":
        """Build and validate; errors name ``source`` and the key."""
        cfg = _convert(data, cls, "", lambda _key: source)
        try:
            cfg.validate(world_size)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg

    def model_config(self) -> ModelConfig:
        """The ModelConfig of the first stage (its ``rope_theta`` changes with later stages)."""
        return self.model.build()

    def resolved_stages(self) -> list[StageSettings]:
        """Stage 0 (the ``[train]`` settings, from token 0) followed by each ``[[stages]]`` entry;
        an ``anneal`` stage's start is the tokens seen when the anneal begins."""
        t, weights = self.train, {name: s.weight for name, s in self.data.sources.items()}
        model = self.model_config()
        cur = StageSettings(0, 0, t.global_batch_tokens, t.seq_len, t.micro_batch_size,
                            model.rope_theta, weights, model.rope_scaling)
        out = [cur]
        for i, s in enumerate(self.stages, start=1):
            start = s.start_tokens
            if s.anneal:  # placed once the stages before it are known (they fix the tokens per step)
                steps = self.train.total_steps - self._anneal_steps(out, s)
                start = tokens_after_steps(out, max(steps, 0))  # validate() checks it follows the others
            cur = StageSettings(
                i, int(start or 0),
                s.global_batch_tokens if s.global_batch_tokens is not None else cur.global_batch_tokens,
                s.seq_len if s.seq_len is not None else cur.seq_len,
                s.micro_batch_size if s.micro_batch_size is not None else cur.micro_batch_size,
                s.rope_theta if s.rope_theta is not None else cur.rope_theta,
                dict(s.mixture) if s.mixture is not None else cur.mixture,
                _rope_scaling(s.rope_scaling) if s.rope_scaling is not None else cur.rope_scaling,
                s.anneal)
            out.append(cur)
        return out

    def _anneal_steps(self, before: list[StageSettings], anneal_stage: Stage | None) -> int:
        o = self.optim
        if o.anneal_tokens is None:
            return int(o.anneal_steps or 0)
        batch = before[-1].global_batch_tokens
        if anneal_stage is not None and anneal_stage.global_batch_tokens is not None:
            batch = anneal_stage.global_batch_tokens
        return math.ceil(o.anneal_tokens / batch)

    def anneal_steps(self) -> int | None:
        """The linear anneal's length in optimizer steps (``optim.anneal_steps``, or
        ``optim.anneal_tokens`` over the anneal's batch); None for the cosine schedule."""
        if self.optim.schedule != "linear-anneal":
            return None
        if self.optim.anneal_tokens is None:
            return self.optim.anneal_steps
        plain = [s for s in self.stages if not s.anneal]
        anneal = next((s for s in self.stages if s.anneal), None)
        before = dataclasses.replace(self, stages=plain).resolved_stages()
        return self._anneal_steps(before, anneal)

    def anneal_start_step(self) -> int | None:
        """The last optimizer step before the anneal (the anneal's steps are the ones after it)."""
        n = self.anneal_steps()
        return None if n is None else self.train.total_steps - n

    def schedule_table(self) -> list[dict[str, Any]]:
        """Each stage's first and last optimizer step and token counts, resolved: what a run of
        this config does, step by step (``llamalab pretrain --dry-run`` prints it)."""
        stages = self.resolved_stages()
        rows, step, tokens = [], 0, 0
        total = self.train.total_steps
        for i, st in enumerate(stages):
            nxt = stages[i + 1].start_tokens if i + 1 < len(stages) else None
            first_step, first_tokens = step, tokens
            while step < total and (nxt is None or tokens < nxt):
                k = total - step if nxt is None else min(total - step, -(-(nxt - tokens) // st.global_batch_tokens))
                step, tokens = step + k, tokens + k * st.global_batch_tokens
            rows.append({"stage": st.index, "anneal": st.anneal, "start_tokens": st.start_tokens,
                         "first_step": first_step + 1 if step > first_step else None, "last_step": step,
                         "tokens_from": first_tokens, "tokens_to": tokens, "steps": step - first_step,
                         "global_batch_tokens": st.global_batch_tokens, "seq_len": st.seq_len,
                         "sequences_per_batch": st.global_batch_tokens // st.seq_len,
                         "rope_theta": st.rope_theta,
                         "rope_scaling": dataclasses.asdict(st.rope_scaling) if st.rope_scaling else None,
                         "mixture": st.mixture})
        return rows

    def stage_at(self, tokens_seen: int) -> StageSettings:
        """The stage in force once ``tokens_seen`` training tokens have been consumed."""
        current = None
        for s in self.resolved_stages():
            if s.start_tokens <= tokens_seen:
                current = s
        assert current is not None
        return current

    def grad_accum_steps(self, world_size: int = 1, tokens_seen: int = 0) -> int:
        """Micro-batches per process per optimizer step at ``tokens_seen``."""
        return self.stage_at(tokens_seen).grad_accum_steps(world_size)

    def data_parallel_size(self, world_size: int = 1) -> int:
        """Data-parallel replicas: ``world_size`` processes in groups of ``train.tensor_parallel``."""
        tp = self.train.tensor_parallel
        if tp < 1 or world_size % tp:
            raise ConfigError(f"train.tensor_parallel={tp}: must be >= 1 and divide the number of "
                              f"processes ({world_size})")
        return world_size // tp

    def _validate_stages(self) -> None:
        """What :meth:`resolved_stages` relies on: each stage's start given once, the anneal stage last."""
        for i, s in enumerate(self.stages):
            if s.anneal == (s.start_tokens is not None):
                raise ConfigError(f"stages[{i}]: give exactly one of start_tokens and anneal = true")
            if s.anneal:
                if i != len(self.stages) - 1:
                    raise ConfigError(f"stages[{i}]: the anneal stage must be the last of [[stages]]")
                if self.optim.schedule != "linear-anneal":
                    raise ConfigError(f"stages[{i}].anneal = true: needs optim.schedule = \"linear-anneal\"")
            if s.rope_scaling is not None:
                try:
                    _rope_scaling(s.rope_scaling)
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"stages[{i}].rope_scaling: {e}; expected keys factor, low_freq_factor, "
                                      f"high_freq_factor, original_max_seq_len") from None

    def validate(self, world_size: int = 1) -> None:
        """Check what types alone cannot; raises ConfigError("key: problem")."""
        try:
            model = self.model_config()
        except ConfigError:
            raise
        except KeyError as e:
            raise ConfigError(f"model.preset: {e.args[0]}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.overrides: {e}") from None
        t, o = self.train, self.optim
        for key, value in [("train.total_steps", t.total_steps), ("train.global_batch_tokens", t.global_batch_tokens),
                           ("train.seq_len", t.seq_len), ("train.micro_batch_size", t.micro_batch_size),
                           ("train.log_every", t.log_every), ("optim.lr", o.lr)]:
            if value <= 0:
                raise ConfigError(f"{key}={value}: must be > 0")
        for key, value in [("train.max_nonfinite_steps", t.max_nonfinite_steps), ("optim.eps", o.eps),
                           ("optim.weight_decay", o.weight_decay), ("optim.grad_clip", o.grad_clip),
                           ("eval.every", self.eval.every), ("eval.batches", self.eval.batches),
                           ("checkpoint.every", self.checkpoint.every),
                           ("checkpoint.keep_last", self.checkpoint.keep_last)]:
            if value < 0:
                raise ConfigError(f"{key}={value}: must be >= 0")
        from llamalab.train.metrics import PEAK_FLOPS

        if t.peak_flops != "auto" and t.peak_flops not in PEAK_FLOPS:
            raise ConfigError(f"train.peak_flops={t.peak_flops!r}: expected 'auto' or one of {', '.join(PEAK_FLOPS)}")
        if not 0.0 <= o.warmup_fraction < 1.0:
            raise ConfigError(f"optim.warmup_fraction={o.warmup_fraction}: must be in [0, 1)")
        if not all(0.0 <= b < 1.0 for b in o.betas):
            raise ConfigError(f"optim.betas={list(o.betas)}: each must be in [0, 1)")
        from llamalab.train.optim import lr_at

        if o.anneal_tokens is not None:
            if o.anneal_steps is not None:
                raise ConfigError("optim: give anneal_steps or anneal_tokens, not both")
            if o.anneal_tokens <= 0:
                raise ConfigError(f"optim.anneal_tokens={o.anneal_tokens}: must be > 0")
        self._validate_stages()
        try:
            lr_at(0, peak_lr=o.lr, warmup_steps=o.warmup_steps, total_steps=t.total_steps,
                  min_lr_ratio=o.min_lr_ratio, schedule=o.schedule, anneal_steps=self.anneal_steps())
        except ValueError as e:
            raise ConfigError(f"optim: {e} (total_steps is train.total_steps)") from None
        c = self.checkpoint
        if c.anneal_every < 0:
            raise ConfigError(f"checkpoint.anneal_every={c.anneal_every}: must be >= 0")
        if c.average_anneal and o.schedule != "linear-anneal":
            raise ConfigError("checkpoint.average_anneal = true averages the checkpoints of the learning rate's "
                              "linear anneal: set optim.schedule = \"linear-anneal\" (and anneal_steps or "
                              "anneal_tokens)")
        if c.average_anneal and not (c.anneal_every or c.every):
            raise ConfigError("checkpoint.average_anneal = true needs checkpoint.anneal_every (or every) > 0: "
                              "the checkpoints to average")
        for name, src in self.data.sources.items():
            if not src.weight > 0:
                raise ConfigError(f"data.sources.{name}.weight={src.weight}: must be > 0")
        for i, s in enumerate(self.stages):
            for name, w in (s.mixture or {}).items():
                if name not in self.data.sources:
                    raise ConfigError(f"stages[{i}].mixture.{name}: no such data source "
                                      f"(data.sources has {sorted(self.data.sources) or 'none'})")
                if w < 0:
                    raise ConfigError(f"stages[{i}].mixture.{name}={w}: must be >= 0")
            for key in ("global_batch_tokens", "seq_len", "micro_batch_size", "rope_theta"):
                value = getattr(s, key)
                if value is not None and value <= 0:
                    raise ConfigError(f"stages[{i}].{key}={value}: must be > 0")
        last = 0
        for i, st in enumerate(self.resolved_stages()[1:]):
            if st.start_tokens <= last and st.anneal:
                raise ConfigError(f"stages[{i}]: its anneal begins at {st.start_tokens:,} tokens, not after "
                                  f"stages[{i - 1}] ({last:,} tokens); shorten the anneal or start that stage earlier")
            if st.start_tokens <= last:
                raise ConfigError(f"stages[{i}].start_tokens={st.start_tokens}: must be greater than "
                                  f"{'0' if i == 0 else f'stages[{i - 1}].start_tokens={last}'}")
            last = st.start_tokens
        f = self.finetune
        if not 0.0 <= f.val_fraction < 1.0:
            raise ConfigError(f"finetune.val_fraction={f.val_fraction}: must be in [0, 1)")
        if not f.epochs > 0:
            raise ConfigError(f"finetune.epochs={f.epochs}: must be > 0")
        if f.max_steps < 0:
            raise ConfigError(f"finetune.max_steps={f.max_steps}: must be >= 0")
        for i, src in enumerate(f.sources):
            key = f"finetune.sources[{i}]"
            if not src.files:
                raise ConfigError(f"{key}.files: empty; list JSONL files (or globs)")
            if (src.fraction is None) == (src.share is None):
                raise ConfigError(f"{key}: give exactly one of 'fraction' (of the source's records) and 'share' "
                                  f"(of the whole mixture)")
            if src.fraction is not None and not src.fraction > 0:
                raise ConfigError(f"{key}.fraction={src.fraction}: must be > 0")
            if src.share is not None and not 0 < src.share < 1:
                raise ConfigError(f"{key}.share={src.share}: must be in (0, 1)")
        if f.sources:
            shares = sum(src.share or 0.0 for src in f.sources)
            if not f.train_data and all(src.share is not None for src in f.sources):
                raise ConfigError("finetune.sources: every source has a 'share'; at least one needs a 'fraction' "
                                  "(or use finetune.train_data) for the shares to be shares of")
            if shares >= 1:
                raise ConfigError(f"finetune.sources: the shares sum to {shares:g}; they must sum to less than 1")
        if not self.dpo.beta > 0:
            raise ConfigError(f"dpo.beta={self.dpo.beta}: must be > 0")
        if self.dpo.nll_weight < 0:
            raise ConfigError(f"dpo.nll_weight={self.dpo.nll_weight}: must be >= 0")
        if self.dpo.reference == "adapters-off" and not f.lora:
            raise ConfigError("dpo.reference='adapters-off' needs finetune.lora = true (a full fine-tune has no "
                              "adapters to switch off; use 'cached')")
        rj = self.rejection
        from llamalab.finetune.rejection import SamplingPlan

        try:
            SamplingPlan(rj.k, list(rj.temperatures), rj.max_new_tokens, rj.top_p, rj.top_k).validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        p = self.ppo
        for key, value in (("ppo.iterations", p.iterations), ("ppo.batch_size", p.batch_size),
                           ("ppo.minibatch_size", p.minibatch_size), ("ppo.epochs", p.epochs),
                           ("ppo.forward_batch_size", p.forward_batch_size), ("ppo.max_new_tokens", p.max_new_tokens)):
            if value < 1:
                raise ConfigError(f"{key}={value}: must be >= 1")
        if p.batch_size % p.minibatch_size:
            raise ConfigError(f"ppo.batch_size={p.batch_size} is not a multiple of ppo.minibatch_size="
                              f"{p.minibatch_size}")
        if not p.temperature > 0:
            raise ConfigError(f"ppo.temperature={p.temperature}: must be > 0 (PPO samples from the policy)")
        for key, value in (("ppo.kl_coef", p.kl_coef), ("ppo.clip", p.clip), ("ppo.value_clip", p.value_clip),
                           ("ppo.value_coef", p.value_coef), ("ppo.eval_temperature", p.eval_temperature),
                           ("ppo.patience", p.patience)):
            if value < 0:
                raise ConfigError(f"{key}={value}: must be >= 0")
        for key, value in (("ppo.gamma", p.gamma), ("ppo.lam", p.lam), ("ppo.safety_threshold", p.safety_threshold)):
            if not 0 <= value <= 1:
                raise ConfigError(f"{key}={value}: must be in [0, 1]")
        if f.method == "ppo":
            steps = p.batch_size // p.minibatch_size * p.epochs
            if self.eval.every % steps:  # held-out figures between iterations, one point per evaluation
                raise ConfigError(f"eval.every={self.eval.every}: PPO takes {steps} optimizer steps an iteration "
                                  f"(ppo.batch_size / ppo.minibatch_size * ppo.epochs); use a multiple of {steps}")
        if rj.eval_k < 1:
            raise ConfigError(f"rejection.eval_k={rj.eval_k}: expected an integer >= 1")
        if rj.eval_temperature < 0 or (rj.eval_temperature == 0 and rj.eval_k > 1):
            raise ConfigError(f"rejection.eval_temperature={rj.eval_temperature}: expected >= 0, and > 0 when "
                              f"eval_k > 1 (0 is greedy: identical samples)")
        if f.lora:
            from llamalab.finetune.lora import LoRAConfig

            try:
                LoRAConfig(**dataclasses.asdict(self.lora)).validate()
            except ValueError as e:
                raise ConfigError(str(e)) from None
        dp = self.data_parallel_size(world_size)
        for name, n in (("n_heads", model.n_heads), ("n_kv_heads", model.n_kv_heads),
                        ("ffn hidden size", model.ffn_hidden_dim)):
            if n % t.tensor_parallel:
                raise ConfigError(f"train.tensor_parallel={t.tensor_parallel}: the model's {name} ({n}) "
                                  f"must be divisible by it")
        for st in self.resolved_stages():
            key = "train" if st.index == 0 else f"stages[{st.index - 1}]"
            if st.seq_len > model.max_seq_len:
                raise ConfigError(f"{key}.seq_len={st.seq_len} exceeds the model's max_seq_len={model.max_seq_len} "
                                  f"(set model.overrides.max_seq_len)")
            if f.method != "ppo":  # PPO's steps are ppo.minibatch_size answers, not a token budget
                st.grad_accum_steps(dp)


def _rope_scaling(fields: dict[str, float]) -> RopeScaling:
    """A stage's ``rope_scaling`` table as the model's RopeScaling (the context length an int)."""
    return RopeScaling(**{k: int(v) if k == "original_max_seq_len" else float(v) for k, v in fields.items()})


def tokens_after_steps(stages: list[StageSettings], steps: int) -> int:
    """Tokens seen after ``steps`` optimizer steps under ``stages`` (a stage takes over at the first
    step that begins with at least its ``start_tokens`` seen, as the loop switches)."""
    tokens, step = 0, 0
    for i, st in enumerate(stages):
        nxt = stages[i + 1].start_tokens if i + 1 < len(stages) else None
        k = steps - step if nxt is None else min(steps - step, max(0, -(-(nxt - tokens) // st.global_batch_tokens)))
        step, tokens = step + k, tokens + k * st.global_batch_tokens
        if step >= steps:
            break
    return tokens


def grad_accum_steps(global_batch_tokens: int, seq_len: int, micro_batch_size: int, world_size: int = 1, *,
                     key: str = "train") -> int:
    """``global_batch_tokens / (seq_len * micro_batch_size * world_size)``; ConfigError unless whole.

    ``world_size`` counts data-parallel replicas (processes of one tensor-parallel group see
    the same batch).
    """
    per_pass = seq_len * micro_batch_size * world_size
    if global_batch_tokens % per_pass:
        raise ConfigError(f"{key}.global_batch_tokens={global_batch_tokens} is not a multiple of seq_len * "
                          f"micro_batch_size * world_size = {seq_len} * {micro_batch_size} * {world_size} = "
                          f"{per_pass}; change one of them")
    return global_batch_tokens // per_pass


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: Iterable[str] = (), *, world_size: int = 1) -> TrainConfig:
    """Read a TOML run file (None: the defaults), apply ``key=value`` overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: invalid TOML: {e}") from None
    applied: dict[str, str] = {}
    for item in overrides:
        key = _apply_override(data, item)
        applied[key] = item

    def source_of(key: str) -> str:
        for k, item in applied.items():
            if key == k or key.startswith(k + ".") or k.startswith(key + "."):
                return f"override {item!r}"
        return source

    cfg = _convert(data, TrainConfig, "", source_of)
    try:
        cfg.validate(world_size)
    except ConfigError as e:
        raise ConfigError(f"{source}{' + overrides' if applied else ''}: {e}") from None
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: train.precision=bf16


def _apply_override(data: dict[str, Any], item: str) -> str:
    """Set ``a.b.c=value`` in ``data`` (list entries by index: ``stages.0.seq_len=512``); returns the key."""
    key, sep, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or not all(parts):
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-4")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {item!r}: {where}: no entry {part} (the list has {len(node)})")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i])} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"override {item!r}: no entry {last} in {'.'.join(parts[:-1])}")
        node[int(last)] = _parse_value(text.strip())
    elif isinstance(node, dict):
        node[last] = _parse_value(text.strip())
    else:
        raise ConfigError(f"override {item!r}: {'.'.join(parts[:-1])} is a value, not a section")
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        return f"a list of {len(args)} numbers"
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str, source_of: Any) -> Any:
    """``value`` (from TOML) checked against the annotation ``tp`` and converted; ConfigError otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail() -> ConfigError:
        shown = repr(value) if not isinstance(value, dict) else "a table"
        return ConfigError(f"{source_of(key)}: {key}: expected {_describe(tp)}, got {shown} ({type(value).__name__})")

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source_of)
            except ConfigError:
                pass
        raise fail()
    if origin is Literal:
        if value in args and type(value) is type(args[0]):
            return value
        raise fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail()
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise fail()
        return tuple(_convert(v, a, f"{key}[{i}]", source_of) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list):
            raise fail()
        return [_convert(v, args[0], f"{key}[{i}]", source_of) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail()
        return {k: _convert(v, args[1], f"{key}.{k}" if key else k, source_of) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail()
        hints = typing.get_type_hints(tp)
        names = [f.name for f in dataclasses.fields(tp)]
        for k in value:
            if k not in hints:
                full = f"{key}.{k}" if key else k
                close = difflib.get_close_matches(k, names, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ConfigError(f"{source_of(full)}: unknown key {full!r} ({hint}known: {', '.join(names)})")
        kwargs = {}
        for f in dataclasses.fields(tp):
            full = f"{key}.{f.name}" if key else f.name
            if f.name in value:
                kwargs[f.name] = _convert(value[f.name], hints[f.name], full, source_of)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{source_of(full)}: missing key {full!r} ({_describe(hints[f.name])})")
        if tp is ModelSection and "overrides" in kwargs:
            kwargs["overrides"] = _model_overrides(kwargs["overrides"], f"{key}.overrides", source_of)
        if tp is ModelSection and "preset" in kwargs and kwargs["preset"] not in PRESETS:
            raise ConfigError(f"{source_of(key + '.preset')}: {key}.preset: unknown preset {kwargs['preset']!r} "
                              f"(known: {', '.join(sorted(PRESETS))})")
        return tp(**kwargs)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in the tree, not in the file


def _model_overrides(overrides: dict[str, Any], key: str, source_of: Any) -> dict[str, Any]:
    """ModelConfig fields checked against ModelConfig's own annotations."""
    hints = typing.get_type_hints(ModelConfig)
    out = {}
    for k, v in overrides.items():
        if k not in hints:
            close = difflib.get_close_matches(k, list(hints), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"{source_of(f'{key}.{k}')}: unknown key '{key}.{k}' ({hint}known: "
                              f"{', '.join(hints)})")
        out[k] = _convert(v, hints[k], f"{key}.{k}", source_of)
    return out
