"""Greedy decoding: prefill the prompt once, then one token at a time from the static KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from llamalab.model import Transformer


@dataclass
class GenerationResult:
    """Generated ids and the time spent in each phase."""

    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped_by: str = "length"  # "length" | "stop_token"

    @property
    def prefill_tok_s(self) -> float:
        """Prompt tokens processed per second."""
        return len(self.prompt_ids) / self.prefill_s if self.prefill_s else float("nan")

    @property
    def decode_tok_s(self) -> float:
        """Tokens generated per second after the first (which prefill produces)."""
        n = max(len(self.ids) - 1, 0)
        return n / self.decode_s if self.decode_s and n else float("nan")


@torch.inference_mode()
def greedy_generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *,
                    stop_ids: Iterable[int] = (), on_token: Callable[[int], None] | None = None,
                    vocab_limit: int | None = None) -> GenerationResult:
    """Greedy decoding of one prompt; ``on_token`` sees each new id as it is chosen.

    ``vocab_limit`` keeps the choice among ids below it: embedding tables are often padded past
    the tokenizer's vocabulary (to a multiple of 64 or 128), and those rows have no text.
    """
    if not prompt_ids:
        raise ValueError("greedy_generate: the prompt is empty (expected at least one token)")
    total = len(prompt_ids) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {model.config.max_seq_len} tokens")
    stops = set(stop_ids)
    device = model.tok_embeddings.weight.device
    result = GenerationResult(prompt_ids=list(prompt_ids))
    model.setup_cache(max_batch_size=1, max_seq_len=total)
    try:
        t0 = time.perf_counter()
        tokens = torch.tensor([prompt_ids], device=device)
        logits = model(tokens, input_pos=torch.arange(len(prompt_ids), device=device))
        next_id = _argmax(logits[0, -1], vocab_limit)
        result.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pos = len(prompt_ids)
        for _ in range(max_new_tokens):
            result.ids.append(next_id)
            if on_token is not None:
                on_token(next_id)
            if next_id in stops:
                result.stopped_by = "stop_token"
                break
            if len(result.ids) == max_new_tokens:
                break
            logits = model(torch.tensor([[next_id]], device=device), input_pos=torch.tensor([pos], device=device))
            next_id = _argmax(logits[0, -1], vocab_limit)
            pos += 1
        result.decode_s = time.perf_counter() - t0
    finally:
        model.clear_cache()
    return result


def _argmax(logits: torch.Tensor, vocab_limit: int | None) -> int:
    return int(logits[:vocab_limit].argmax())


class TextStreamer:
    """Turns ids into text pieces without ever splitting a UTF-8 character.

    Byte-fallback and byte-level tokens can end mid-character; the text is decoded from
    all ids so far and a piece is released only when it does not end in U+FFFD.
    """

    def __init__(self, decode: Callable[[list[int]], str], skip_ids: Iterable[int] = ()) -> None:
        self.decode = decode
        self.skip = set(skip_ids)
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly empty)."""
        if token_id in self.skip:
            return ""
        self.ids.append(token_id)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
