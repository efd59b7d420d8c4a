"""Writing GGUF files (llama.cpp's format) from any checkpoint llamalab reads.

Written with gguf-py's ``GGUFWriter``: llama.cpp's tensor names (``blk.N.attn_q.weight`` ...),
its ``llama.*`` metadata keys, the q/k weights in Meta's interleaved rotary layout (what
llama.cpp's own converter leaves after undoing HF's permutation), ``rope_freqs.weight`` for a
Llama 3.1 RoPE scaling, no ``output.weight`` for a tied head. Matrices are stored in the asked
type (F32, F16, BF16, or round-to-nearest Q8_0 / Q4_0 / Q4_1), norms
in F32, as llama.cpp's converter does. Q8_0/Q4_0/Q4_1 go through
:func:`llamalab.quant.blocks.quantize` (bit-equal to gguf-py's, tested), BF16 through gguf-py.

Tokenizers: a GGUF source's ``tokenizer.*`` fields are copied as they are; a byte-level BPE
tokenizer (``tokenizer.json``, GPT-2 style split) is written as llama.cpp's "gpt2" model with its
tokens, merges and token types. Other tokenizers (SentencePiece, tiktoken) are refused with an
error saying so, rather than written wrongly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamalab.checkpoint import convert
from llamalab.checkpoint.base import Checkpoint, CheckpointError
from llamalab.fsutil import fsync_path

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1"}
# llama.cpp's token types (gguf.TokenType).
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def meta_name_to_gguf(name: str) -> str:
    """Meta's weight name -> llama.cpp's (``layers.3.attention.wq.weight`` -> ``blk.3.attn_q.weight``)."""
    if name in convert._GGUF_TOP:
        return convert._GGUF_TOP[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in convert._GGUF_LAYER:
        return f"blk.{parts[1]}.{convert._GGUF_LAYER[parts[2]]}"
    raise CheckpointError(f"tensor {name}: not a llama weight GGUF has a name for")


def _tokenizer_fields(ckpt: Checkpoint) -> dict[str, Any]:
    """The ``tokenizer.*`` metadata for ``ckpt``'s tokenizer (CheckpointError if it cannot be written)."""
    tok = ckpt.tokenizer
    if tok is None:
        raise CheckpointError(f"{ckpt.path}: no tokenizer to write into the GGUF file (llama.cpp needs one)")
    if ckpt.format == "gguf":
        from llamalab.checkpoint.gguf_header import read_gguf_header

        return {k: v for k, v in read_gguf_header(ckpt.path).fields.items() if k.startswith("tokenizer.")}
    backend = getattr(tok, "backend", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise CheckpointError(f"{ckpt.path}: writing its tokenizer ({getattr(tok, 'name', type(tok).__name__)}) "
                              f"into GGUF is not supported yet: only GGUF sources and byte-level BPE "
                              f"tokenizer.json files with GPT-2's split")
    vocab: dict[str, int] = model["vocab"]
    # One entry per row of the embedding (llama.cpp checks it): rows past the tokenizer's vocabulary
    # are unused padding, as llama.cpp's converter writes them.
    n = max(tok.vocab_size, ckpt.config.vocab_size)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [_UNUSED if i >= tok.vocab_size else _NORMAL for i in range(n)]
    for text, i in vocab.items():
        if i < n:
            tokens[i] = text
    for added in spec.get("added_tokens") or []:
        i = int(added["id"])
        if i < n:
            tokens[i] = added["content"]
            types[i] = _CONTROL if added.get("special") else _USER_DEFINED
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges") or []]
    fields: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",  # llama.cpp's name
                              "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                              "tokenizer.ggml.merges": merges,
                              "tokenizer.ggml.add_bos_token": bool(getattr(tok, "add_bos_default", False))}
    for key, value in (("bos", tok.bos_id), ("eos", tok.eos_id), ("padding", getattr(tok, "pad_id", None))):
        if value is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = int(value)
    if getattr(tok, "chat_template", None):
        fields["tokenizer.chat_template"] = tok.chat_template
    return fields


