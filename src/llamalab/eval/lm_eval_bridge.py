"""llamalab as an lm-eval model: any lm-eval task can run on a llamalab checkpoint.

Importing this module registers the model type ``"llamalab"`` with lm-eval::

    import lm_eval
    import llamalab.eval.lm_eval_bridge  # noqa: F401  (registers "llamalab")

    results = lm_eval.simple_evaluate(model="llamalab",
                                      model_args="pretrained=smollm2-135m-instruct,dtype=float32,batch_size=16",
                                      tasks=["arc_easy"])

or on the command line: ``python -m llamalab.eval.lm_eval_bridge run --model llamalab --tasks arc_easy`` (lm-eval's
own CLI with the model registered first). The three requests lm-eval makes are answered by
:class:`~llamalab.eval.lm.EvalModel`, which tokenizes and truncates as lm-eval's HF backend does.
"""

from __future__ import annotations

import sys
from typing import Any

import lm_eval.models  # noqa: F401  (the built-in models first: lm-eval imports them only into an empty registry)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llamalab.eval.base import warn
from llamalab.eval.lm import EvalModel

__all__ = ["LlamalabLM"]


def _as_int(name: str, value: Any, default: int) -> int:
    if value is None or value == "auto" or (isinstance(value, str) and value.startswith("auto")):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"llamalab lm-eval model: {name}={value!r}: expected an integer") from None


@register_model("llamalab")
class LlamalabLM(LM):
    """An lm-eval ``LM`` backed by a llamalab model.

    ``model_args``: ``pretrained`` (registered name or path; default smollm2-135m-instruct),
    ``dtype`` (float32 | bfloat16 | float16), ``batch_size``, ``max_length``, ``device``,
    ``max_gen_toks`` (default 256, as lm-eval's HF backend). ``eval_model`` (Python only): an
    already built :class:`EvalModel` to use instead of loading.
    """

    def __init__(self, pretrained: str = "smollm2-135m-instruct", dtype: str = "float32",
                 batch_size: int | str | None = 16, max_length: int | str | None = None, device: str | None = "cpu",
                 max_gen_toks: int | str = 256, eval_model: EvalModel | None = None, **unused: Any) -> None:
        super().__init__()
        unused.pop("max_batch_size", None)
        if unused:
            warn(f"lm-eval model llamalab: ignoring unknown model_args {sorted(unused)}")
        if eval_model is None:
            from llamalab.precision import parse_dtype

            eval_model = EvalModel.load(pretrained, dtype=parse_dtype(str(dtype)), batch_size=_as_int("batch_size", batch_size, 16),
                                        max_length=_as_int("max_length", max_length, 0) or None,
                                        device=device or "cpu")
        self.lm = eval_model
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks, 256)

    @property
    def tokenizer_name(self) -> str:
        """Identity of the tokenizer (lm-eval caches requests per tokenizer)."""
        return str(getattr(self.lm.tokenizer, "name", self.lm.name)).replace("/", "__")

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is greedy) for each ``Instance.args == (context, continuation)``."""
        return self.lm.loglikelihood([tuple(r.args) for r in requests], progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log P(text) over disjoint max-length windows for each ``Instance.args == (text,)``."""
        return self.lm.loglikelihood_rolling([r.args[0] for r in requests], progress=not disable_tqdm)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each ``Instance.args == (context, gen_kwargs)``, cut at ``until``.

        Requests are grouped by their generation settings; sampling settings are not supported
        (llamalab's evaluation is greedy) and say so.
        """
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, r in enumerate(requests):
            context, kwargs = r.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = _as_int("max_gen_toks", kwargs.pop("max_gen_toks", self.max_gen_toks), self.max_gen_toks)
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
                warn("lm-eval model llamalab: sampling requested; generating greedily", once_key="bridge-sampling")
            groups.setdefault((tuple(until), max_new), []).append(i)
        for (until, max_new), idx in groups.items():
            texts = self.lm.generate_until([requests[i].args[0] for i in idx], until=list(until),
                                           max_new_tokens=max_new, progress=not disable_tqdm)
            for i, text in zip(idx, texts):
                out[i] = text
        return [t or "" for t in out]


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line with the ``llamalab`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
