"""Fast batch-1 decoding on CPU: the same Transformer, re-expressed for inference.

``optimize_for_decode(model)`` returns a :class:`DecodeModel`: a module with the model's call
signature ``(tokens, input_pos=None) -> fp32 logits`` and its ``setup_cache`` / ``clear_cache``,
so the engine opts in with one line and keeps its loop::

    fast = optimize_for_decode(lm.model)
    fast.setup_cache(max_batch_size=1, max_seq_len=n)
    logits = fast(tokens, input_pos=torch.arange(len(prompt)))   # prefill
    logits = fast(next_token, input_pos=torch.tensor([pos]))       # one token per step

It computes the same function as ``Transformer.forward`` (same weights, same KV cache
buffers, which it borrows from the wrapped model), with these inference-only changes:

- **Every linear layer goes through oneDNN** (``torch.ops.mkldnn._linear_pointwise``) instead
  of torch's default fp32 path (MKL GEMV). At batch 1 decode streams the weights once per
  token, and oneDNN's matrix-vector kernel reads them about twice as fast on the reference
  CPU (AVX-512: MKL ~17-22 GB/s, oneDNN ~33-48 GB/s). fp32 weights are used in place (no copy);
  bf16 weights are reordered once into oneDNN's blocked layout (a copy: +2 bytes/param) where
  oneDNN has a bf16 path (AVX-512BW/VL/DQ, AVX512-BF16, AMX); elsewhere (AVX2-only CPUs) they
  stay as they are and prefill's products widen them to fp32 per call (torch's own bf16 GEMM
  there is scalar code, ~50x slower than fp32).
- **Decode steps on llamalab's matrix-vector kernel** (:mod:`llamalab.generate.gemv`, built on
  first use; AVX2+FMA, AVX-512 and AVX512-BF16 paths chosen at run time): calls of up to 4
  rows read the model's own weights, row-major, no copy (bf16 widened to fp32 in registers
  where the CPU has no bf16 dot product), at 41-46 GB/s on the AVX-512 machine, where oneDNN
  reaches 22-38 GB/s (bf16) and ~30 GB/s (fp32) on these small matrices. Prefill stays on oneDNN.
- **Fewer, larger matrix products per layer**: q/k/v in one matrix and w1/w3 in another (the
  model's weights become views of the fused matrices, so fp32 needs no extra memory), the
  residual additions fused into the products as oneDNN post-ops (``x + W x'``), RoPE as one
  complex multiply on queries and keys together, ``F.rms_norm``.
- **Attention reads only the filled part of the cache** at one-token steps (no mask to build).
- Optionally ``compile=True``: ``torch.compile`` of the batch-1 one-token step with
  Inductor's freezing, everything between the matrix products fused; the products at fp32 in
  Inductor's C++ GEMM template on weights it packs once (a copy), at bf16 in the kernel above
  (or oneDNN where it cannot be built). Compiled once (cache passed as arguments, two dynamic
  dimensions), then run without Dynamo's guard checks; compiling takes ~20-80 s.

Measured on the 2-core AVX-512 development machine, SmolLM2-135M, 128-token prompt, 128 new
tokens, medians, ratios to transformers in the same run (``benchmarks/decode.py``; the
machine's bandwidth drifts, so compare ratios): see ``docs/inference-speed.md`` for the tables.

The result is not bit-identical to the plain model: oneDNN sums the dot products in another
order than MKL, so fp32 logits differ by ~1e-5 (relative ~1e-6); bf16 rounds the fused
residual once instead of twice, and is as close to the same weights in fp64 as the plain bf16
model (tested). Full-sequence calls with ``doc_ids`` go to the plain model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamalab.generate.gemv import (MAX_ROWS, decode_attention, decode_attention_rows, gemv, gemv_available,
                                    unavailable_reason)
from llamalab.model import Transformer

__all__ = ["DecodeModel", "optimize_for_decode", "onednn_available", "onednn_bf16_available"]


def onednn_available(device: torch.device) -> bool:
    """oneDNN's fused linear op exists in this torch build and the model is on the CPU."""
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_bf16_available() -> bool:
    """oneDNN runs bf16 matrix products on this CPU (its reorder of bf16 weights refuses otherwise)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(torch.backends.mkldnn.is_available() and check is not None and check())


class _Linear:
    """``y = x W^T`` (optionally ``swish`` (silu) after, or ``other + y`` / ``other * y``) on one weight.

    Calls of up to ``MAX_ROWS`` rows (decode steps) go to llamalab's matrix-vector kernel
    (:mod:`llamalab.generate.gemv`) on the weight as it is, where it runs (``use_gemv``). Other
    calls (prefill) go to oneDNN, which holds the weight as it wants it: fp32 as is, bf16
    reordered into its blocked layout (a copy). Without oneDNN (GPU, other builds) plain
    ``F.linear``. ``float_out`` (the output head): where the kernel runs a bf16 model, its fp32
    sums come back unrounded: bf16 logits are 0.125 apart at ~25, and two close candidates
    would tie (greedy decoding then picks by index).
    """

    def __init__(self, weight: Tensor, use_onednn: bool, use_gemv: bool = False, float_out: bool = False) -> None:
        self.out_features = weight.shape[0]
        self.onednn = use_onednn
        self.float_out = float_out
        weight = weight.detach()
        # The kernel reads rows in place: a non-contiguous weight (none of the model's) would
        # need a copy per call, so it gets one copy here instead.
        self.rows: Tensor | None = (weight if weight.is_contiguous() else weight.contiguous()) if use_gemv else None
        # bf16 products where the CPU has no bf16 matrix path (oneDNN's needs AVX512-BW/VL/DQ,
        # AVX512-BF16, AMX or AVX-NE-CONVERT; torch's own falls back to scalar code, ~50x slower
        # than fp32 on an AVX2 CPU): the weight widened to fp32 per call, the product in fp32.
        self.widen = weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and not onednn_bf16_available()
        if use_onednn and weight.dtype == torch.bfloat16 and not self.widen:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        else:
            self.weight = weight

    def __call__(self, x: Tensor, post: str = "none", other: Tensor | None = None,
                 norm: tuple[nn.Module, Tensor] | None = None, swiglu: bool = False) -> Tensor:
        """The product of ``x``, first normalised by ``norm`` (the RMSNorm module and its weight in
        fp32) or, with ``swiglu``, ``silu(gate) * up`` of ``x``'s two halves; then the post-op."""
        # In the compiled fp32 step Inductor's C++ GEMM template runs the products instead: it
        # streams fp32 weights ~5-10% faster there (measured), and needs the linear ops to see.
        compiled_fp32 = x.dtype == torch.float32 and torch.compiler.is_compiling()
        if self.rows is not None and x.numel() <= MAX_ROWS * x.shape[-1] and not compiled_fp32:
            # The norm or the gate computed inside the kernel's call: ~10 small ops a layer fewer.
            nw, eps = (norm[1], norm[0].eps) if norm is not None else (None, 1e-5)
            if post == "add":  # the residual added before the one rounding, as oneDNN's post-op
                return gemv(x, self.rows, other, self.float_out, norm=nw, eps=eps, swiglu=swiglu)
            return self._post(gemv(x, self.rows, float_out=self.float_out, norm=nw, eps=eps, swiglu=swiglu),
                              post, other)
        if norm is not None:
            x = _rms_norm(x, norm[0])
        if swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        if self.widen:  # fp32 arithmetic, the one rounding to bf16 at the end
            return self._product(x.float(), self.weight.float(), post,
                                 None if other is None else other.float()).to(x.dtype)
        return self._product(x, self.weight, post, other)

    def _product(self, x: Tensor, weight: Tensor, post: str, other: Tensor | None) -> Tensor:
        """``x W^T`` and the post-op, through oneDNN where it serves, else ``F.linear``."""
        if not self.onednn:
            return self._post(F.linear(x, weight), post, other)
        x2 = x.reshape(-1, x.shape[-1])
        if post in ("add", "mul"):
            y = torch.ops.mkldnn._linear_pointwise.binary(x2, other.reshape(-1, self.out_features), weight, None, post)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2, weight, None, post, [], "")
        return y.view(*x.shape[:-1], self.out_features)

    @staticmethod
    def _post(y: Tensor, post: str, other: Tensor | None) -> Tensor:
        if post == "swish":
            return F.silu(y)
        if post == "add":
            return other + y
        if post == "mul":
            return other * y
        return y


