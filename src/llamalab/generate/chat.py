"""Chat templates: the Jinja template a checkpoint carries, rendered the way transformers does."""

from __future__ import annotations

from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def render_chat_template(template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool = True,
                         **variables: Any) -> str:
    """Render ``messages`` ([{"role": ..., "content": ...}]) with a HF/GGUF chat template.

    Like transformers: a sandboxed environment, ``trim_blocks`` and ``lstrip_blocks``, and the
    ``raise_exception`` helper templates call to reject bad conversations. ``variables`` carries
    ``bos_token`` / ``eos_token`` and any other names the template uses.
    """
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **variables)
