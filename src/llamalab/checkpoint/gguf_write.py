"""Writing GGUF files (llama.cpp's format) from any checkpoint llamalab reads.

Written with gguf-py's ``GGUFWriter``: llama.cpp's tensor names (``blk.N.attn_q.weight`` ...),
its ``llama.*`` metadata keys, the q/k weights in Meta's interleaved rotary layout (what
llama.cpp's own converter leaves after undoing HF's permutation), ``rope_freqs.weight`` for a
Llama 3.1 RoPE scaling, no ``output.weight`` for a tied head. Matrices are stored in the asked
type (F32, F16, BF16, or round-to-nearest Q8_0 / Q4_0 / Q4_1 / Q4_K / Q3_K), norms
in F32, as llama.cpp's converter does. Q8_0/Q4_0/Q4_1 go through
:func:`llamalab.quant.blocks.quantize` (bit-equal to gguf-py's, tested), the K-quants through
:mod:`llamalab.quant.grids`, BF16 through gguf-py. ``llamalab quantize`` passes its own blocks
(GPTQ's) for the tensors it quantized.

Tokenizers: a GGUF source's ``tokenizer.*`` fields are copied as they are; a byte-level BPE
tokenizer (``tokenizer.json``, GPT-2 style split) is written as llama.cpp's "gpt2" model with its
tokens, merges and token types; a SentencePiece model (LLaMA 1/2) as llama.cpp's "llama" model
(pieces, scores, token types; one that normalizes text is refused: llama.cpp would tokenize it
otherwise); a tiktoken rank file (Llama 3) as llama.cpp's "gpt2" model with the "llama-bpe" split
(tokens in byte-level form, the merges the ranks imply, the special tokens as controls).
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

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q3_k")
_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
               "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q4_k": "MOSTLY_Q4_K_S", "q3_k": "MOSTLY_Q3_K_S"}
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
    sp = getattr(tok, "_sp", None)
    if sp is not None:  # SentencePiece (LLaMA 1/2): llama.cpp's "llama" vocabulary
        return _sentencepiece_fields(tok, sp, ckpt)
    if str(getattr(tok, "name", "")).startswith("tiktoken:"):  # Llama 3: byte-level BPE, "llama-bpe"
        return _tiktoken_fields(tok, ckpt)
    backend = getattr(tok, "backend", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        raise CheckpointError(f"{ckpt.path}: writing its tokenizer ({getattr(tok, 'name', type(tok).__name__)}) "
                              f"into GGUF is not supported yet: only GGUF sources, SentencePiece models and byte-level "
                              f"BPE tokenizer.json files with GPT-2's split")
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


def _byte_level(data: bytes) -> str:
    """Bytes in GPT-2's byte-level alphabet (printable bytes as themselves, others from U+0100)."""
    printable = [b for b in range(256) if 0x21 <= b <= 0x7E or 0xA1 <= b <= 0xAC or 0xAE <= b <= 0xFF]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + k) for k, b in enumerate(b for b in range(256) if b not in table)})
    return "".join(table[b] for b in data)


def tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges a tiktoken rank table implies, in rank order: each multi-byte token is the
    merge of the two parts byte-pair encoding with the lower ranks alone leaves of it."""
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, at = r, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _tiktoken_fields(tok: Any, ckpt: Checkpoint) -> dict[str, Any]:
    """A Llama 3 tiktoken vocabulary as llama.cpp's "gpt2" model with the "llama-bpe" split: the
    ranks' tokens in byte-level form, the merges they imply, the 256 special tokens as controls."""
    from llamalab.tokenizer.tiktoken_bpe import read_tiktoken_ranks

    ranks = read_tiktoken_ranks(tok.path)
    n = max(tok.vocab_size, ckpt.config.vocab_size)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [_UNUSED] * n
    for data, rank in ranks.items():
        tokens[rank] = _byte_level(data)
        types[rank] = _NORMAL
    for text, i in tok.special_tokens.items():
        tokens[i] = text
        types[i] = _CONTROL
    merges = [f"{_byte_level(a)} {_byte_level(b)}" for a, b in tiktoken_merges(ranks)]
    fields: dict[str, Any] = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
                              "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                              "tokenizer.ggml.merges": merges, "tokenizer.ggml.add_bos_token": True,
                              "tokenizer.ggml.bos_token_id": int(tok.bos_id), "tokenizer.ggml.eos_token_id": int(tok.eos_id)}
    if tok.pad_id is not None:
        fields["tokenizer.ggml.padding_token_id"] = int(tok.pad_id)
    if getattr(tok, "chat_template", None):
        fields["tokenizer.chat_template"] = tok.chat_template
    return fields


def _sentencepiece_fields(tok: Any, sp: Any, ckpt: Checkpoint) -> dict[str, Any]:
    """A SentencePiece model as llama.cpp's "llama" vocabulary: pieces, scores and token types (as
    llama.cpp's converter writes them), bos/eos/unk, rows past the vocabulary as unused padding."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    norm = proto.normalizer_spec
    if (norm.name not in ("identity", "")  and norm.precompiled_charsmap) or norm.remove_extra_whitespaces:
        # llama.cpp's "llama" vocabulary normalizes nothing (LLaMA's own model: identity, spaces kept).
        raise CheckpointError(f"{ckpt.path}: its SentencePiece model normalizes text ({norm.name or 'custom'}"
                              f"{', collapses whitespace' if norm.remove_extra_whitespaces else ''}); llama.cpp's "
                              f"vocabulary does not, so the GGUF file would tokenize differently")
    n_sp = sp.get_piece_size()
    n = max(n_sp, ckpt.config.vocab_size)
    tokens, scores, types = [], [], []
    for i in range(n_sp):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            types.append(2)  # UNKNOWN
        elif sp.is_control(i):
            types.append(_CONTROL)
        elif sp.is_byte(i):
            types.append(6)  # BYTE
        elif sp.is_unused(i):
            types.append(_UNUSED)
        else:
            types.append(_NORMAL)
    for i in range(n_sp, n):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(_UNUSED)
    fields: dict[str, Any] = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                              "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types,
                              "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False}
    for key, value in (("bos", sp.bos_id()), ("eos", sp.eos_id()), ("unknown", sp.unk_id()), ("padding", sp.pad_id())):
        if value is not None and value >= 0:
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
    if kind in ("q4_k", "q3_k"):
        from llamalab.quant.grids import block_format

        return block_format(kind).rtn(torch.from_numpy(arr))[0].numpy(), qtype
    return gguf.quants.quantize(arr, qtype), qtype


def write_gguf(ckpt: Checkpoint, dst: str | os.PathLike[str], tensor_type: str = "f16", *,
               tensors: dict[str, tuple[torch.Tensor, str]] | None = None) -> Path:
    """Write ``ckpt`` as one GGUF file at ``dst`` (which must not exist), matrices in ``tensor_type``.

    ``tensors`` maps Meta weight names to blocks already quantized, ``(uint8 (rows, row_bytes),
    GGUF type name)``, written as they are instead of the state dict's tensor. The file appears
    atomically (written beside it, then renamed). Returns its path.
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
        given = tensors or {}
        for name in sd:
            if c.tie_embeddings and name == "output.weight":
                continue  # llama.cpp writes no output tensor for a tied head
            if name in given:
                data_t, type_name = given[name]
                w.add_tensor(meta_name_to_gguf(name), data_t.contiguous().numpy(),
                             raw_dtype=gguf.GGMLQuantizationType[type_name.upper()])
                continue
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
