"""Text generation: prefill + cached decoding, and chat templates."""

from llamalab.generate.chat import render_chat_template
from llamalab.generate.engine import GenerationResult, TextStreamer, greedy_generate

__all__ = ["GenerationResult", "TextStreamer", "greedy_generate", "render_chat_template"]
