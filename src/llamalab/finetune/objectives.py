"""SFT and DPO as objectives of the one training loop (``train/loop.py: run``).

The loop brings the optimizer, schedule, precision, accumulation, clipping, metrics, atomic
checkpoints, resume and SIGTERM handling; this module brings the data (``finetune/data.py``),
the model started from a checkpoint (optionally with LoRA adapters, ``finetune/lora.py``) and
the losses:

- **SFT** (Llama 2 §3.1): next-token cross-entropy on the assistant tokens only (the prompt's loss
  is zeroed), summed over a step's loss tokens and divided by their count, so a micro-batch's
  share of the step is its share of the loss tokens. Samples are packed (document mask,
  positions restarting per sample) or padded one per row.
- **DPO** (Rafailov et al. 2023; Llama 3 §4.1.4)::

      loss = -log sigmoid(beta * [(log pi(y_c) - log pi_ref(y_c)) - (log pi(y_r) - log pi_ref(y_r))])
             + nll_weight * NLL(y_c)

  with log pi(y) summed over the response tokens (chunked: ``train.loss.linear_token_logprobs``,
  no full logits), formatting tokens masked out of both sides when ``dpo.mask_formatting``, beta 0.1 and nll_weight 0.2 (Llama 3), the NLL being the mean
  per-token cross-entropy of the chosen responses (as TRL's ``rpo_alpha`` term). The reference
  log-probs are computed once with the starting weights and kept in ``run_dir`` ("cached"), or
  per batch with the LoRA adapters switched off ("adapters-off"). Logged: the implicit rewards
  ``beta (log pi - log pi_ref)`` of each side, their margin and the reward accuracy (chosen >
  rejected), on training batches and on held-out pairs.

Under torchrun the model is sharded with FSDP2 (``train/parallelize.py``, the pretraining path):
each process takes its share of a step's rows or pairs, weighted so that the step's loss is the
same as in one process; held-out figures and the cached reference log-probs are computed over
shares and summed; the export gathers the weights on rank 0 (with LoRA: merged there).
"""

from __future__ import annotations

import glob
from collections import Counter
import math
import os
import sys
from contextlib import nullcontext
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from llamalab.finetune.data import (
    IGNORE_INDEX,
    Batch,
    DataSummary,
    PreferenceSample,
    Row,
    Sample,
    collate,
    collate_preferences,
    share_prompts,
    shared_prefix,
    load_preference_samples,
    load_sft_samples,
    mix_sources,
    pack,
    packing_efficiency,
    pad_id_for,
    sample_rows,
)
from llamalab.finetune.lora import (
    LoRAConfig,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    effective_weight,
    frozen_linears_in,
    load_adapter_state_dict,
    merge_lora,
    save_adapter,
)
from llamalab.finetune.reward import (
    HEAD_FILE,
    NO_LEVEL,
    accuracy_by_level,
    attach_reward_head,
    calibration_table,
    format_accuracy_table,
    pair_margin,
    plot_calibration,
    reward_head,
    reward_loss,
    save_reward_head,
    sequence_rewards,
)
from llamalab.train.config import ConfigError, TrainConfig
from llamalab.train.loss import linear_cross_entropy, linear_token_logprobs
from llamalab.train.metrics import flops_per_token
from llamalab.train.objective import Objective, StepBatches

__all__ = ["DPOObjective", "REFERENCE_FILE", "RewardObjective", "SFTObjective", "dpo_loss", "finetune", "sequence_logps"]

REFERENCE_FILE = "reference_logps.pt"


# ---------------------------------------------------------------- the losses


