"""Training-speed levers applied to a built model from outside (the model file is unchanged).

Each lever is a switch that the pretraining loop (or ``benchmarks/train.py``) can turn on;
none changes what is computed beyond floating-point rounding, except ``fp32_matmul="bf16"``,
which is a precision change and is named as one. Measured effect on the 2-core AVX-512
development machine: ``docs/training-speed.md``.

- :func:`use_onednn_linear`: every ``nn.Linear`` runs its forward *and both backward
  matrix products* through oneDNN (``torch.ops.mkldnn._linear_pointwise``) in fp32. torch's
  default fp32 CPU GEMM is MKL's, which reaches about half of oneDNN's speed on this CPU
  (shared/MACHINE-FACTS.md: ~200 vs ~440 GFLOP/s). Under bf16 autocast the layers fall back
  to ``F.linear`` (autocast's bf16 GEMM already is oneDNN's). The modules keep their class's
  parameters and names (only their ``__class__`` is swapped), so state dicts, tied weights
  and optimizers are untouched.
- :func:`set_fp32_matmul_precision`: ``torch.backends.mkldnn.matmul.fp32_precision``
  ("ieee" = exact fp32, MKL; "bf16" = fp32 matmuls computed by oneDNN with bf16 inputs and
  fp32 accumulation: faster, but *not* fp32 training any more).
- :func:`compile_blocks`: ``torch.compile`` each transformer block (one compiled graph shared
  by all blocks: identical code, parameters as inputs), the way ``parallelize`` does.
- :func:`sdpa_backend`: a context manager choosing the attention kernel (``"flash"`` = the
  fused CPU flash-attention kernel, ``"math"`` = the unfused reference).
- :func:`use_matmul_attention`: attention as two batched matrix products with the grouped
  query heads stacked (one (G*S x D) x (D x T) product per key/value head) and an fp32 softmax,
  instead of SDPA, on CPU in bf16 only. There, at short sequences, the flash kernel's small
  blocks run far from the GEMM peak (135M shape, 8 x 256: 0.83 s of a ~3.7 s step; the products:
  0.57-0.71 s, and Inductor fuses the scale, mask and softmax between them under ``compile``).
  In fp32 the products are slower than the flash kernel (1.0-1.1 s against 0.83-0.86 s).
- ``build_optimizer(..., fused=True)`` (train/optim.py): the single-kernel CPU AdamW;
  :func:`adamw_impl_kwargs` maps a name ("for-loop", "foreach", "fused") to AdamW's flags.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamalab.model import Attention

__all__ = ["ADAMW_IMPLS", "OneDNNLinear", "adamw_impl_kwargs", "compile_blocks", "onednn_linear_available", "onednn_mm_t",
           "resolve_onednn_linear",
           "MatmulAttention", "grouped_matmul_attention", "sdpa_backend", "set_fp32_matmul_precision", "use_matmul_attention",
           "use_onednn_linear"]

ADAMW_IMPLS = ("default", "for-loop", "foreach", "fused")


def adamw_impl_kwargs(impl: str) -> dict[str, Any]:
    """AdamW keyword arguments for an implementation name (``"default"``: torch's choice,
    which on CPU is the per-parameter for-loop)."""
    if impl not in ADAMW_IMPLS:
        raise ValueError(f"AdamW implementation {impl!r}: expected one of {', '.join(ADAMW_IMPLS)}")
    return {"default": {}, "for-loop": {"foreach": False, "fused": False},
            "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]


def onednn_linear_available() -> bool:
    """This torch build has oneDNN's fused linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def resolve_onednn_linear(setting: bool | str, device: torch.device | str = "cpu") -> bool:
    """Whether ``train.onednn_linear = setting`` routes fp32 GEMMs through oneDNN on ``device``.

    ``"auto"``: on CPUs with AVX-512, where oneDNN's fp32 GEMMs run ~2x MKL's (420-460 against
    ~200 GFLOP/s on the Zen 5 reference machine); not on AVX2-only CPUs, where the same lever
    trained the 15M shape at 0.49x (556 against 1128 tok/s, AMD EPYC, ``benchmarks/train.py``).
    """
    if torch.device(device).type != "cpu" or not onednn_linear_available():
        return False
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"onednn_linear {setting!r}: expected true, false or 'auto'")
    from llamalab.precision import cpu_flags

    return "avx512f" in cpu_flags()


