"""LoRA (Hu et al. 2021) applied to a built model from outside, like parallelism and speed levers.

A frozen linear ``y = W x`` becomes ``y = W x + (alpha / r) * B (A dropout(x))`` with ``A``
(r x in) initialised as Kaiming-uniform and ``B`` (out x r) as zeros, so training starts from
the base model exactly. The model file does not change: :func:`apply_lora` adds two small
linears as children of each targeted ``nn.Linear`` (``layers.0.attention.wq.lora_a.weight``,
``...wq.lora_b.weight``; torchtune's names) and a forward hook that adds their product to the
layer's output. The base weights keep their Meta names, so a LoRA model still loads and saves
base checkpoints, and the hook composes with whatever class the linear has (the oneDNN training
linears of ``train/speed.py`` included).

- :func:`apply_lora`: adapters on the named linears (default: q, v, the attention output and the
  three SwiGLU linears, rank 8, alpha 16 — torchtune's Llama recipes); freezes everything else.
- :func:`adapter_state_dict` / :func:`load_adapter_state_dict`: only the adapters, for training
  checkpoints and the exported ``adapter.safetensors``.
- :func:`adapters_disabled`: the base model, for DPO's reference log-probs without a second copy.
- :func:`merge_lora`: fold ``W += (alpha / r) B A`` into the base weights and remove the adapters
  (``llamalab merge-lora``; then any converter format can be written).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llamalab.train.config import LoraSection

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LORA_TARGETS", "LoRAConfig", "adapter_state_dict", "adapters_disabled",
           "apply_lora", "effective_weight", "frozen_linears_in", "has_lora", "load_adapter", "load_adapter_state_dict", "lora_modules", "merge_lora",
           "save_adapter"]

# Meta's names of the linears an adapter can go on.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
ADAPTER_CONFIG = "adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"


@dataclass
class LoRAConfig(LoraSection):
    """Where the adapters go and their shape: ``targets`` (Meta names), ``rank``, ``alpha``, ``dropout``
    (the run file's ``[lora]`` section, with the checks and the scale)."""

    @property
    def scale(self) -> float:
        """``alpha / rank``: the factor on ``B A``."""
        return self.alpha / self.rank

    def validate(self) -> None:
        """ValueError naming the field for a rank, alpha, dropout or target that cannot work."""
        if self.rank < 1:
            raise ValueError(f"lora.rank={self.rank}: must be >= 1")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha}: must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout}: must be in [0, 1)")
        if not self.targets:
            raise ValueError("lora.targets: empty; name at least one of " + ", ".join(LORA_TARGETS))
        for t in self.targets:
            if t not in LORA_TARGETS:
                raise ValueError(f"lora.targets: unknown linear {t!r}; expected some of {', '.join(LORA_TARGETS)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (``adapter.json``)."""
        return asdict(self)


def _lora_hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
    if not module.lora_enabled:
        return output
    delta = module.lora_b(module.lora_a(module.lora_dropout(args[0])))
    return output + delta * module.lora_scale


def _targets(model: nn.Module, targets: Sequence[str]) -> list[tuple[str, nn.Linear]]:
    wanted = set(targets)
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in wanted and not name.endswith(("lora_a", "lora_b"))]


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, *, freeze_base: bool = True) -> list[str]:
    """Put adapters on ``config.targets`` of ``model`` (in place); returns the adapted linears' names.

    With ``freeze_base`` every parameter but the adapters' stops requiring gradients, so the
    optimizer (which skips frozen parameters) holds only the adapters. Raises ValueError for a
    bad config, for ``output`` on a model whose head is tied to the embeddings (an adapter there
    would untie them), and when the model already has adapters.
    """
    config = config or LoRAConfig()
    config.validate()
    if has_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    if "output" in config.targets and getattr(getattr(model, "config", None), "tie_embeddings", False):
        raise ValueError("lora.targets: 'output' on a model with tied embeddings (the head is the embedding "
                         "table); leave it out")
    found = _targets(model, config.targets)
    if not found:
        raise ValueError(f"lora.targets={config.targets}: no such linear in the model")
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    for _, lin in found:
        w = lin.weight
        # Trained weights in fp32 at least, also on a base held in bf16 (frozen_linears_in).
        dtype = torch.promote_types(w.dtype, torch.float32)
        a = nn.Linear(lin.in_features, config.rank, bias=False, device=w.device, dtype=dtype)
        b = nn.Linear(config.rank, lin.out_features, bias=False, device=w.device, dtype=dtype)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        nn.init.zeros_(b.weight)
        lin.lora_a, lin.lora_b = a, b
        lin.lora_dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        lin.lora_scale = config.scale
        lin.lora_enabled = True
        lin._lora_handle = lin.register_forward_hook(_lora_hook)
    model.lora_config = config
    return [name for name, _ in found]


