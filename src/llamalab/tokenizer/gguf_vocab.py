"""Rebuild a tokenizer from the vocabulary a GGUF file stores in its metadata.

A GGUF carries no tokenizer.json, only llama.cpp's description of the vocabulary under
`tokenizer.ggml.*`. We turn that description into a `tokenizers.Tokenizer` that behaves the way
llama.cpp (and, where they agree, the model's original Hugging Face tokenizer) does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from .base import TokenizerError
from .hf import HFTokenizer
from .tiktoken_bpe import LLAMA3_PAT_STR

__all__ = ["PRE_TOKENIZERS", "tokenizer_from_gguf", "read_gguf_fields", "sentencepiece_merges"]

log = logging.getLogger(__name__)

# llama.cpp token types (llama_token_type / gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_QWEN2_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` -> how text is split before BPE, following llama.cpp's groups:
#   "gpt2":     GPT-2's own split (the regex built into ByteLevel).
#   "digits":   every digit on its own first, then GPT-2's split (StarCoder, SmolLM, ...).
#   "llama3":   Llama 3's regex; these vocabularies also take a whole pre-token that is itself a
#               token before trying merges (llama.cpp's and HF's `ignore_merges`).
#   "qwen2":    Qwen2's regex (Llama 3's with single digits).
# llama.cpp's "default" adds a few extra splits of punctuation runs; like transformers we use
# GPT-2's regex there, which agrees with it on ordinary text.
PRE_TOKENIZERS: dict[str, str] = {
    "default": "gpt2",
    "gpt2": "gpt2",
    "gpt-2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "jais": "gpt2",
    "phi-2": "gpt2",
    "roberta-bpe": "gpt2",
    "starcoder": "digits",
    "refact": "digits",
    "command-r": "digits",
    "smollm": "digits",
    "codeshell": "digits",
    "exaone": "digits",
    "minerva-7b": "digits",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "llama-bpe": "llama3",
    "falcon3": "llama3",
    "smaug-bpe": "llama3",
    "dbrx": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "stablelm2": "qwen2",
    "megrez": "qwen2",
}


def read_gguf_fields(path: str) -> dict[str, Any]:
    """The `tokenizer.*` and `general.*` metadata of a GGUF file, decoded to Python values."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError/struct.error/OSError for non-GGUF input
        raise TokenizerError(f"{path}: not a readable GGUF file ({e})") from None
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith(("tokenizer.", "general."))
    }


def _as_list(value: Any) -> list[Any]:
    return list(value) if value is not None else []


def _opt_int(fields: Mapping[str, Any], key: str, n_vocab: int, source: str) -> int | None:
    value = fields.get(key)
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n_vocab:
        # llama.cpp writes -1 / out-of-range ids for "none" in a few converters.
        log.warning("%s: %s=%d is outside the vocabulary; ignoring it", source, key, value)
        return None
    return value


def sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's score-driven BPE over this vocabulary.

    SentencePiece (and llama.cpp's SPM tokenizer) repeatedly joins the adjacent pair whose
    concatenation is an ordinary piece with the highest score. An HF BPE model applies ranked
    merges instead, so every way of cutting such a piece into two known pieces becomes a merge,
    ranked by the piece's score (higher first), ties by the piece's id. Only normal and
    user-defined pieces are merge results, as in SentencePiece; control, byte and unused pieces
    are not.
    """
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    ranked: list[tuple[float, int, int, int, str, str]] = []
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind not in (NORMAL, USER_DEFINED) or len(piece) < 2 or vocab.get(piece) != i:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-float(score), i, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_tokenizer(fields: Mapping[str, Any], tokens: list[str], types: list[int], source: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _as_list(fields.get("tokenizer.ggml.scores"))
    if len(scores) != len(tokens):
        raise TokenizerError(
            f"{source}: tokenizer.ggml.scores has {len(scores)} entries; expected one per token ({len(tokens)})"
        )
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk_id = _opt_int(fields, "tokenizer.ggml.unknown_token_id", len(tokens), source)
    if unk_id is None and UNKNOWN in types:
        unk_id = types.index(UNKNOWN)
    model = models.BPE(
        vocab=vocab,
        merges=sentencepiece_merges(tokens, scores, types),
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=BYTE in types,
    )
    tok = Tokenizer(model)
    add_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
    # The normalizer runs separately on each stretch of text between added tokens, so the
    # prefix '▁' is re-added after every special token: llama.cpp's (and Meta's) behaviour.
    steps = [normalizers.Prepend("\u2581")] if add_prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _byte_level_tokenizer(fields: Mapping[str, Any], tokens: list[str], source: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = str(fields.get("tokenizer.ggml.pre", "default"))
    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:
        # Guessing GPT-2's split would silently produce different ids than the model was
        # trained on; better to refuse and name the value so support can be added here.
        raise TokenizerError(
            f"{source}: unsupported tokenizer.ggml.pre {pre!r}; expected one of {sorted(PRE_TOKENIZERS)}"
        )
    raw_merges = _as_list(fields.get("tokenizer.ggml.merges"))
    merges: list[tuple[str, str]] = []
    for n, m in enumerate(raw_merges):
        parts = str(m).split(" ")
        if len(parts) != 2:
            raise TokenizerError(f"{source}: tokenizer.ggml.merges[{n}] = {m!r}; expected 'left right'")
        merges.append((parts[0], parts[1]))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=kind == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "gpt2":
        tok.pre_tokenizer = byte_level
    elif kind == "digits":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        pattern = LLAMA3_PAT_STR if kind == "llama3" else _QWEN2_PAT_STR
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    return tok


def tokenizer_from_gguf(fields: Mapping[str, Any], *, source: str = "GGUF metadata") -> HFTokenizer:
    """Build an HFTokenizer from decoded GGUF metadata (`{key: python value}`).

    Supports `tokenizer.ggml.model` "gpt2" (byte-level BPE from tokens + merges, split chosen by
    `tokenizer.ggml.pre`, see PRE_TOKENIZERS; unknown values raise TokenizerError) and "llama"
    (SentencePiece BPE with byte fallback, merges rebuilt from scores). Control tokens become
    special tokens, user-defined ones non-special added tokens. `source` names the file in errors.
    """
    from tokenizers import AddedToken

    model = fields.get("tokenizer.ggml.model")
    tokens = [str(t) for t in _as_list(fields.get("tokenizer.ggml.tokens"))]
    if not tokens:
        raise TokenizerError(f"{source}: no tokenizer.ggml.tokens; expected an embedded vocabulary")
    types = [int(t) for t in _as_list(fields.get("tokenizer.ggml.token_type"))] or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise TokenizerError(
            f"{source}: tokenizer.ggml.token_type has {len(types)} entries; expected one per token ({len(tokens)})"
        )
    if model == "llama":
        tok = _spm_tokenizer(fields, tokens, types, source)
    elif model == "gpt2":
        tok = _byte_level_tokenizer(fields, tokens, source)
    else:
        raise TokenizerError(f"{source}: unsupported tokenizer.ggml.model {model!r}; expected 'llama' or 'gpt2'")

    # Added tokens are matched whole in the text before the model sees it. Their content is
    # the vocabulary entry itself, so they keep the ids the file gives them.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    )
    n = len(tokens)
    if len(set(tokens)) != n:
        # The later copy of a repeated string can never be produced by encode; decode skips it.
        log.warning("%s: tokenizer.ggml.tokens has %d repeated entries", source, n - len(set(tokens)))
    specials = {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL}
    extra_stops = [
        i
        for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if (i := _opt_int(fields, key, n, source)) is not None
    ]
    add_bos = fields.get("tokenizer.ggml.add_bos_token")
    # llama.cpp's defaults when the flag is absent: SentencePiece vocabularies add bos.
    add_bos_default = bool(add_bos) if add_bos is not None else model == "llama"
    template = fields.get("tokenizer.chat_template")
    label = fields.get("general.name") or fields.get("tokenizer.ggml.pre") or model
    return HFTokenizer(
        tok,
        bos_id=_opt_int(fields, "tokenizer.ggml.bos_token_id", n, source),
        eos_id=_opt_int(fields, "tokenizer.ggml.eos_token_id", n, source),
        pad_id=_opt_int(fields, "tokenizer.ggml.padding_token_id", n, source),
        special_tokens=specials,
        extra_stop_ids=extra_stops,
        chat_template=str(template) if template is not None else None,
        add_bos_default=add_bos_default,
        vocab_size=n,
        name=f"gguf:{source if source != 'GGUF metadata' else label}",
    )
