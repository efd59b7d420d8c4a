"""A quantized GGUF checkpoint as a Transformer that keeps its weights in their blocks.

:func:`quantized_model` builds the model on the meta device and puts in, from outside, a
:class:`~llamalab.quant.linear.QuantizedLinear` for every linear weight stored in a block type
llamalab's kernels multiply (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K) and a
:class:`~llamalab.quant.linear.QuantizedEmbedding` for a quantized embedding table (the tied head
then multiplies the same blocks). Those weights stay views of the file's memory map: nothing is
dequantized or copied, and pages are read when first used. Everything else (norms, F32/F16
tensors, weights in types without a kernel yet, which are named on one line) is built in fp32 as
:func:`~llamalab.checkpoint.build_model` builds it.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter

import torch
from torch import Tensor, nn

from llamalab.checkpoint.base import Checkpoint, check_state_dict, meta_model
from llamalab.model import Transformer
from llamalab.quant.blocks import BLOCK_TYPES, KERNEL_TYPES, dequantize
from llamalab.quant.linear import QuantizedEmbedding, QuantizedLinear

_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
            "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def has_quantized_weights(ckpt: Checkpoint) -> bool:
    """Whether ``ckpt`` stores weights in a block type llamalab's kernels run (a quantized GGUF)."""
    return bool(ckpt.blocks) and any(t.type_name in KERNEL_TYPES for t in ckpt.blocks.values())


def _blocks(t) -> Tensor:
    """A GGUF tensor's blocks as a uint8 (rows, row_bytes) torch view of the file map (read-only)."""
    with warnings.catch_warnings():
        # The map is read-only; torch warns that writing through the view is undefined. Nothing
        # writes to it: the modules only read their blocks.
        warnings.simplefilter("ignore", UserWarning)
        data = torch.from_numpy(t.data)
    return data.reshape(t.shape[0], -1) if data.dim() != 2 else data


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def quantized_model(ckpt: Checkpoint, *, device: torch.device | str = "cpu", quiet: bool = False) -> Transformer:
    """The Transformer of a GGUF checkpoint with its quantized weights kept in their blocks.

    Linear weights in Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q4_K / Q6_K run on the kernels of :mod:`llamalab.quant.kernels`;
    other quantized linear weights (K-quants ...) are dequantized to fp32 here, and one line on
    stderr says which (unless ``quiet``). Activations and norms are fp32, the KV cache f16
    (``model.kv_cache_dtype``; set it to ``torch.float32`` before ``setup_cache`` for an fp32 one).
    """
    if str(device) != "cpu":
        raise ValueError(f"quantized GGUF weights run on the CPU; load with a float dtype for {device}")
    config = ckpt.config
    check_state_dict(ckpt.state_dict, config, ckpt.path)
    blocks = dict(ckpt.blocks or {})
    model = meta_model(config)
    dequantized: Counter[str] = Counter()
    kept: set[str] = set()
    for i in range(config.n_layers):
        for rel in _LINEARS:
            name = f"layers.{i}.{rel}.weight"
            t = blocks.get(name)
            if t is None:
                continue
            if t.type_name in KERNEL_TYPES:
                _set_module(model, f"layers.{i}.{rel}", QuantizedLinear(_blocks(t), t.type_name, t.shape[1]))
                kept.add(name)
            else:
                dequantized[t.type_name] += 1
    emb = blocks.get("tok_embeddings.weight")
    if emb is not None and emb.type_name in BLOCK_TYPES:
        table = _blocks(emb)
        model.tok_embeddings = QuantizedEmbedding(table, emb.type_name, config.dim)
        kept.add("tok_embeddings.weight")
        if config.tie_embeddings:
            if emb.type_name in KERNEL_TYPES:
                model.output = QuantizedLinear(table, emb.type_name, config.dim)
                kept.add("output.weight")
            else:
                dequantized[emb.type_name] += 1
    head = blocks.get("output.weight")
    if head is not None and not config.tie_embeddings:
        if head.type_name in KERNEL_TYPES:
            model.output = QuantizedLinear(_blocks(head), head.type_name, config.dim)
            kept.add("output.weight")
        else:
            dequantized[head.type_name] += 1
    # The rest, built as build_model builds it: looked up once, in fp32, assigned.
    rest = {}
    for name in ckpt.state_dict:
        if name in kept:
            continue
        if config.tie_embeddings and name == "output.weight" and "tok_embeddings.weight" not in kept:
            continue  # shared below
        rest[name] = ckpt.state_dict[name].to(device=device, dtype=torch.float32, copy=True)
    if config.tie_embeddings and "output.weight" not in kept and "tok_embeddings.weight" not in kept:
        rest["output.weight"] = rest["tok_embeddings.weight"]
    model.load_state_dict(rest, strict=False, assign=True)
    if config.tie_embeddings and "output.weight" not in kept:
        if "tok_embeddings.weight" in kept:  # a table without a kernel: the head dequantized once
            model.output.weight = nn.Parameter(dequantize(model.tok_embeddings.blocks, emb.type_name, config.dim),
                                               requires_grad=False)
        else:
            model.output.weight = model.tok_embeddings.weight
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"{ckpt.path}: quantized_model left {', '.join(leftover[:3])} unbuilt")
    model.init_buffers(device)
    # Keys and values in f16, as llama.cpp keeps them for such files: half the bytes a decode step
    # reads per cached position and twice the positions in the same memory (fp32: kv_cache_dtype).
    model.kv_cache_dtype = torch.float16
    if dequantized and not quiet:
        what = ", ".join(f"{n} {t}" for t, n in sorted(dequantized.items()))
        print(f"llamalab: {ckpt.path.name}: no kernel yet for {what} weight(s): dequantized to fp32 at load",
              file=sys.stderr)
    return model.eval()