# A block's linear weights by their Meta names: the weights that LoRA freezes and adapts.
_BLOCK_LINEAR = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight")


def frozen_linears_in(dtype: torch.dtype) -> Callable[[str], torch.dtype | None]:
    """For ``build_model(..., hold=)``: every block's linear weights held in ``dtype``; the
    embeddings, norms and head keep the build's dtype.

    With LoRA at bf16 this changes no result: those weights are frozen and bf16 autocast casts
    them to bf16 at every forward anyway (and keeps the copies until the step's backward), so
    holding them in bf16 from the build on saves half their memory and the per-step copies.
    Building them so, one tensor at a time, also leaves no fragmented heap of freed fp32
    copies behind. A merge needs the full-precision weights again (the fine-tuning export
    rebuilds them from the checkpoint).
    """
    def hold(name: str) -> torch.dtype | None:
        return dtype if _BLOCK_LINEAR.fullmatch(name) else None

    return hold


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linears that carry adapters, with their names."""
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "_lora_handle")]


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` has adapters."""
    return bool(lora_modules(model))


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapters' weights, under their full names (``layers.0.attention.wq.lora_a.weight``)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_a." in k or ".lora_b." in k}


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor], *, source: str = "adapter") -> None:
    """Copy adapter weights into a model with matching adapters; ValueError naming ``source`` on a mismatch."""
    mine = adapter_state_dict(model)
    missing, extra = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    if missing or extra:
        raise ValueError(f"{source}: adapters do not fit the model (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(mine[k].shape):
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the model's adapter {tuple(mine[k].shape)}")
    model.load_state_dict(state, strict=False)


def effective_weight(linear: nn.Module) -> Tensor:
    """``W + scale * B A`` of an adapted linear (differentiable in A and B), or ``W`` without an enabled adapter.

    For code that uses a linear's weight directly instead of calling it, such as the fused
    head-and-loss of ``train/loss.py``: the hook never runs there. (Dropout on the adapter's input
    cannot apply to a folded weight; callers with ``dropout > 0`` call the module instead.)
    """
    if not getattr(linear, "lora_enabled", False):
        return linear.weight
    return linear.weight + linear.lora_scale * (linear.lora_b.weight @ linear.lora_a.weight)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter contributes nothing inside the block."""
    mods = [m for _, m in lora_modules(model)]
    previous = [m.lora_enabled for m in mods]
    for m in mods:
        m.lora_enabled = False
    try:
        yield
    finally:
        for m, p in zip(mods, previous):
            m.lora_enabled = p


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight (``W += scale * B A``, computed in fp32) and remove
    it; the model is then a plain model again. Returns how many linears were merged."""
    mods = lora_modules(model)
    for _, m in mods:
        delta = m.lora_b.weight.float() @ m.lora_a.weight.float()
        m.weight.copy_((m.weight.float() + m.lora_scale * delta).to(m.weight.dtype))
        m._lora_handle.remove()
        for attr in ("lora_a", "lora_b", "lora_dropout"):
            delattr(m, attr)
        for attr in ("lora_scale", "lora_enabled", "_lora_handle"):
            m.__dict__.pop(attr, None)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return len(mods)


def save_adapter(model: nn.Module, out_dir: str | Path, *, base: str | None = None) -> Path:
    """Write ``adapter.safetensors`` and ``adapter.json`` (the LoRA config and the base checkpoint's name)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    save_file(state, str(out / ADAPTER_WEIGHTS))
    meta = {"format": "llamalab-lora", "lora": model.lora_config.to_dict(), "base": base}
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> LoRAConfig:
    """Apply the adapters saved in ``adapter_dir`` to ``model`` and load their weights."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg_path, w_path = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"{d}: not a LoRA adapter directory (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    try:
        meta = json.loads(cfg_path.read_text())
        config = LoRAConfig(**meta["lora"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path}: not a llamalab adapter config ({e})") from None
    apply_lora(model, config)
    load_adapter_state_dict(model, load_file(str(w_path)), source=str(w_path))
    return config
