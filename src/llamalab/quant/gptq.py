"""GPTQ (Frantar et al. 2022, "Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): the method behind the 3- and 4-bit LLaMA releases, into GGUF's block types.

For a linear layer with weight W (out, in) and calibration inputs X, GPTQ minimises
``||W X - Q X||^2`` one input column at a time: column j is rounded onto its grid and the error it
leaves is spread over the columns not yet rounded through the inverse Hessian ``H^-1``, ``H = X^T
X / n`` (the paper's Algorithm 1: the Cholesky factor of ``H^-1``, "lazy batch" updates in blocks
of 128 columns, a dampening of 1% of the mean diagonal). Options as in the paper and its code:

- **groups**: the grid's scales come from the block type (32 weights for Q4_0/Q4_1/Q8_0, super-
  blocks of 256 for the K-quants); without act-order they are fitted when GPTQ reaches a block's
  first column, on the weights as the earlier columns' updates left them;
- **act-order** (``desc_act``): columns in decreasing order of ``diag(H)``, the inputs with the
  most energy first. GGUF blocks hold consecutive columns, so their scales are fitted beforehand
  on the original weights ("static groups"), then the columns rounded in act order.

:func:`gptq_model` runs it layer after layer (``sequential``): the calibration activations are
pushed through layers already quantized, so each layer corrects for the error of those before it.
The embedding (and a tied head) is rounded to nearest.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llamalab.quant.grids import BlockFormat, Grid, block_format, format_for

# Meta's names of a block's linears, in the order GPTQ quantizes them.
LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


class Hessian:
    """Running ``X^T X / n`` of a linear's inputs, in float64."""

    def __init__(self, features: int) -> None:
        self.sum = torch.zeros(features, features, dtype=torch.float64)
        self.count = 0

    def add(self, x: Tensor) -> None:
        """Add the rows of ``x`` (..., features)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    @property
    def value(self) -> Tensor:
        return self.sum / max(self.count, 1)


@dataclass
class GPTQResult:
    """One quantized matrix: its blocks, the weight they stand for, and the calibration loss."""

    blocks: Any  # uint8 (out, row_bytes); GPTQ's format: {"q", "scales", "zeros"}
    type_name: str  # the GGUF type of the blocks
    weight: Tensor  # fp32 (out, in), as the blocks dequantize
    error: float  # trace((W - Q) H (W - Q)^T): ||W X - Q X||^2 / n on the calibration inputs
    rtn_error: float  # the same for round-to-nearest of W: what GPTQ bought


def layer_error(weight: Tensor, quantized: Tensor, hessian: Tensor) -> float:
    """Mean squared output error ``||(W - Q) x||^2`` over the inputs ``hessian`` summarises."""
    diff = (weight.double() - quantized.double())
    return float(((diff @ hessian.double()) * diff).sum())


def _inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor of ``(H + damp mean(diag H) I)^-1`` (the paper's ``H^-1`` rows)."""
    h = h.clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    for _ in range(6):  # a near-singular H (few calibration tokens): more dampening until it factors
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            break
        h.diagonal().add_(damp * float(h.diagonal().mean()) + 1e-8)
    else:
        raise ValueError("GPTQ: the Hessian is not positive definite even with dampening "
                         "(too few calibration tokens?)")
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


