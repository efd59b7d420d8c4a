"""Text generation: prefill + cached decoding, sampling, beam search, streaming, chat templates."""

from llamalab.generate.chat import chat_format, chat_stop_ids, encode_chat, render_chat_template
from llamalab.generate.engine import (
    GenerationConfig,
    GenerationResult,
    Generator,
    TextStreamer,
    greedy_generate,
)
from llamalab.generate.sampling import (
    apply_min_p,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    process_logits,
)

__all__ = [
    "GenerationConfig",
    "GenerationResult",
    "Generator",
    "TextStreamer",
    "apply_min_p",
    "apply_repetition_penalty",
    "apply_temperature",
    "apply_top_k",
    "apply_top_p",
    "chat_format",
    "chat_stop_ids",
    "encode_chat",
    "greedy_generate",
    "process_logits",
    "render_chat_template",
]