class _QuantizedLinears:
    """The products of one or more linear modules on the same input, side by side, where some hold
    quantized blocks (:class:`~llamalab.quant.QuantizedLinear`): the same call as :class:`_Linear`.

    When every module's blocks run on the quantized kernel, one call of it for all of them: x is
    normalised (or SwiGLU-gated) and quantized to int8 once, and the residual is added to the fp32
    sums. Otherwise (the reference path, or a mix with float weights) module by module.
    """

    def __init__(self, modules: list[nn.Module]) -> None:
        from llamalab.quant import QuantizedLinear

        self.modules = modules
        self.out_features = sum(m.out_features for m in modules)
        self.kernel = all(isinstance(m, QuantizedLinear) and m.uses_kernel for m in modules)
        if self.kernel:
            from llamalab.quant.blocks import block_type

            self.blocks = [m.blocks for m in modules]
            self.ids = [block_type(m.type_name).ggml_id for m in modules]
            # The op itself, not the checking wrapper: a decode step makes ~120 of these calls.
            self.op = torch.ops.llamalab_quant.qmatmul.default

    def __call__(self, x: Tensor, post: str = "none", other: Tensor | None = None,
                 norm: tuple[nn.Module, Tensor] | None = None, swiglu: bool = False) -> Tensor:
        """As :meth:`_Linear.__call__`, in ``x``'s dtype (computed in fp32)."""
        if self.kernel:
            nw, eps = (norm[1], norm[0].eps) if norm is not None else (None, 1e-5)
            if x.dtype != torch.float32:
                y = self.op(x.float(), self.blocks, self.ids, None if other is None or post != "add" else other.float(),
                            nw, eps, swiglu)
                return (y if post == "add" else _Linear._post(y, post, other)).to(x.dtype)
            y = self.op(x, self.blocks, self.ids, other if post == "add" else None, nw, eps, swiglu)
            return y if post == "add" else _Linear._post(y, post, other)
        if norm is not None:
            x = _rms_norm(x, norm[0])
        if swiglu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        ys = [m(x) for m in self.modules]
        return _Linear._post(ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1), post, other)