def sequence_logps(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: the summed log-probability of its labelled targets and how many there are.

    ``logits`` (B, S, V) predict ``labels`` (B, S), already shifted (``labels[:, t]`` is the
    target of position t; -100 where nothing is counted). Returns ``(logps (B,), counts (B,))``
    in fp32 at least.
    """
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    nll = nll.view(labels.shape)
    return -nll.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
             beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """DPO's sigmoid loss per pair and the implicit rewards ``beta (log pi - log pi_ref)`` of each side.

    Arguments are (B,) summed log-probabilities of the chosen and rejected responses under the
    policy and the reference. Returns ``(losses (B,), chosen_rewards (B,), rejected_rewards (B,))``;
    the rewards are detached (figures, not part of the graph).
    """
    logits = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    losses = -F.logsigmoid(beta * logits)
    return losses, (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


# ---------------------------------------------------------------- shared set-up


def adapters_and_head(model: nn.Module, holder: nn.Module, key: str) -> dict[str, Tensor]:
    """What a LoRA checkpoint of a model with a scalar head holds: the adapters, and the head (always
    trained in full, a new module) of ``holder`` (``model`` or a part of it) under ``key``."""
    return {**adapter_state_dict(model), key: reward_head(holder).weight.detach()}


def load_adapters_and_head(model: nn.Module, holder: nn.Module, key: str, weights: dict[str, Tensor], source: str,
                           what: str) -> None:
    """Put what :func:`adapters_and_head` saved back (ConfigError naming ``source`` without the head)."""
    weights = dict(weights)
    head = weights.pop(key, None)
    if head is None:
        raise ConfigError(f"{source}: no {what} ({key}) in the checkpoint")
    load_adapter_state_dict(model, weights, source=source)
    with torch.no_grad():
        reward_head(holder).weight.copy_(head)


def _expand(patterns: Sequence[str], key: str) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        found = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        if not found or not all(Path(f).is_file() for f in found):
            raise ConfigError(f"{key}: {pat!r}: no such file; expected JSONL ({'a glob matched nothing' if glob.has_magic(pat) else 'check the path'})")
        out += [Path(f) for f in found]
    return out


def _split(items: list[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``fraction`` of ``items`` (seeded): (train, val)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = max(1, int(round(fraction * len(items))))
    val = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val], [x for i, x in enumerate(items) if i in val]


class _Finetune(Objective):
    """What SFT and DPO share: the checkpoint, tokenizer, data split, row order, LoRA and export."""

    needs_train_data = True  # finetune.train_data or finetune.sources (PPO reads ppo.prompts instead)

    def __init__(self, cfg: TrainConfig, world_size: int = 1) -> None:
        if world_size > 1 and cfg.train.tensor_parallel > 1:
            raise ConfigError(f"train.tensor_parallel={cfg.train.tensor_parallel}: fine-tuning shards with FSDP2 "
                              f"only; set train.tensor_parallel = 1")
        if not cfg.model.checkpoint:
            raise ConfigError("model.checkpoint: fine-tuning starts from a checkpoint; set model.checkpoint = "
                              "\"PATH\" (or a registered name such as smollm2-135m-instruct)")
        if self.needs_train_data and not cfg.finetune.train_data and not cfg.finetune.sources:
            raise ConfigError("finetune.train_data: no training data; list JSONL files (or globs), or give "
                              "[[finetune.sources]]")
        from llamalab.checkpoint import read_checkpoint

        self.cfg = cfg
        self.ckpt = read_checkpoint(cfg.model.checkpoint)
        if cfg.model.overrides:
            self.ckpt.config = self.ckpt.config.replace(**cfg.model.overrides)
        self.tokenizer = self.ckpt.tokenizer
        if self.tokenizer is None:
            raise ConfigError(f"model.checkpoint={cfg.model.checkpoint!r}: has no tokenizer; fine-tuning renders "
                              f"conversations with the checkpoint's own tokenizer and chat format")
        self.fmt = None if cfg.finetune.chat_format == "auto" else cfg.finetune.chat_format
        self.pad_id = pad_id_for(self.tokenizer)
        self.seq_len = cfg.train.seq_len
        self.rows_per_step = cfg.train.global_batch_tokens // cfg.train.seq_len
        self.micro = cfg.train.micro_batch_size
        self.distributed = world_size > 1
        self.dp_rank, self.dp_size = 0, world_size
        if self.rows_per_step % world_size:
            raise ConfigError(f"train.global_batch_tokens / train.seq_len = {self.rows_per_step} rows (or pairs) a "
                              f"step: not divisible among {world_size} processes")
        self.lora = LoRAConfig(**asdict(cfg.lora)) if cfg.finetune.lora else None
        self.base_cast = False  # LoRA at bf16: the frozen linears are held in bf16 (build_model)
        self.consumed = 0  # rows (SFT) or pairs (DPO) taken so far, over all epochs
        self.notes: list[str] = []
        self._load_data()
        if not self.n_units:
            raise ConfigError(f"finetune.train_data: no usable records in {', '.join(map(str, self.train_files))} "
                              f"(see the set-aside summary above)")
        self.total_units = max(1, int(round(cfg.finetune.epochs * self.n_units)))
        steps = math.ceil(self.total_units / self.rows_per_step)
        self._total_steps = min(steps, cfg.finetune.max_steps) if cfg.finetune.max_steps else steps
        self._check_vocab()

    # -- data
    def _load_data(self) -> None:
        raise NotImplementedError

    def _check_vocab(self) -> None:
        vocab = self.ckpt.config.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise ConfigError(f"model.checkpoint: the tokenizer has {self.tokenizer.vocab_size} ids but the model "
                              f"{vocab}")

    def _summaries(self, kind: str, train: DataSummary, val: DataSummary | None) -> None:
        say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731 - before the loop's bar exists
        say(f"{self.name}: {kind} {', '.join(train.files)}: " + train.format().replace("\n", "\n    "))
        if val is not None:
            say(f"{self.name}: held out {', '.join(val.files)}: " + val.format().replace("\n", "\n    "))
        self.data_summary = {"train": train.to_dict(), "val": val.to_dict() if val is not None else None}

    @property
    def total_steps(self) -> int:
        return self._total_steps

    def _order(self, epoch: int) -> np.ndarray:
        n = self.n_units
        if not self.cfg.finetune.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.cfg.seed, epoch]).permutation(n)

    def _training_data(self, load: Callable[[list[Path]], tuple[list[Any], DataSummary]],
                       kind: str) -> tuple[list[Any], list[Any]]:
        """(train, held out) samples: ``finetune.train_data`` and the ``[[finetune.sources]]``
        mixture, each source loaded by ``load``, held out per source (``val_fraction``) unless
        ``val_data`` is given, then mixed (``finetune/data.py: mix_sources``)."""
        f = self.cfg.finetune
        specs = ([("train_data", f.train_data, "finetune.train_data", 1.0, None)] if f.train_data else []) + [
            (src.name or f"sources[{i}]", src.files, f"finetune.sources[{i}].files", src.fraction, src.share)
            for i, src in enumerate(f.sources)]
        parts, summaries, val = [], [], []
        self.train_files = []
        for name, files, key, fraction, share in specs:
            paths = _expand(files, key)
            self.train_files += paths
            items, summary = load(paths)
            if not f.val_data:
                items, held = _split(items, f.val_fraction, self.cfg.seed)
                val += held
            parts.append((name, items, fraction, share))
            summaries.append(summary)
        try:
            train, self.mixture = mix_sources(parts, self.cfg.seed)
        except ValueError as e:
            raise ConfigError(f"finetune.sources: {e}") from None
        val_summary = None
        if f.val_data:
            val, val_summary = load(_expand(f.val_data, "finetune.val_data"))
        self._summaries(kind, DataSummary.merged(summaries), val_summary)
        if len(parts) > 1:
            print(f"{self.name}: mixture " + ", ".join(f"{m['name']} {m['taken']:,} of {m['available']:,}"
                                                       for m in self.mixture), file=sys.stderr, flush=True)
        return train, val

    def _load_pairs(self) -> None:
        """Preference pairs (DPO, reward models): ``self.pairs``, ``self.val_pairs``, ``self.n_units``."""
        load = lambda paths: load_preference_samples(paths, self.tokenizer, fmt=self.fmt,  # noqa: E731
                                                     max_len=self.seq_len)
        pairs, val = self._training_data(load, "preference pairs")
        self.pairs: list[PreferenceSample] = pairs
        self.val_pairs: list[PreferenceSample] = val
        self.n_units = len(pairs)

    def _pair_tokens(self, sides: list[Sample]) -> int:
        """The tokens one pair's forward runs (its sides', the first tokens they share counted once
        under ``finetune.share_prompt``): what a step's tokens and throughput count."""
        total = sum(len(s) for s in sides)
        return total - shared_prefix(sides) * (len(sides) - 1) if self.cfg.finetune.share_prompt else total

    def _next_units(self) -> list[int]:
        """The indices of the next step's rows (or pairs) over all processes, epoch after epoch, seeded."""
        take = min(self.rows_per_step, self.total_units - self.consumed)
        if take <= 0:  # max_steps beyond the epochs cannot happen (steps are capped), but stay safe
            take = self.rows_per_step
        # Every process takes the same number (FSDP needs the same forwards on each): a short last
        # step is rounded up into the next epoch's order.
        take = -(-take // self.dp_size) * self.dp_size
        out = []
        for k in range(self.consumed, self.consumed + take):
            epoch, j = divmod(k, self.n_units)
            if j == 0 or not hasattr(self, "_perm") or self._perm_epoch != epoch:
                self._perm, self._perm_epoch = self._order(epoch), epoch
            out.append(int(self._perm[j]))
        self.consumed += take
        return out

    def _mine(self, idx: list[int]) -> list[int]:
        """This process's share of a step's units."""
        return idx[self.dp_rank::self.dp_size]

    def _eval_share(self, n_batches: int) -> list[tuple[int, bool]]:
        """The held-out batches this process runs, and whether each counts: the same number on every
        process (FSDP), a batch run only to keep step with the others not counted."""
        if self.dp_size == 1:
            return [(j, True) for j in range(n_batches)]
        per = -(-n_batches // self.dp_size)
        out = []
        for i in range(per):
            j = self.dp_rank + i * self.dp_size
            out.append((j % max(n_batches, 1), j < n_batches))
        return out

    def _sum_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        if not self.distributed:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return dict(zip(keys, t.tolist()))

    def start(self, model: nn.Module, device: torch.device, tokens_seen: int, dp_rank: int, dp_size: int,
              extra: dict[str, Any], autocast: Callable[[], Any] | None = None) -> None:
        self.model, self.device = model, device
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def data_state(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_data_state(self, state: dict[str, Any] | None, extra: dict[str, Any]) -> None:
        self.consumed = int((state or {}).get("consumed", 0))

    # -- model
    def build_model(self, device: torch.device, precision: str, mesh: Any) -> nn.Module:
        from llamalab.checkpoint.base import build_model, meta_model
        from llamalab.train.parallelize import load_full_state_dict, parallelize

        t = self.cfg.train
        self.device = device
        # The weights (and the adapters' initial values, drawn from the seeded RNG) as one process
        # would have them; with FSDP each process then keeps its shards of them.
        # LoRA at bf16 in one process: the frozen linears held in bf16 from the build on (the same
        # products as autocast's casts, half their memory; the export merges into the fp32
        # starting weights, not into these).
        hold = frozen_linears_in(torch.bfloat16) if self.lora is not None and mesh is None and precision == "bf16" \
            else None
        model = build_model(self.ckpt, dtype=torch.float32, device="cpu" if mesh is not None else device, hold=hold)
        model.train()
        self.base_cast = any(p.dtype != torch.float32 for p in model.parameters())
        if self.lora is not None:
            apply_lora(model, self.lora)
        self._adapt(model)
        if mesh is not None:
            full = model.state_dict()
            sharded = meta_model(model.config)
            if self.lora is not None:
                apply_lora(sharded, self.lora)
            self._adapt(sharded)
            parallelize(sharded, mesh, dp_shard=True, mixed_precision="bf16" if precision == "bf16" else "fp32",
                        activation_checkpointing=t.activation_checkpointing, compile=t.compile)
            sharded.to_empty(device=device)
            load_full_state_dict(sharded, full)
            sharded.init_buffers(device)
            del model, full
            return sharded.train()
        if t.activation_checkpointing != "none" or t.compile:
            parallelize(model, None, dp_shard=False, activation_checkpointing=t.activation_checkpointing,
                        compile=t.compile)
        return model

    def _adapt(self, model: nn.Module) -> None:
        """What a method changes on the loaded model (after LoRA, before sharding): nothing here."""

    def checkpoint_weights(self, model: nn.Module) -> dict[str, Tensor] | None:
        return adapter_state_dict(model) if self.lora is not None else None

    def load_weights(self, model: nn.Module, weights: dict[str, Tensor], source: str) -> None:
        if self.lora is not None:
            load_adapter_state_dict(model, weights, source=source)
        else:
            model.load_state_dict(weights, strict=True)

    def flops_per_token(self, model: nn.Module, seq_len: int) -> float | None:
        full = flops_per_token(model.config, seq_len)
        # LoRA: no weight gradients for the frozen matrices, so about forward + input gradients (4N of 6N).
        return full * 2 / 3 if self.lora is not None else full

    def export(self, run_dir: Path, model: nn.Module, distributed: bool) -> Path | None:
        from llamalab.checkpoint.base import build_model
        from llamalab.train.loop import export_native
        from llamalab.train.parallelize import export_full_state_dict

        if self.lora is not None and (distributed or self.base_cast):
            # Merge into the starting weights in fp32 on rank 0 (the trained base may be sharded, or
            # held in bf16): gather the adapters, put them on a fresh copy of the base.
            state = export_full_state_dict(model) if distributed else adapter_state_dict(model)
            if distributed and dist.get_rank() != 0:
                return None
            plain = build_model(self.ckpt, dtype=torch.float32, device="cpu")
            apply_lora(plain, self.lora)
            load_adapter_state_dict(plain, {k: v for k, v in state.items() if ".lora_" in k}, source="the run")
            model, distributed = plain, False
        if self.lora is not None:
            adapter = save_adapter(model, run_dir / "adapter", base=self.cfg.model.checkpoint)
            self.notes.append(f"LoRA adapter: {adapter} (llamalab merge-lora --base {self.cfg.model.checkpoint} "
                              f"--adapter {adapter} --out DIR)")
            merge_lora(model)  # the run is over: final/ is the merged model, ready to generate
        return export_native(run_dir, model, self.tokenizer, distributed, source_format=f"llamalab-{self.name}")

    def summary(self) -> dict[str, Any]:
        return {"data": self.data_summary, "mixture": self.mixture, "notes": self.notes,
                "lora": self.lora.to_dict() if self.lora else None}


# ---------------------------------------------------------------- SFT


class SFTObjective(_Finetune):
    """Supervised fine-tuning on conversations, the loss on assistant tokens only (see the module doc)."""

    name = "sft"

    def _load_data(self) -> None:
        f = self.cfg.finetune
        kw = dict(fmt=self.fmt, train_on=f.train_on, max_len=self.seq_len)
        samples, val = self._training_data(lambda paths: load_sft_samples(paths, self.tokenizer, **kw),
                                           "training data")
        self.packed_from: list[list[Sample]] = []
        self.rows = self._rows(samples, f.packing)
        self.val_rows = self._rows(val, f.packing)
        self.n_units = len(self.rows)
        self.packed = f.packing
        self._eff = packing_efficiency(self.rows, self.seq_len)
        self._n = (len(samples), len(val))

    def describe(self) -> list[str]:
        return [f"sft: {self._n[0]:,} training samples -> {len(self.rows):,} rows of <= {self.seq_len} tokens "
                f"({'packed' if self.packed else 'one sample a row'}; {self._eff:.1%} of the slots real tokens at "
                f"seq_len), {self._n[1]:,} held out; {self.rows_per_step} rows a step, {self._total_steps} steps, "
                f"loss on {self.cfg.finetune.train_on} turns"]

    def _rows(self, samples: list[Sample], packing: bool) -> list[Row]:
        if not samples:
            return []
        if packing:
            order = np.random.default_rng(self.cfg.seed).permutation(len(samples)) if self.cfg.finetune.shuffle \
                else np.arange(len(samples))
            ordered = [samples[i] for i in order]
            self.packed_from.append(ordered)  # [train, val]: what each Row.samples indexes
            return pack(ordered, self.seq_len)
        self.packed_from.append(samples)
        return sample_rows(samples)

    def _collate(self, rows: list[Row]) -> Batch:
        return collate(rows, pad_id=self.pad_id)

    def step_batches(self, tokens_seen: int, say: Callable[[str], None]) -> StepBatches:
        idx = self._next_units()
        mine = self._mine(idx)
        batches = [self._collate([self.rows[i] for i in mine[k:k + self.micro]]) for k in range(0, len(mine), self.micro)]
        # A micro-batch weighs its share of the loss tokens of the whole step (all processes; FSDP
        # averages the processes' gradients, hence the dp_size), so the step's loss is their mean.
        total = max(sum(int((self.rows[i].labels != IGNORE_INDEX).sum()) for i in idx), 1)
        real = sum(len(self.rows[i].tokens) for i in idx)
        return StepBatches([(b, b.n_loss_tokens * self.dp_size / total) for b in batches], real, self.seq_len)

    def _forward_loss(self, model: nn.Module, batch: Batch) -> Tensor:
        dev = self.device
        tokens = batch.tokens.to(dev)
        kw: dict[str, Any] = {}
        if self.packed:  # several samples a row: each attends to itself only, positions restart
            kw = {"input_pos": batch.input_pos.to(dev), "doc_ids": batch.doc_ids.to(dev)}
        labels = batch.labels.to(dev)
        head = model.output
        # FSDP's hooks are on forward(), which the fused head + loss would bypass; dropout on an
        # adapter of the head cannot be folded into its weight: both take the full logits.
        if self.distributed or (self.lora is not None and self.lora.dropout and hasattr(head, "_lora_handle")):
            logits = model(tokens, **kw)
            return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        h = model.hidden_states(tokens, **kw)
        # The fused head + loss uses the head's weight, not its module: fold an adapter on it in.
        return linear_cross_entropy(h, effective_weight(head), labels)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        return self._forward_loss(model, batch), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, float] | None:
        if not self.val_rows:
            return None
        model.eval()
        total, count = 0.0, 0
        starts = list(range(0, min(len(self.val_rows), self.cfg.eval.batches * self.micro), self.micro))
        for j, counted in self._eval_share(len(starts)):
            batch = self._collate(self.val_rows[starts[j]:starts[j] + self.micro])
            with autocast():
                loss = self._forward_loss(model, batch)
            if counted:
                total += float(loss) * batch.n_loss_tokens
                count += batch.n_loss_tokens
        model.train()
        sums = self._sum_over_processes({"total": total, "count": float(count)})
        return {"val_loss": sums["total"] / max(sums["count"], 1)}


# ---------------------------------------------------------------- DPO


class DPOObjective(_Finetune):
    """Direct preference optimisation with Llama 3's NLL term and masks (see the module doc)."""

    name = "dpo"

    def _load_data(self) -> None:
        self._load_pairs()
        d = self.cfg.dpo
        self.reference = d.reference if d.reference != "auto" else ("adapters-off" if self.lora else "cached")
        self.ref: dict[str, Tensor] | None = None

    def describe(self) -> list[str]:
        d = self.cfg.dpo
        return [f"dpo: {len(self.pairs):,} training pairs, {len(self.val_pairs):,} held out; {self.rows_per_step} "
                f"pairs a step, {self._total_steps} steps; beta {d.beta}, NLL weight {d.nll_weight}, formatting "
                f"tokens {'masked' if d.mask_formatting else 'kept'}; reference log-probs: {self.reference}"]

    def _collate(self, idx: list[int], pairs: list[PreferenceSample]) -> dict[str, Any]:
        if self.cfg.finetune.share_prompt:  # one row a pair, the prompt once (see share_prompts)
            s = share_prompts(sample_rows([pairs[i].chosen for i in idx]), sample_rows([pairs[i].rejected for i in idx]),
                              pad_id=self.pad_id, mask_formatting=self.cfg.dpo.mask_formatting)
            return {"tokens": s.tokens, "input_pos": s.input_pos, "mask": s.mask, "index": s.index,
                    "labels": s.targets, "idx": idx, "n_real": s.n_real}
        b = collate_preferences([pairs[i] for i in idx], pad_id=self.pad_id)
        labels = torch.cat([b.chosen.labels, b.rejected.labels])
        if self.cfg.dpo.mask_formatting:
            labels = labels.masked_fill(torch.cat([b.chosen.label_formatting, b.rejected.label_formatting]),
                                        IGNORE_INDEX)
        return {"tokens": torch.cat([b.chosen.tokens, b.rejected.tokens]), "labels": labels, "idx": idx,
                "n_real": b.chosen.n_real + b.rejected.n_real}

    def _logps(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Per side (chosen rows, then rejected): summed log-probs of its targets and their count."""
        tokens, labels = batch["tokens"].to(self.device), batch["labels"].to(self.device)
        shared = "index" in batch  # one row a pair: each side's targets read at its slots
        kw = {"input_pos": batch["input_pos"].to(self.device), "mask": batch["mask"].to(self.device)} if shared else {}
        head = model.output
        if self.distributed or (self.lora is not None and self.lora.dropout and hasattr(head, "_lora_handle")):
            logits = model(tokens, **kw)  # (FSDP's hooks are on forward(); see SFT)
            if shared:
                logits = logits.flatten(0, 1)[batch["index"].to(self.device)]
            return sequence_logps(logits, labels)
        hidden = model.hidden_states(tokens, **kw)
        if shared:
            hidden = hidden.flatten(0, 1)[batch["index"].to(self.device)]
        # The head and the log-softmax a chunk of tokens at a time: no (2B, S, vocab) logits.
        lp = linear_token_logprobs(hidden, effective_weight(head), labels, ignore_index=IGNORE_INDEX)
        return lp.sum(dim=1), (labels != IGNORE_INDEX).sum(dim=1)

    @torch.no_grad()
    def _reference(self, model: nn.Module, pairs: list[PreferenceSample]) -> Tensor:
        """(N, 2) reference log-probs [chosen, rejected] of ``pairs`` with the model as it is now
        (with FSDP each process computes its share; the table is summed over processes)."""
        was = model.training
        model.eval()
        out = torch.zeros(len(pairs), 2, dtype=torch.float64)
        starts = list(range(0, len(pairs), self.micro))
        for j, counted in self._eval_share(len(starts)):
            k = starts[j]
            idx = list(range(k, min(k + self.micro, len(pairs))))
            logps, _ = self._logps(model, self._collate(idx, pairs))
            n = len(idx)
            if counted:
                out[k:k + n, 0], out[k:k + n, 1] = logps[:n].double().cpu(), logps[n:].double().cpu()
        model.train(was)
        if self.distributed:
            t = out.to(self.device)
            dist.all_reduce(t)
            out = t.cpu()
        return out

    def start(self, model: nn.Module, device: torch.device, tokens_seen: int, dp_rank: int, dp_size: int,
              extra: dict[str, Any], autocast: Callable[[], Any] | None = None) -> None:
        super().start(model, device, tokens_seen, dp_rank, dp_size, extra, autocast)
        if self.reference != "cached":
            return
        path = Path(self.cfg.run_dir) / REFERENCE_FILE
        if path.is_file():
            self.ref = torch.load(path, map_location="cpu", weights_only=True)
            if self.ref["train"].shape[0] != len(self.pairs) or self.ref["val"].shape[0] != len(self.val_pairs):
                raise ConfigError(f"{path}: reference log-probs for {self.ref['train'].shape[0]} + "
                                  f"{self.ref['val'].shape[0]} pairs, the data has {len(self.pairs)} + "
                                  f"{len(self.val_pairs)}; the data changed since this run began (use a new run_dir)")
            return
        if self.consumed:
            raise ConfigError(f"{path}: missing, but the run has trained (the reference log-probs need the starting "
                              f"weights); start a new run_dir")
        main = not self.distributed or dist.get_rank() == 0
        if main:
            print(f"dpo: reference log-probs of {len(self.pairs) + len(self.val_pairs):,} pairs with the starting "
                  f"weights -> {path}", file=sys.stderr, flush=True)
        # In the precision the policy runs in, so that step 1's policy and reference agree exactly.
        with adapters_disabled(model) if self.lora is not None else nullcontext(), (autocast or nullcontext)():
            self.ref = {"train": self._reference(model, self.pairs), "val": self._reference(model, self.val_pairs)}
        if main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            torch.save(self.ref, tmp)
            os.replace(tmp, path)
        if self.distributed:
            dist.barrier()

    def step_batches(self, tokens_seen: int, say: Callable[[str], None]) -> StepBatches:
        idx = self._next_units()
        mine = self._mine(idx)
        items = [self._collate(mine[k:k + self.micro], self.pairs) for k in range(0, len(mine), self.micro)]
        for it in items:
            it["split"] = "train"
        real = sum(self._pair_tokens([self.pairs[i].chosen, self.pairs[i].rejected]) for i in idx)
        # The mean over this process's pairs; FSDP averages the processes (the same number of pairs each).
        return StepBatches([(b, len(b["idx"]) / len(mine)) for b in items], real, self.seq_len)

    def _ref_logps(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if self.reference == "cached":
            r = self.ref[batch["split"]][batch["idx"]]
            return r[:, 0].to(self.device, torch.float32), r[:, 1].to(self.device, torch.float32)
        with torch.no_grad(), adapters_disabled(model):
            logps, _ = self._logps(model, batch)
        n = len(batch["idx"])
        return logps[:n].float(), logps[n:].float()

    def _loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        d = self.cfg.dpo
        n = len(batch["idx"])
        ref_c, ref_r = self._ref_logps(model, batch)
        logps, counts = self._logps(model, batch)
        losses, r_c, r_r = dpo_loss(logps[:n], logps[n:], ref_c, ref_r, beta=d.beta)
        nll = -logps[:n].sum() / counts[:n].sum().clamp(min=1)
        loss = losses.mean() + d.nll_weight * nll
        stats = {"dpo_loss": losses.mean().detach(), "nll": nll.detach(), "reward_chosen": r_c.mean(),
                 "reward_rejected": r_r.mean(), "reward_margin": (r_c - r_r).mean(),
                 "reward_accuracy": (r_c > r_r).float().mean()}
        return loss, stats

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        return self._loss(model, batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, float] | None:
        if not self.val_pairs:
            return None
        model.eval()
        sums: dict[str, float] = {"n": 0.0}
        limit = min(len(self.val_pairs), self.cfg.eval.batches * self.micro)
        starts = list(range(0, limit, self.micro))
        for j, counted in self._eval_share(len(starts)):
            k = starts[j]
            batch = self._collate(list(range(k, min(k + self.micro, limit))), self.val_pairs)
            batch["split"] = "val"
            with autocast():
                loss, stats = self._loss(model, batch)
            if not counted:
                continue
            n = len(batch["idx"])
            sums["n"] += n
            for key, v in {"loss": loss, **stats}.items():
                sums[key] = sums.get(key, 0.0) + float(v) * n
        model.train()
        if self.distributed:  # every process must name the same figures, even one that counted nothing
            for key in ("loss", "dpo_loss", "nll", "reward_chosen", "reward_rejected", "reward_margin",
                        "reward_accuracy"):
                sums.setdefault(key, 0.0)
        sums = self._sum_over_processes(sums)
        n_total = sums.pop("n")
        return {f"val_{k}": v / max(n_total, 1) for k, v in sums.items()}


# ---------------------------------------------------------------- reward model


class RewardObjective(_Finetune):
    """A reward model (Llama 2 §3.2.2): the trunk with a scalar head, trained with the margin
    ranking loss on preference pairs (see ``finetune/reward.py``)."""

    name = "reward"

    def _load_data(self) -> None:
        self._load_pairs()
        self.margin_mode = self.cfg.reward.margin
        self.head_seed = self.cfg.seed  # every process of a sharded run draws the same head

    def describe(self) -> list[str]:
        levels = Counter(p.preference or NO_LEVEL for p in self.pairs)
        return [f"reward: {len(self.pairs):,} training pairs ({', '.join(f'{k} {v:,}' for k, v in levels.items())}), "
                f"{len(self.val_pairs):,} held out; {self.rows_per_step} pairs a step, {self._total_steps} steps; "
                f"margin {self.margin_mode}"]

    def start(self, model: nn.Module, device: torch.device, tokens_seen: int, dp_rank: int, dp_size: int,
              extra: dict[str, Any], autocast: Callable[[], Any] | None = None) -> None:
        super().start(model, device, tokens_seen, dp_rank, dp_size, extra, autocast)
        self.autocast = autocast or nullcontext  # for the export's last held-out pass

    def _adapt(self, model: nn.Module) -> None:
        attach_reward_head(model, seed=self.head_seed)  # trainable, also with LoRA (a new module)

    def checkpoint_weights(self, model: nn.Module) -> dict[str, Tensor] | None:
        return None if self.lora is None else adapters_and_head(model, model, "output.weight")

    def load_weights(self, model: nn.Module, weights: dict[str, Tensor], source: str) -> None:
        if self.lora is None:
            model.load_state_dict(weights, strict=True)
        else:
            load_adapters_and_head(model, model, "output.weight", weights, source, "reward head")

    def flops_per_token(self, model: nn.Module, seq_len: int) -> float | None:
        # No vocabulary head: the trunk's 6N (LoRA: 4N) per token, the head's 2 x dim negligible.
        c = model.config
        full = flops_per_token(c, seq_len) - 6 * c.dim * c.vocab_size
        return full * 2 / 3 if self.lora is not None else full

    def _collate(self, idx: list[int], pairs: list[PreferenceSample]) -> dict[str, Any]:
        """Chosen sides, then rejected, then the edited answers of the pairs that have one: one
        forward scores them all (with ``finetune.share_prompt``, one row a pair; else a row a side,
        padded to one width)."""
        sel = [pairs[i] for i in idx]
        edited = [k for k, p in enumerate(sel) if p.edited is not None]
        margin = torch.tensor([pair_margin(p.margin, p.preference, self.margin_mode) for p in sel])
        out = {"margin": margin, "idx": idx, "edited": torch.tensor(edited, dtype=torch.long),
               "comparisons": len(sel) + 2 * len(edited)}
        if self.cfg.finetune.share_prompt:  # one row a pair, the tokens its sides share once (share_prompts)
            s = share_prompts(sample_rows([p.chosen for p in sel]), sample_rows([p.rejected for p in sel]),
                              [None if p.edited is None else sample_rows([p.edited])[0] for p in sel], pad_id=self.pad_id)
            return {**out, "tokens": s.tokens, "input_pos": s.input_pos, "mask": s.mask, "slots": s.last}
        sides = [p.chosen for p in sel] + [p.rejected for p in sel] + [sel[k].edited for k in edited]
        rows = sample_rows(sides)
        width = max(len(r) for r in rows)
        return {**out, "tokens": collate(rows, pad_id=self.pad_id, pad_to=width).tokens,
                "lengths": torch.tensor([len(x) for x in sides])}

    def _comparisons(self, i: int, pairs: list[PreferenceSample]) -> int:
        return 3 if pairs[i].edited is not None else 1

    def _loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        r = sequence_rewards(model, batch["tokens"].to(self.device), batch.get("lengths"), full_forward=self.distributed,
                             input_pos=batch.get("input_pos"), mask=batch.get("mask"), slots=batch.get("slots"))
        n = len(batch["idx"])
        r_c, r_r, r_e = r[:n], r[n:2 * n], r[2 * n:]
        hi, lo, m = [r_c], [r_r], [batch["margin"].to(r.device)]
        if r_e.numel():  # Llama 3's three-way ranking: edited > chosen > rejected, every ordered pair
            e = batch["edited"].to(r.device)
            hi += [r_e, r_e]
            lo += [r_c[e], r_r[e]]
            m += [torch.zeros_like(r_e)] * 2  # the level grades chosen against rejected only
        losses = reward_loss(torch.cat(hi), torch.cat(lo), torch.cat(m))
        d = (r_c - r_r).detach()
        stats = {"reward_chosen": r_c.mean().detach(), "reward_rejected": r_r.mean().detach(),
                 "reward_margin": d.mean(), "accuracy": (d > 0).float().mean()}
        return losses.mean(), stats, d

    def step_batches(self, tokens_seen: int, say: Callable[[str], None]) -> StepBatches:
        idx = self._next_units()
        mine = self._mine(idx)
        items = [self._collate(mine[k:k + self.micro], self.pairs) for k in range(0, len(mine), self.micro)]
        sides = lambda p: [p.chosen, p.rejected] + ([p.edited] if p.edited is not None else [])  # noqa: E731
        real = sum(self._pair_tokens(sides(self.pairs[i])) for i in idx)
        # Every comparison weighs the same in the step (all processes; FSDP averages them).
        total = sum(self._comparisons(i, self.pairs) for i in idx)
        return StepBatches([(b, b["comparisons"] * self.dp_size / total) for b in items], real, self.seq_len)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        loss, stats, _ = self._loss(model, batch)
        return loss, stats

    @torch.no_grad()
    def _held_out(self, model: nn.Module, autocast: Callable[[], Any], limit: int) -> tuple[dict[str, float], list[float], list[str | None]]:
        """Loss sums and the score differences of the first ``limit`` held-out pairs (all processes)."""
        was = model.training
        model.eval()
        sums: dict[str, float] = {"n": 0.0, "loss": 0.0}
        diffs = torch.zeros(limit, dtype=torch.float64)
        starts = list(range(0, limit, self.micro))
        for j, counted in self._eval_share(len(starts)):
            k = starts[j]
            idx = list(range(k, min(k + self.micro, limit)))
            batch = self._collate(idx, self.val_pairs)
            with autocast():
                loss, _, d = self._loss(model, batch)
            if counted:
                sums["n"] += batch["comparisons"]
                sums["loss"] += float(loss) * batch["comparisons"]
                diffs[k:k + len(idx)] = d.double().cpu()
        model.train(was)
        if self.distributed:
            t = diffs.to(self.device)
            dist.all_reduce(t)
            diffs = t.cpu()
        sums = self._sum_over_processes(sums)
        return sums, diffs.tolist(), [p.preference for p in self.val_pairs[:limit]]

    def evaluate(self, model: nn.Module, autocast: Callable[[], Any]) -> dict[str, float] | None:
        if not self.val_pairs:
            return None
        limit = min(len(self.val_pairs), self.cfg.eval.batches * self.micro)
        sums, diffs, levels = self._held_out(model, autocast, limit)
        out = {"val_loss": sums["loss"] / max(sums["n"], 1)}
        for level, row in accuracy_by_level(diffs, levels).items():
            out["val_accuracy" if level == "all" else f"val_accuracy_{level}"] = row["accuracy"]
        out["val_reward_margin"] = float(np.mean(diffs)) if diffs else 0.0
        return out

    def export(self, run_dir: Path, model: nn.Module, distributed: bool) -> Path | None:
        from llamalab.checkpoint.base import build_model
        from llamalab.train.loop import export_native
        from llamalab.train.parallelize import export_full_state_dict

        # Every held-out pair, once more with the final weights: the accuracy table and calibration.
        evaluated = None
        if self.val_pairs:
            evaluated = self._held_out(model, self.autocast, len(self.val_pairs))
        state = export_full_state_dict(model) if distributed else model.state_dict()
        if distributed and dist.get_rank() != 0:
            return None
        head = state.pop("output.weight").detach().to("cpu", torch.float32)
        # The trunk as an ordinary checkpoint, with the starting model's next-token head.
        plain = build_model(self.ckpt, dtype=torch.float32, device="cpu")
        if self.lora is not None:
            apply_lora(plain, self.lora)
            load_adapter_state_dict(plain, {k: v for k, v in state.items() if ".lora_" in k}, source="the run")
            adapter = save_adapter(plain, run_dir / "adapter", base=self.cfg.model.checkpoint)
            self.notes.append(f"LoRA adapter of the trunk: {adapter} (the head is in final/{HEAD_FILE})")
            merge_lora(plain)
        else:
            trunk = {k: v for k, v in state.items() if k != "output.weight"}
            missing, unexpected = plain.load_state_dict(trunk, strict=False)
            if unexpected or [k for k in missing if k != "output.weight"]:
                raise RuntimeError(f"reward export: unexpected {unexpected}, missing {missing}")
        out = export_native(run_dir, plain, self.tokenizer, False, source_format="llamalab-reward")
        attach_reward_head(plain)
        with torch.no_grad():
            reward_head(plain).weight.copy_(head)
        meta: dict[str, Any] = {"margin": self.margin_mode, "chat_format": self.cfg.finetune.chat_format,
                                "base": self.cfg.model.checkpoint}
        if evaluated is not None:
            sums, diffs, levels = evaluated
            acc = accuracy_by_level(diffs, levels)
            table = calibration_table(diffs)
            meta["held_out"] = {"pairs": len(diffs), "loss": sums["loss"] / max(sums["n"], 1),
                                "accuracy_by_level": acc, "calibration": table}
            png = plot_calibration(table, out / "calibration.png",
                                   title=f"reward model calibration ({len(diffs)} held-out pairs)")
            self.notes.append(f"held-out accuracy by preference level:\n{format_accuracy_table(acc)}\n"
                              f"calibration plot: {png}")
            self.held_out = meta["held_out"]
        save_reward_head(plain, out, meta)
        return out

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "held_out": getattr(self, "held_out", None)}


# ---------------------------------------------------------------- entry point

OBJECTIVES: dict[str, type[_Finetune]] = {"sft": SFTObjective, "dpo": DPOObjective, "reward": RewardObjective}


def finetune(cfg: TrainConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the fine-tuning run ``cfg`` (``finetune.method`` = "sft", "dpo", "reward" or "ppo") with the
    training loop; returns its summary. ConfigError before any compute for bad config or data."""
    from llamalab.train.loop import run
    from llamalab.train.parallelize import init_distributed

    _rank, world_size, _local = init_distributed()
    cfg.validate(world_size)
    if cfg.finetune.method == "ppo":
        from llamalab.finetune.ppo_loop import PPOObjective  # (it builds on this module)

        objective: _Finetune = PPOObjective(cfg, world_size)
    else:
        objective = OBJECTIVES[cfg.finetune.method](cfg, world_size)
    return run(cfg, objective, progress=progress)
