"""Modules that hold weights in GGUF blocks and stand in for ``nn.Linear`` / ``nn.Embedding``.

They are put into a built :class:`~llamalab.model.Transformer` from outside (the model knows
nothing of quantization), see :func:`llamalab.quant.gguf.quantized_model`. Activations are fp32:
``forward`` takes any float input and returns the input's dtype, computing in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llamalab.quant.blocks import block_type, dequantize, dequantize_rows, row_bytes
from llamalab.quant.kernels import kernel_available, qmatmul


class QuantizedLinear(nn.Module):
    """``y = x W^T`` with W kept as GGUF blocks (``blocks``: uint8 (out, row_bytes), often a view
    of the file's memory map).

    Block types with a kernel (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K) multiply in their blocks on llamalab's kernel
    where it runs; elsewhere, and for the types without one, the weight is dequantized per call
    (the pure-PyTorch reference: correct anywhere, slow).
    """

    def __init__(self, blocks: Tensor, type_name: str, in_features: int) -> None:
        super().__init__()
        if blocks.dim() != 2 or blocks.dtype != torch.uint8 or blocks.shape[1] != row_bytes(type_name, in_features):
            raise ValueError(f"{type_name} weight of {in_features} columns: expected uint8 blocks "
                             f"(rows, {row_bytes(type_name, in_features)}), got {blocks.dtype} {tuple(blocks.shape)}")
        self.register_buffer("blocks", blocks, persistent=False)
        self.type_name = type_name
        self.in_features = in_features
        self.out_features = blocks.shape[0]

    @property
    def uses_kernel(self) -> bool:
        """Whether products run on the kernel (else the reference path)."""
        return block_type(self.type_name).kernel and self.blocks.device.type == "cpu" and kernel_available()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight as a float (out, in) matrix (a new tensor)."""
        return dequantize(self.blocks, self.type_name, self.in_features, dtype)

    def forward(self, x: Tensor) -> Tensor:
        """``x W^T`` in ``x``'s dtype (computed in fp32)."""
        if self.uses_kernel:
            return qmatmul(x.float(), [self.blocks], [self.type_name]).to(x.dtype)
        return F.linear(x.float(), self.dequantized()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}"


class QuantizedEmbedding(nn.Module):
    """An embedding table kept as GGUF blocks: a lookup dequantizes the rows it reads, in fp32.

    ``weight`` is an empty fp32 tensor on the table's device, so that code asking a model for its
    embedding's device and dtype (the engine, the KV cache) gets fp32 on the right device.
    """

    def __init__(self, blocks: Tensor, type_name: str, embedding_dim: int) -> None:
        super().__init__()
        row_bytes(type_name, embedding_dim)  # checks the row length
        self.register_buffer("blocks", blocks, persistent=False)
        self.register_buffer("weight", torch.empty(0, device=blocks.device), persistent=False)
        self.type_name = type_name
        self.embedding_dim = embedding_dim
        self.num_embeddings = blocks.shape[0]

    def forward(self, tokens: Tensor) -> Tensor:
        """The rows of ``tokens`` (any shape), (*tokens.shape, dim) fp32."""
        return dequantize_rows(self.blocks, self.type_name, self.embedding_dim, tokens)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.type_name}"