def gptq_matrix(weight: Tensor, hessian: Tensor, fmt: BlockFormat | str, *, act_order: bool = True,
                damp: float = 0.01, block_size: int = 128) -> GPTQResult:
    """GPTQ of one (out, in) weight onto the grid of block type ``fmt``, given ``hessian`` (in, in)."""
    fmt = block_format(fmt) if isinstance(fmt, str) else fmt
    w0 = weight.detach().float()
    rows, cols = w0.shape
    if cols % fmt.group:
        raise ValueError(f"GPTQ {fmt.name}: {cols} input features are not whole blocks of {fmt.group}")
    h = hessian.detach().double().clone()
    w = w0.clone()
    dead = h.diagonal() == 0  # inputs never active in calibration: weight 0 costs nothing
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        grid, params = fmt.fit(w)  # static groups: scales from the original weights
        fitted: list[dict[str, Tensor]] = []
    else:
        perm = torch.arange(cols)
        grid = Grid(sub=torch.zeros(rows, cols), inv=torch.zeros(rows, cols), add=torch.zeros(rows, cols),
                    step=torch.zeros(rows, cols), offset=torch.zeros(rows, cols), qzero=torch.zeros(rows, cols),
                    qmin=0, qmax=0)
        params, fitted = {}, []
        block_size = -(-max(block_size, fmt.group) // fmt.group) * fmt.group  # blocks hold whole groups
    w = w[:, perm]
    u = _inverse_cholesky(h[perm][:, perm], damp).float()

    q_int = torch.zeros(rows, cols)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros(rows, i2 - i1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            if not act_order and c % fmt.group == 0:
                g, p = fmt.fit(w1[:, i:i + fmt.group])
                for field in ("sub", "inv", "add", "step", "offset", "qzero"):
                    getattr(grid, field)[:, c:c + fmt.group] = getattr(g, field)  # a number or per element
                grid.qmin, grid.qmax, grid.half_away = g.qmin, g.qmax, g.half_away
                fitted.append(p)
            col = int(perm[c])
            wc = w1[:, i]
            q = grid.round(wc, col)
            q_int[:, col] = q
            e = (wc - grid.value(q, col)) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if not act_order:
        params = {k: torch.cat([p[k] for p in fitted], dim=1) for k in fitted[0]}
    quantized = grid.value(q_int)
    return GPTQResult(blocks=fmt.pack(q_int, params), type_name=fmt.name, weight=quantized,
                      error=layer_error(w0, quantized, hessian),
                      rtn_error=layer_error(w0, fmt.rtn(w0)[1], hessian))


def _linear(block: nn.Module, name: str) -> nn.Linear:
    module = block
    for part in name.split("."):
        module = getattr(module, part)
    return module


@torch.no_grad()
def gptq_model(model: nn.Module, calibration: Tensor, fmt: str | BlockFormat, *, act_order: bool = True,
               damp: float = 0.01, batch_size: int = 8, progress: bool = True,
               log: Callable[[str], None] | None = None) -> dict[str, GPTQResult]:
    """GPTQ of every block linear of ``model`` (a fp32 :class:`llamalab.model.Transformer`), layer by
    layer, on ``calibration`` token ids (n, seq), into GGUF type ``fmt`` (or its fallback,
    :func:`~llamalab.quant.grids.format_for`, for rows it does not divide). The model's linears are
    left holding the quantized weights. Returns {Meta weight name: result}."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    n, seq = calibration.shape
    rope = model.rope[:seq].unsqueeze(0)
    batches = [calibration[i:i + batch_size] for i in range(0, n, batch_size)]
    hidden = [model.tok_embeddings(b) for b in batches]
    results: dict[str, GPTQResult] = {}
    t0 = time.perf_counter()
    for li, layer in enumerate(model.layers):
        hessians: dict[str, Hessian] = {}
        hooks = []
        for name in LINEARS:
            lin = _linear(layer, name)
            hess = hessians[name] = Hessian(lin.in_features)
            hooks.append(lin.register_forward_pre_hook(lambda _m, args, hess=hess: hess.add(args[0])))
        for h in hidden:
            layer(h, rope, None, None)
        for hook in hooks:
            hook.remove()
        errors = []
        for name in LINEARS:
            lin = _linear(layer, name)
            f = format_for(fmt, lin.in_features) if isinstance(fmt, str) else fmt
            res = gptq_matrix(lin.weight, hessians[name].value, f,
                              act_order=act_order, damp=damp)
            lin.weight.copy_(res.weight.to(lin.weight.dtype))
            results[f"layers.{li}.{name}.weight"] = res
            errors.append(res.error)
        hidden = [layer(h, rope, None, None) for h in hidden]
        if progress:
            log(f"gptq {fmt if isinstance(fmt, str) else fmt.name}: layer {li + 1}/{len(model.layers)}  output error sum {sum(errors):.4g}  "
                f"({time.perf_counter() - t0:.0f} s)")
    return results


__all__ = ["LINEARS", "GPTQResult", "Hessian", "gptq_matrix", "gptq_model", "layer_error"]