def _is_quantized(module: nn.Module) -> bool:
    from llamalab.quant import QuantizedLinear

    return isinstance(module, QuantizedLinear)


def _linears(modules: list[nn.Module], use_onednn: bool, use_gemv: bool, float_out: bool = False) -> Any:
    """One product for ``modules`` on the same input: fused float weights, or quantized blocks."""
    if any(_is_quantized(m) for m in modules):
        return _QuantizedLinears(modules)
    weight = modules[0].weight if len(modules) == 1 else _fuse(modules)
    return _Linear(weight, use_onednn, use_gemv, float_out=float_out)


class _Layer:
    """One TransformerBlock's weights, prepared for inference."""

    def __init__(self, block: nn.Module, use_onednn: bool, use_gemv: bool) -> None:
        attn, ffn = block.attention, block.feed_forward
        self.attention = attn
        # q/k/v in one matrix and w1/w3 in another: one large matrix-vector product streams
        # weights faster than three (or two) small ones. The model's own weights become views
        # of the fused matrices, so fp32 costs no extra memory (bf16 is reordered: a copy anyway).
        # Quantized blocks are not concatenated (a copy of the file's pages): the quantized
        # kernel takes the three (two) weights in one call instead.
        self.wqkv = _linears([attn.wq, attn.wk, attn.wv], use_onednn, use_gemv)
        self.w13 = _linears([ffn.w1, ffn.w3], use_onednn, use_gemv)
        self.hidden = ffn.w1.out_features
        self.wo = _linears([attn.wo], use_onednn, use_gemv)
        self.w2 = _linears([ffn.w2], use_onednn, use_gemv)
        # (module, fp32 weight): the kernel takes the norm's weight in fp32 (for an fp32 model
        # the module's own tensor, no copy).
        self.attention_norm = (block.attention_norm, block.attention_norm.weight.detach().float())
        self.ffn_norm = (block.ffn_norm, block.ffn_norm.weight.detach().float())


def _fuse(linears: list[nn.Linear]) -> Tensor:
    """One weight matrix stacking ``linears``' rows; each module's weight becomes a view of it."""
    fused = torch.cat([m.weight.detach() for m in linears])
    start = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = fused[start:start + rows]
        start += rows
    return fused