@torch.library.custom_op("llamalab::onednn_mm_t", mutates_args=())
def _onednn_mm_t(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` for 2-D fp32 ``a`` (M, K) and ``b`` (N, K), computed by oneDNN.

    A custom op (opaque to ``torch.compile``, with a shape-only fake kernel) so that compiled
    blocks keep calling oneDNN instead of tracing into it.
    """
    return torch.ops.mkldnn._linear_pointwise(a.contiguous(), b.contiguous(), None, "none", [], "")


@_onednn_mm_t.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], b.shape[0])


def onednn_mm_t(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` for 2-D fp32 CPU tensors through oneDNN (other dtypes: torch's product)."""
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.device.type != "cpu":
        return a @ b.t()
    return _onednn_mm_t(a, b)


class _OneDNNLinearFn(torch.autograd.Function):
    """``y = x W^T`` with all three GEMMs (forward, grad of x, grad of W) in oneDNN fp32."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        x2 = x.reshape(-1, x.shape[-1])
        return _onednn_mm_t(x2, weight).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # g W = g (W^T)^T
            grad_x = _onednn_mm_t(g2, weight.t()).view(x.shape)
        if ctx.needs_input_grad[1]:  # g^T x = (g^T) (x^T)^T
            grad_w = _onednn_mm_t(g2.t(), x.reshape(-1, x.shape[-1]).t())
        return grad_x, grad_w


class OneDNNLinear(nn.Linear):
    """An ``nn.Linear`` (no bias) whose fp32 GEMMs run in oneDNN; see :func:`use_onednn_linear`."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if (self.bias is not None or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or x.device.type != "cpu" or torch.is_autocast_enabled("cpu")):
            return F.linear(x, self.weight, self.bias)
        return _OneDNNLinearFn.apply(x, self.weight)


def use_onednn_linear(model: nn.Module) -> int:
    """Route every bias-free CPU ``nn.Linear`` of ``model`` through oneDNN; returns how many.

    In place: the modules' class becomes :class:`OneDNNLinear` (a subclass), nothing else
    changes. A no-op (returns 0) when oneDNN's op is missing.
    """
    if not onednn_linear_available():
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = OneDNNLinear
            n += 1
    return n


class MatmulAttention(Attention):
    """An :class:`~llamalab.model.Attention` whose ``attend`` is two batched matrix products where
    that is the faster path (CPU, bf16: under autocast or bf16 weights); see
    :func:`use_matmul_attention`. Elsewhere, and with a KV cache, it is the model's SDPA."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:  # noqa: D102
        # fp32 products on this CPU are MKL's (~200 GFLOP/s): there the flash kernel is faster.
        bf16 = q.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")
        if self.kv_cache is not None or q.device.type != "cpu" or not bf16:
            return super().attend(q, k, v, mask)
        return grouped_matmul_attention(q, k, v, mask)


def grouped_matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """What SDPA computes (causal when ``mask`` is None, GQA as ``enable_gqa``), as two batched
    products with each key/value head's query heads stacked as rows and an fp32 softmax."""
    bsz, nh, s, d = q.shape
    nkv, t = k.shape[1], k.shape[2]
    g = nh // nkv
    # Query heads h = j * g + i share key/value head j (as SDPA's enable_gqa): stacking a
    # group's g heads as rows makes one larger product per key/value head.
    scores = torch.matmul(q.reshape(bsz, nkv, g * s, d), k.transpose(-1, -2)).float()
    scores = scores.view(bsz, nkv, g, s, t) * (d ** -0.5)
    if mask is None:
        allowed = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
    else:
        allowed = mask.unsqueeze(1)  # (B or 1, 1, 1, S, T)
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).to(v.dtype)
    return torch.matmul(probs.view(bsz, nkv, g * s, t), v).view(bsz, nh, s, d)


def use_matmul_attention(model: nn.Module) -> int:
    """Swap every :class:`~llamalab.model.Attention` of ``model`` to :class:`MatmulAttention` in
    place (class only: parameters, names and state dicts unchanged); returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = MatmulAttention
            n += 1
    return n


def set_fp32_matmul_precision(precision: str) -> str:
    """Set ``torch.backends.mkldnn.matmul.fp32_precision`` ("ieee"/"none" exact, "bf16", "tf32");
    returns the previous value."""
    previous = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = precision
    return previous


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """``torch.compile`` each transformer block in place (``nn.Module.compile``); returns how many.

    All blocks share one compiled graph (same code; parameters are graph inputs), so the
    compile cost is paid about once, on the first step. Embeddings, the final norm, the head
    and the loss stay eager.
    """
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("compile_blocks: the model has no .layers")
    for block in layers:
        block.compile(**compile_kwargs)
    return len(layers)


@contextlib.contextmanager
def sdpa_backend(name: str | None) -> Iterator[None]:
    """Restrict ``scaled_dot_product_attention`` to one kernel: ``"flash"``, ``"math"``,
    ``"efficient"``; ``None`` or ``"default"`` leaves torch's choice."""
    if name in (None, "default"):
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    if name not in backends:
        raise ValueError(f"sdpa backend {name!r}: expected one of default, {', '.join(backends)}")
    with sdpa_kernel(backends[name]):
        yield
