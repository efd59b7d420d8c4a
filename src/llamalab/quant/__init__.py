"""Quantized weights, applied to a built model from outside (the model knows nothing of them).

- :mod:`~llamalab.quant.blocks`: GGUF's block formats and the pure-PyTorch dequantizer;
- :mod:`~llamalab.quant.kernels`: llamalab's products on the blocks (C++, AVX2 / AVX-512 VNNI);
- :mod:`~llamalab.quant.linear`: ``QuantizedLinear`` / ``QuantizedEmbedding``;
- :mod:`~llamalab.quant.gguf`: a quantized GGUF file as a model that keeps its blocks;
- :mod:`~llamalab.quant.grids`, :mod:`~llamalab.quant.gptq`, :mod:`~llamalab.quant.gptq_format`:
  quantizing (round-to-nearest, GPTQ) into GGUF's types or GPTQ's checkpoint format;
- :mod:`~llamalab.quant.cli`: ``llamalab quantize``.

``llamalab.load(path)`` (dtype left unset) runs a quantized GGUF quantized; a float dtype
dequantizes it at load instead. The names below are imported when first used, so that
``llamalab --help`` (which registers ``quantize`` from :mod:`~llamalab.quant.cli`) imports no torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QuantizedEmbedding", "QuantizedLinear", "has_quantized_weights", "quantized_model"]


def __getattr__(name: str) -> Any:
    if name in ("has_quantized_weights", "quantized_model"):
        from llamalab.quant import gguf

        return getattr(gguf, name)
    if name in ("QuantizedEmbedding", "QuantizedLinear"):
        from llamalab.quant import linear

        return getattr(linear, name)
    raise AttributeError(f"module 'llamalab.quant' has no attribute {name!r}")