def _rotate(x: Tensor, rope: Tensor) -> Tensor:
    """RoPE on ``x`` (B, S, H, D/2, 2) by ``rope`` (B, S, 1, D/2, 2) = (cos, sin), in fp32.

    Eagerly one complex multiply (one kernel); under ``torch.compile`` the same product in
    real arithmetic, which Inductor fuses (it generates no code for complex numbers).
    """
    if not torch.compiler.is_compiling():
        return torch.view_as_real(torch.view_as_complex(x.float()) * torch.view_as_complex(rope)).flatten(-2)
    x0, x1 = x[..., 0].float(), x[..., 1].float()
    cos, sin = rope[..., 0], rope[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def _register_fake_linear_binary() -> None:
    """Shape rule for ``mkldnn::_linear_pointwise.binary`` (``other + x W^T``), which torch
    ships without one, so that ``torch.compile`` can trace it (its output has ``other``'s shape)."""
    global _FAKE_REGISTERED
    if _FAKE_REGISTERED:
        return
    try:
        torch.library.register_fake("mkldnn::_linear_pointwise.binary")(
            lambda x, other, w, b, attr: other.new_empty(other.shape))
    except RuntimeError:  # a torch that has one already
        pass
    _FAKE_REGISTERED = True


_FAKE_REGISTERED = False


def _step_inductor_options(dtype: torch.dtype) -> dict[str, Any]:
    """Inductor settings for compiling the one-token step of a model in ``dtype``.

    Always freezing: the weights become constants, which is what lets Inductor keep oneDNN's
    linear ops (and pack weights) at all. At fp32 also Inductor's C++ GEMM template for every
    linear op (``max_autotune`` with the "CPP" backend alone, so nothing is benchmarked at
    compile time): it packs each weight into column blocks at compile time and generates an
    AVX-512 kernel per shape, which streams fp32 weights at M=1 about twice as fast as oneDNN's
    matrix-vector product on the reference CPU (decode 45 -> 70-97 tok/s), and 5-10% faster
    than llamalab's kernel inside the graph (measured). The packed copy costs memory:
    SmolLM2-135M's resident size goes 1.1 -> 2.1 GB. At bf16 the template is slower than
    oneDNN (55-64 vs ~90 tok/s, measured: its micro-kernel loads bf16 through a partial-vector
    path); the graph calls llamalab's kernel there (oneDNN's ops where it cannot be built).
    """
    options: dict[str, Any] = {"freezing": True}
    if dtype == torch.float32:
        options.update(max_autotune=True, max_autotune_gemm_backends="CPP",
                       autotune_num_choices_displayed=0)  # else it prints a table per shape
    # Older torch releases lack some of these settings; they then compile without them.
    return {k: v for k, v in options.items() if hasattr(torch._inductor.config, k)}


def _rms_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """RMSNorm in fp32, as ``model.RMSNorm`` computes it, in one fused op."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=norm.eps).type_as(x) * norm.weight


def _one_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Attention of one query per head (B, H, 1, D) over ``k, v`` (B, H_kv, T, D), in fp32.

    Query head ``h`` uses key/value head ``h // (H / H_kv)``, as SDPA's ``enable_gqa``; ``mask``
    (1, 1, 1, T), True = may attend. Two small fp32 matmuls: CPU SDPA's per-call overhead, and
    bf16 matmuls at this size, cost more than the whole computation.
    """
    bsz, nh, _, hd = q.shape
    nkv = k.shape[1]
    qg = q.float().reshape(bsz, nkv, nh // nkv, hd)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * (1.0 / hd ** 0.5)  # (B, H_kv, G, T)
    if mask is not None:
        scores = scores.masked_fill(~mask.view(1, 1, 1, -1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v.float()).reshape(bsz, nh, 1, hd).type_as(q)


class DecodeModel(nn.Module):
    """The wrapped Transformer's forward pass, rebuilt from its weights for fast inference.

    Same call signature and cache methods as :class:`~llamalab.model.Transformer`; the KV
    cache lives in the wrapped model (``setup_cache`` here sets it up there).
    """

    def __init__(self, model: Transformer, *, compile: bool = False, gemv: bool | None = None) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        device = model.tok_embeddings.weight.device
        self.onednn = onednn_available(device) and model.tok_embeddings.weight.dtype in (torch.float32,
                                                                                         torch.bfloat16)
        # Decode steps through llamalab's matrix-vector kernel where it can be built (gemv=None),
        # or on request only (True: an error where it cannot be had).
        dtype = model.tok_embeddings.weight.dtype
        self.gemv = gemv is not False and device.type == "cpu" and gemv_available(dtype)
        if gemv and not self.gemv:
            why = unavailable_reason(dtype) if device.type == "cpu" else f"the model is on {device}"
            raise ValueError(f"gemv=True: llamalab's matrix-vector kernel cannot run this model ({why})")
        with torch.no_grad():
            self.layers = [_Layer(block, self.onednn, self.gemv) for block in model.layers]
            self.output = _linears([model.output], self.onednn, self.gemv, float_out=True)
        c = model.config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self._compiled: Any = None
        self._compiled_for: set[tuple[torch.dtype, torch.device, bool]] = set()  # caches compiled for
        self._step_caches: tuple[Any, list[tuple[Tensor, Tensor]]] | None = None  # (layer 0's cache, aliases)
        if compile and self.onednn:
            # Inductor lowers oneDNN's linear ops only onto weights it may treat as constants
            # (freezing), and then fuses everything between them (norms, RoPE, SiLU-gate,
            # attention's softmax) into a few C++ loops: the Python and dispatch work per layer,
            # not the matrix-vector products, is what the one-token step loses time to.
            _register_fake_linear_binary()
            self._compiled = torch.compile(self._one_token, fullgraph=True, dynamic=False)
            self._inductor_options = _step_inductor_options(model.tok_embeddings.weight.dtype)
        elif compile:
            self._compiled = torch.compile(model, fullgraph=True, dynamic=False)

    # -- the model's surface ------------------------------------------------------------
    @property
    def tok_embeddings(self) -> nn.Embedding:
        """The wrapped model's embedding table (engines read its device from here)."""
        return self.model.tok_embeddings

    @property
    def cache_len(self) -> int:
        """Length of the KV cache set up in the wrapped model (0 when none)."""
        return self.model.cache_len

    @property
    def kv_cache_dtype(self) -> torch.dtype | None:
        """The wrapped model's KV cache dtype (None: its weights')."""
        return self.model.kv_cache_dtype

    @kv_cache_dtype.setter
    def kv_cache_dtype(self, dtype: torch.dtype | None) -> None:
        self.model.kv_cache_dtype = dtype

    def setup_cache(self, max_batch_size: int, max_seq_len: int | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Preallocate the KV cache (in the wrapped model), as ``Transformer.setup_cache``."""
        self.model.setup_cache(max_batch_size, max_seq_len, dtype)

    def clear_cache(self) -> None:
        """Drop the KV cache, as ``Transformer.clear_cache``."""
        self.model.clear_cache()
        self._step_caches = None

    # -- the forward pass ---------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, doc_ids: Tensor | None = None) -> Tensor:
        """Logits (B, S, vocab) in fp32, as ``Transformer.forward``."""
        if doc_ids is not None:
            return self.model(tokens, input_pos, doc_ids)
        if self.cache_len and input_pos is None:
            raise ValueError("a KV cache is set up: pass input_pos")
        if self._compiled is not None and self.cache_len and tokens.shape[1] == 1:
            if not self.onednn:
                return self._compiled(tokens, input_pos)
            if tokens.shape[0] == 1 and input_pos.dim() == 1:  # the engine's batch-1 loop
                end = int(input_pos[0]) + 1
                # The graph is traced for 2 <= end < cache length; the rare other steps (a
                # one-token prompt, the cache's last slot) run eagerly instead of recompiling.
                if 2 <= end < self.cache_len:
                    return self._compiled_step(tokens, input_pos, end)
        return self.output(self._forward(tokens, input_pos)).float()

    def _compiled_step(self, tokens: Tensor, input_pos: Tensor, end: int) -> Tensor:
        """One batch-1 step through the compiled graph (compiled at the first call)."""
        # The cache rows are arguments, not attributes, and detached aliases so that the
        # compiler does not take them for the module's (frozen) buffers: a new cache (the engine
        # sets one up per request) then reuses the compiled step. Row 0 only (``[:1]``): its
        # strides do not depend on the cache's batch size. (One tensor for all layers would mean
        # fewer guards, but Inductor then copies it whole at every layer's write.)
        first = self.layers[0].attention.kv_cache
        if self._step_caches is None or self._step_caches[0] is not first:
            caches = [(layer.attention.kv_cache.k[:1].detach(), layer.attention.kv_cache.v[:1].detach())
                      for layer in self.layers]
            for ck, cv in caches:
                torch._dynamo.mark_dynamic(ck, 2)
                torch._dynamo.mark_dynamic(cv, 2)
            self._step_caches = (first, caches)
        caches = self._step_caches[1]
        # Static shapes but for two: the cache length (above) and the number of slots attended,
        # so one graph serves every step and every cache; the slot count comes as a tensor's
        # length since an int argument would be specialised.
        slots = torch.empty(end, dtype=torch.int8)
        torch._dynamo.mark_dynamic(slots, 0)
        # What the guards would tell graphs apart by, beyond the checks of the caller: the cache's
        # dtype, device and whether it is an inference tensor (made under inference_mode or not).
        key = (caches[0][0].dtype, caches[0][0].device, caches[0][0].is_inference())
        # Inductor's options are read from the global config when it compiles (a per-compile
        # option is not enough), so they are switched on around the calls.
        with torch._inductor.config.patch(self._inductor_options):
            if key in self._compiled_for:
                # Checking Dynamo's guards (every weight and cache tensor) costs ~1 ms of a ~12 ms
                # step. The graph is compiled with dynamic shapes for exactly these inputs: batch
                # 1, one token, end >= 2 (checked by the caller), and the key above, so the check
                # is skipped.
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._compiled(tokens, input_pos, slots, caches)
            logits = self._compiled(tokens, input_pos, slots, caches)
            self._compiled_for.add(key)
            return logits

    def _one_token(self, tokens: Tensor, positions: Tensor, slots: Tensor,
                   caches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """The one-token step that ``compile=True`` compiles: cache slots ``[0, len(slots))`` attended."""
        return self.output(self._run(tokens, positions, mask=None, end=slots.shape[0], caches=caches)).float()

    @torch.inference_mode()
    def hidden_states(self, tokens: Tensor, input_pos: Tensor | None = None) -> Tensor:
        """Final-normed hidden states (B, S, dim), as ``Transformer.hidden_states``.

        For callers that need the logits at a few positions only (likelihood scoring): the
        vocab x dim head is the largest single matrix of a small model.
        """
        if self.cache_len and input_pos is None:
            raise ValueError("a KV cache is set up: pass input_pos")
        return self._forward(tokens, input_pos)

    def _forward(self, tokens: Tensor, input_pos: Tensor | None) -> Tensor:
        bsz, seqlen = tokens.shape
        cached = bool(self.cache_len)
        positions = input_pos if input_pos is not None else torch.arange(seqlen, device=tokens.device)
        mask, end = None, None
        if cached:
            if positions.dim() == 1 and seqlen == 1:
                end = int(positions[0]) + 1  # a one-token step sees cache slots 0..pos: slice, no mask
            elif positions.dim() == 1 and torch.equal(positions, torch.arange(seqlen, device=positions.device)):
                end = seqlen  # prefill from position 0: plain causal attention over the first slots
            else:
                # Attend only up to the furthest position of the call: the slots after it are
                # masked for every query anyway (scoring batches leave much of the cache unused).
                end = int(positions.max()) + 1
                slots = torch.arange(end, device=tokens.device)
                m = slots <= positions.unsqueeze(-1)
                mask = m.view(1, 1, seqlen, -1) if m.dim() == 2 else m.unsqueeze(1)
        return self._run(tokens, positions, mask=mask, end=end)

    def _run(self, tokens: Tensor, positions: Tensor, mask: Tensor | None, end: int | None,
             caches: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        bsz, seqlen = tokens.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        h = self.model.tok_embeddings(tokens)
        # An eager one-token step on the kernel: each layer's attention (RoPE, the cache write,
        # softmax over the slots) in one call instead of ~25 small ops; every row at one position,
        # or (continuous batching) each row at its own: rotated by and attending up to its own
        # position (SDPA with a mask per row ran a small matrix-vector product per row and head:
        # ~15% of a batch-8 step).
        pos = end - 1 if end is not None else -1
        attend = None
        if (self.gemv and caches is None and seqlen == 1 and self.layers
                and self.layers[0].attention.kv_cache is not None and not torch.compiler.is_compiling()):
            if mask is None and positions.dim() == 1 and bsz <= MAX_ROWS:
                rope = self.model.rope[pos].float()  # (D/2, 2) of the one position

                def attend(qkv: Tensor, cache: Any) -> Tensor:
                    return decode_attention(qkv, rope, cache.k, cache.v, pos, nh, nkv)
            elif positions.dim() == 2:
                rows = positions.reshape(-1)
                rope = self.model.rope[rows].float().contiguous()  # (B, D/2, 2)

                def attend(qkv: Tensor, cache: Any) -> Tensor:
                    return decode_attention_rows(qkv, rope, cache.k, cache.v, rows, nh, nkv)
        if attend is not None:
            for layer in self.layers:
                qkv = layer.wqkv(h, norm=layer.attention_norm)
                h = layer.wo(attend(qkv, layer.attention.kv_cache), "add", h)
                h = layer.w2(layer.w13(h, norm=layer.ffn_norm), "add", h, swiglu=True)
            return _rms_norm(h, self.model.norm)
        rope = self.model.rope[positions].float()  # (S, D/2, 2) or (B, S, D/2, 2)
        rope = (rope if rope.dim() == 4 else rope.unsqueeze(0)).unsqueeze(2)
        for i, layer in enumerate(self.layers):
            qkv = layer.wqkv(h, norm=layer.attention_norm)
            qk = qkv[..., : (nh + nkv) * hd].reshape(bsz, seqlen, nh + nkv, hd // 2, 2)
            qk = _rotate(qk, rope).type_as(qkv)
            q = qk[:, :, :nh].transpose(1, 2)
            k = qk[:, :, nh:].transpose(1, 2)
            v = qkv[..., (nh + nkv) * hd:].view(bsz, seqlen, nkv, hd).transpose(1, 2)
            cache = layer.attention.kv_cache
            if caches is not None:  # the compiled batch-1 step: (S,) positions
                ck, cv = caches[i]
                ck[:bsz, :, positions] = k.to(ck.dtype)
                cv[:bsz, :, positions] = v.to(cv.dtype)
                k, v = ck[:bsz], cv[:bsz]
            elif cache is not None:
                k, v = cache.update(positions, k, v)
            if end is not None and (caches is not None or cache is not None):
                k, v = k[:, :, :end], v[:, :, :end]
            if k.dtype != q.dtype:  # a cache in another precision (kv_cache_dtype): attention in q's
                k, v = k.to(q.dtype), v.to(q.dtype)
            if seqlen == 1 and (mask is None or mask.shape[0] == 1):
                out = _one_query_attention(q, k, v, mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                                     enable_gqa=nkv != nh)
            h = layer.wo(out.transpose(1, 2).reshape(bsz, seqlen, nh * hd), "add", h)
            h = layer.w2(layer.w13(h, norm=layer.ffn_norm), "add", h, swiglu=True)
        return _rms_norm(h, self.model.norm)


def optimize_for_decode(model: Transformer, *, compile: bool | None = None,
                        gemv: bool | None = None) -> DecodeModel:
    """Wrap ``model`` (eval, inference only) for fast batch-1 decoding; see the module docstring.

    ``compile=None`` picks the measured default (off: on the 2-core CPU compiling the step
    takes ~20-80 s, which a reply of a few hundred tokens does not pay back; a server or a
    long chat session does). ``gemv=None`` runs decode steps on llamalab's matrix-vector
    kernel where it can be built (True: or raise, False: oneDNN's kernels).
    The wrapper shares the model's weights; at bf16 it also holds oneDNN's reordered copy (for
    prefill), and with ``compile=True`` at fp32 a packed copy (the C++ GEMM template's). It
    must be rebuilt if the model's weights are replaced (with ``compile=True`` also if they are
    changed in place: freezing folds them into the compiled graph; at bf16 prefill reads the
    reordered copy).
    """
    return DecodeModel(model.eval(), compile=bool(compile), gemv=gemv)