def _add_field(w: Any, key: str, value: Any) -> None:
    """One metadata entry with the GGUF value type llama.cpp expects for it."""
    import gguf

    if key in ("tokenizer.ggml.scores",):
        w.add_array(key, [float(v) for v in value])
    elif key == "tokenizer.ggml.token_type":
        w.add_array(key, [int(v) for v in value])
    elif isinstance(value, list):
        w.add_array(key, value)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        # Token ids and counts are uint32 in llama.cpp's files.
        w.add_uint32(key, value) if value >= 0 else w.add_int32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        raise CheckpointError(f"metadata {key}: cannot write a {type(value).__name__} ({gguf.__name__})")


def _tensor_bytes(arr: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """``arr`` (fp32) in GGUF type ``kind``: (data, raw ggml type or None for plain numpy dtypes)."""
    import gguf

    if kind == "f32":
        return arr.astype(np.float32), None
    if kind == "f16":
        return arr.astype(np.float16), None
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    if kind in ("q8_0", "q4_0", "q4_1"):
        # llamalab's round-to-nearest: bit-equal to gguf-py's quantizer, in torch (~10x faster).
        from llamalab.quant.blocks import quantize

        return quantize(torch.from_numpy(arr), kind.upper()).numpy(), qtype
    return gguf.quants.quantize(arr, qtype), qtype


def write_gguf(ckpt: Checkpoint, dst: str | os.PathLike[str], tensor_type: str = "f16") -> Path:
    """Write ``ckpt`` as one GGUF file at ``dst`` (which must not exist), matrices in ``tensor_type``.

    The file appears atomically (written beside it, then renamed). Returns its path.
    """
    import gguf

    kind = tensor_type.lower()
    if kind not in GGUF_TYPES:
        raise ValueError(f"--type {tensor_type!r}: expected one of {', '.join(GGUF_TYPES)}")
    dst = Path(dst).expanduser()
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; the GGUF writer does not overwrite")
    c = ckpt.config
    tok_fields = _tokenizer_fields(ckpt)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    try:
        w.add_name(str((ckpt.metadata.get("gguf") or {}).get("general.name") or ckpt.path.name))
        w.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[kind]]))
        w.add_block_count(c.n_layers)
        w.add_context_length(c.max_seq_len)
        w.add_embedding_length(c.dim)
        w.add_feed_forward_length(c.hidden_dim)
        w.add_head_count(c.n_heads)
        w.add_head_count_kv(c.n_kv_heads)
        w.add_rope_freq_base(float(c.rope_theta))
        w.add_layer_norm_rms_eps(float(c.norm_eps))
        w.add_rope_dimension_count(c.head_dim)
        w.add_vocab_size(c.vocab_size)
        if c.rope_scaling is not None:
            w.add_uint32("llama.rope.scaling.original_context_length", c.rope_scaling.original_max_seq_len)
        for key, value in tok_fields.items():
            _add_field(w, key, value)
        sd = ckpt.state_dict
        for name in sd:
            if c.tie_embeddings and name == "output.weight":
                continue  # llama.cpp writes no output tensor for a tied head
            arr = sd[name].detach().to(torch.float32).numpy()
            if arr.ndim == 1:
                w.add_tensor(meta_name_to_gguf(name), arr.astype(np.float32))
                continue
            try:
                data, raw = _tensor_bytes(arr, kind)
            except (ValueError, gguf.quants.QuantError) as e:
                raise CheckpointError(f"tensor {name} {list(arr.shape)}: cannot be stored as {kind}: {e}") from None
            w.add_tensor(meta_name_to_gguf(name), data, raw_dtype=raw)
        if c.rope_scaling is not None:
            factors = convert.gguf_rope_factors(c.head_dim, c.rope_theta, c.rope_scaling)
            w.add_tensor("rope_freqs.weight", factors.numpy().astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        fsync_path(dst.parent)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return dst
