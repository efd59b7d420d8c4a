"""Quantized weights, applied to a built model from outside (the model knows nothing of them).

- :mod:`~llamalab.quant.blocks`: GGUF's block formats and the pure-PyTorch dequantizer;
- :mod:`~llamalab.quant.kernels`: llamalab's products on the blocks (C++, AVX2 / AVX-512 VNNI);
- :mod:`~llamalab.quant.linear`: ``QuantizedLinear`` / ``QuantizedEmbedding``;
- :mod:`~llamalab.quant.gguf`: a quantized GGUF file as a model that keeps its blocks.

``llamalab.load(path)`` (dtype left unset) runs a quantized GGUF quantized; a float dtype
dequantizes it at load instead.
"""

from __future__ import annotations

from llamalab.quant.gguf import has_quantized_weights, quantized_model
from llamalab.quant.linear import QuantizedEmbedding, QuantizedLinear

__all__ = ["QuantizedEmbedding", "QuantizedLinear", "has_quantized_weights", "quantized_model"]
