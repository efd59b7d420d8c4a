"""Parallelism applied to a built model from outside: TP, FSDP2, activation checkpointing, compile.

The model (:mod:`llamalab.model`) knows nothing of processes or devices. This module takes
a built :class:`~llamalab.model.Transformer` (ideally on the ``meta`` device) and rewrites
its parameters into DTensors, in the order torchtitan uses:

1. **Tensor parallel** (``tp``) over the mesh's ``"tp"`` dimension, with DTensor's
   ``parallelize_module`` (Megatron-style, no sequence parallelism):

   ===========================  ==============================================  ==========
   module                       style                                           weight
   ===========================  ==============================================  ==========
   ``attention.wq/wk/wv``       ``ColwiseParallel``: heads split across ranks   Shard(0)
   ``attention.wo``             ``RowwiseParallel``: partial sums all-reduced   Shard(1)
   ``feed_forward.w1/w3``       ``ColwiseParallel``: hidden units split         Shard(0)
   ``feed_forward.w2``          ``RowwiseParallel``                             Shard(1)
   ``tok_embeddings``           ``RowwiseParallel``: vocabulary rows split,     Shard(0)
                                output all-reduced to a replicated ``(B,S,D)``
   ``output``                   ``ColwiseParallel(output_layouts=Replicate)``:  Shard(0)
                                vocabulary split, logits all-gathered so the
                                loss is computed on full logits, as unsharded
   norms, RoPE table            replicated (plain tensors)
   ===========================  ==============================================  ==========

   Each :class:`~llamalab.model.Attention` then sees only its local heads, so its
   ``n_heads`` / ``n_kv_heads`` attributes are set to the local counts (``n // tp``).
   Tied embeddings (``tie_embeddings``) stay tied: both sides are Shard(0) over the vocabulary.

2. **Activation checkpointing** per :class:`~llamalab.model.TransformerBlock`:
   ``"full"`` recomputes the whole block in backward; ``"selective"`` is op-level: it
   keeps the outputs of matrix multiplies, attention and TP collectives and recomputes
   the cheap element-wise ops (norms, RoPE, SiLU, products).

3. **torch.compile** per block (``nn.Module.compile`` in place, so parameter names do not change).

4. **FSDP2** (``fully_shard``) over the ``"dp"`` dimension on every block and then on the
   root (embeddings, final norm, output). With ``mixed_precision="bf16"`` parameters are
   all-gathered and computed in bf16 while gradients are reduced and stored in fp32
   (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); the sharded master
   weights and the optimizer state stay fp32.

The checkpoint helpers use ``torch.distributed.checkpoint`` (DCP): each rank writes its
own shards plus shared metadata, and a load re-shards to whatever layout the loading
model has, so a run saved on N processes resumes on M (or on one, without a process group).
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from llamalab.model import Attention, Transformer, TransformerBlock

MIXED_PRECISION = ("fp32", "bf16")
ACTIVATION_CHECKPOINTING = ("none", "full", "selective")


# --------------------------------------------------------------------------- processes and meshes


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_s: float = 1800.0) -> tuple[int, int, int]:
    """Join the process group described by torchrun's environment; return ``(rank, world_size, local_rank)``.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``
    through the ``env://`` rendezvous). Without ``WORLD_SIZE`` (a plain ``python`` run)
    it returns ``(0, 1, 0)`` and creates no process group. On CUDA it selects the GPU
    ``LOCAL_RANK`` and uses NCCL; on CPU it uses gloo. Calling it twice is harmless.
    """
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if torch.cuda.is_available():
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(_backend(), rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    return rank, world_size, local_rank


def is_main_process() -> bool:
    """True on global rank 0, and in a run without a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def device_type() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``: where parameters and batches live."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_mesh(world_size: int, tp: int = 1) -> DeviceMesh:
    """A 2-D device mesh ``(dp, tp)`` of shape ``(world_size // tp, tp)``.

    Initialises the process group first when needed (from torchrun's environment; a
    single process without one gets a private in-memory store, so no port is opened).
    Ranks ``r`` and ``r + 1`` are TP neighbours (TP is the inner, fastest dimension, so
    on a multi-GPU node the TP group stays inside the node).
    """
    if tp < 1 or world_size % tp:
        raise ValueError(f"build_mesh: world_size={world_size} is not divisible by tp={tp}")
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            init_distributed()
        elif world_size == 1:
            dist.init_process_group(_backend(), store=dist.HashStore(), rank=0, world_size=1)
        else:
            raise RuntimeError("build_mesh: no process group; launch with torchrun (see docs/parallelism.md)")
    if dist.get_world_size() != world_size:
        raise ValueError(f"build_mesh: world_size={world_size} but the process group has "
                         f"{dist.get_world_size()} processes")
    return init_device_mesh(device_type(), (world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def data_parallel_rank_and_size(mesh: DeviceMesh | None) -> tuple[int, int]:
    """This process's index among the data-parallel replicas and their count.

    Ranks in one TP group see the same batch; each dp rank takes its own slice of the
    global batch.
    """
    if mesh is None:
        return 0, 1
    dp = mesh["dp"]
    return dp.get_local_rank(), dp.size()


def all_reduce_mean(value: Tensor) -> Tensor:
    """The mean of ``value`` over all processes (e.g. the loss for logging); identity without a group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


# --------------------------------------------------------------------------- parallelize


def parallelize(model: Transformer, mesh: DeviceMesh | None, *, dp_shard: bool = True, tp: bool = False,
                mixed_precision: str = "fp32", activation_checkpointing: str = "none",
                compile: bool = False) -> Transformer:
    """Apply TP, activation checkpointing, compile and FSDP2 to ``model`` in place; return it.

    ``mesh`` is :func:`build_mesh`'s ``(dp, tp)`` mesh (``None`` is allowed when neither
    ``tp`` nor ``dp_shard`` is set: only checkpointing/compile apply). ``tp=True`` splits
    over ``mesh["tp"]``; ``dp_shard=True`` shards parameters, gradients and optimizer state
    over ``mesh["dp"]`` with FSDP2 (a ``dp`` size of 1 is fine: FSDP then only applies the
    mixed-precision policy). With ``dp_shard=False`` and a ``dp`` size above 1, the model is
    replicated with DDP (``replicate``), which is not combined with TP.

    Call it on the model as built, ideally on the ``meta`` device, then ``model.to_empty(device=...)``,
    ``model.init_weights()`` (or :func:`load_full_state_dict`) and ``model.init_buffers()``.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING}, "
                         f"got {activation_checkpointing!r}")
    if mesh is None and (tp or dp_shard):
        raise ValueError("parallelize: tp/dp_shard need a device mesh (build_mesh)")
    if mixed_precision == "bf16" and not dp_shard:
        raise ValueError("parallelize: bf16 mixed precision is applied by FSDP2's MixedPrecisionPolicy; "
                         "set dp_shard=True (a dp size of 1 is fine)")

    if tp and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"])
    if activation_checkpointing != "none":
        apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        for block in model.layers:
            block.compile()
    if dp_shard:
        apply_fsdp(model, mesh["dp"], mixed_precision)
    elif mesh is not None and mesh["dp"].size() > 1:
        if tp and mesh["tp"].size() > 1:
            raise NotImplementedError("parallelize: DDP (dp_shard=False) with TP is not supported; "
                                      "use dp_shard=True")
        from torch.distributed._composable.replicate import replicate

        replicate(model, device_mesh=mesh["dp"])
    return model


def apply_tensor_parallel(model: Transformer, tp_mesh: DeviceMesh) -> None:
    """Split attention heads, SwiGLU hidden units and the vocabulary over ``tp_mesh`` (see the module doc)."""
    tp = tp_mesh.size()
    config = model.config
    for name, n in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads),
                    ("ffn hidden_dim", config.ffn_hidden_dim)):
        if n % tp:
            raise ValueError(f"tensor parallel: {name}={n} is not divisible by tp={tp}")
    tied = config.tie_embeddings and model.output.weight is model.tok_embeddings.weight
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "output": ColwiseParallel(output_layouts=Replicate()),
    })
    if tied:  # both weights are Shard(0) over the vocabulary: share the one DTensor again
        model.output.weight = model.tok_embeddings.weight
    block_plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan)
    # Attention.forward reshapes its projections by head count: give it the local counts.
    for module in model.modules():
        if isinstance(module, Attention):
            module.n_heads = config.n_heads // tp
            module.n_kv_heads = config.n_kv_heads // tp


# Ops whose outputs selective checkpointing keeps: the expensive ones (matmuls, attention)
# and TP collectives (so backward does not repeat communication). Everything else is recomputed.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops._c10d_functional.all_reduce.default,
    torch.ops._c10d_functional.all_gather_into_tensor.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
}


def _selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Wrap every block in ``checkpoint_wrapper`` (non-reentrant).

    ``"full"`` stores only each block's input and recomputes the block in backward;
    ``"selective"`` stores matmul/attention/collective outputs and recomputes the rest.
    The wrapper adds ``_checkpoint_wrapped_module`` to parameter names, but the model's
    ``state_dict`` and the DCP helpers below strip it, so checkpoints keep Meta's names.
    """
    if mode not in ("full", "selective"):
        raise ValueError(f"activation checkpointing mode must be 'full' or 'selective', got {mode!r}")
    kwargs: dict[str, Any] = {"preserve_rng_state": False}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    for i, block in enumerate(model.layers):
        model.layers[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, **kwargs)


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, mixed_precision: str = "fp32") -> None:
    """``fully_shard`` each block, then the root (embeddings, final norm, output)."""
    if mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def blocks(model: nn.Module) -> list[TransformerBlock]:
    """The model's blocks, looking through checkpoint and compile wrappers."""
    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


# --------------------------------------------------------------------------- initialisation


class full_tensor_init(TorchFunctionMode):
    """Within this context, in-place initialisers on DTensors draw the FULL tensor and keep the local shard.

    ``model.init_weights()`` on a sharded model otherwise draws each shard from each rank's
    generator: the weights then depend on the layout, and an FSDP/TP run cannot follow the
    1-process run. Here every rank draws each whole parameter from the (identically seeded)
    global generator, in the model's own order, so the weights are exactly those of
    ``model.init_weights()`` in one process, whatever the mesh. Only one parameter is ever
    materialised in full. Works for any init written with ``torch.nn.init``'s in-place ops.
    """

    # torch.nn.init's functions dispatch on the DTensor before reaching the Tensor methods below.
    _INPLACE = {getattr(torch.nn.init, name) for name in dir(torch.nn.init)
                if name.endswith("_") and not name.startswith("_")} | {
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.fill_, torch.Tensor.zero_,
        torch.Tensor.exponential_, torch.Tensor.bernoulli_, torch.Tensor.random_}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if "tensor" in kwargs:  # torch.nn.init hands the tensor over both positionally and as ``tensor=``
            args = (kwargs.pop("tensor"), *args[1:])
        if func not in self._INPLACE or not args or not isinstance(args[0], DTensor):
            return func(*args, **kwargs)
        target = args[0]
        local = target.to_local()
        full = torch.empty(target.shape, dtype=target.dtype, device=local.device)
        func(full, *args[1:], **kwargs)
        with torch.no_grad():  # scattered from rank 0 (all ranks drew the same tensor)
            local.copy_(distribute_tensor(full, target.device_mesh, target.placements).to_local())
        return target


# --------------------------------------------------------------------------- gradients


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[Tensor] | Tensor, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> Tensor:
    """Clip gradients by their global norm, over all shards on all ranks; return that norm.

    ``torch.nn.utils.clip_grad_norm_`` (torch 2.13) handles DTensor gradients only when
    they all live on one mesh (FSDP alone). With FSDP+TP the norms' gradients live on the
    ``dp`` mesh and the linear layers' on the 2-D mesh ("All operands in aten.stack must
    have the same mesh"), and with TP alone the replicated norms' gradients are plain
    tensors ("got mixed torch.Tensor and DTensor"). So gradients are grouped by
    (mesh, placements), each group's norm is reduced with DTensor (``full_tensor``), and
    the group norms are combined. Plain-tensor gradients are taken to be identical on
    every rank (replicated), as they are here.
    """
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    groups: dict[Any, list[Tensor]] = defaultdict(list)
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups[key].append(g)
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm(group, norm_type, error_if_nonfinite=False)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norms.append(norm)
    total = torch.nn.utils.get_total_norm(norms, norm_type, error_if_nonfinite=False)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"clip_grad_norm_: the total gradient norm is {total.item()}")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for key, group in groups.items():
        if key is None:
            torch._foreach_mul_(group, coef.to(group[0].device))
        else:  # a replicated DTensor scalar, so the in-place product stays on the grads' mesh
            mesh = key[0]
            local = coef.to(group[0].to_local().device)
            torch._foreach_mul_(group, DTensor.from_local(local, mesh, [Replicate()] * mesh.ndim,
                                                          run_check=False))
    return total


# --------------------------------------------------------------------------- checkpoints


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 extra: dict[str, Any] | None = None, *, trainable_only: bool = False) -> None:
    """Write model (and optimizer) state with DCP into directory ``path``; every rank must call it.

    Keys are Meta's parameter names (``layers.0.attention.wq.weight``; optimizer state is
    keyed by the same names), so the checkpoint loads into any layout. ``extra`` holds
    small picklable values stored beside them (e.g. ``{"step": 100}``), read back by
    :func:`load_sharded`. ``trainable_only``: leave out the parameters that do not require
    gradients (LoRA's frozen base: a resumed run rebuilds them from its starting weights).
    """
    opts = StateDictOptions(ignore_frozen_params=trainable_only)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer, options=opts)
        state: dict[str, Any] = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(model, options=opts)}
    if extra:
        state["extra"] = extra
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 extra: dict[str, Any] | None = None, *, trainable_only: bool = False) -> dict[str, Any] | None:
    """Load a :func:`save_sharded` checkpoint into ``model`` (and ``optimizer``) in place.

    The model may be parallelized differently, over a different number of processes, or
    not at all (no process group needed). Pass ``extra`` with the keys and default values
    to read back (e.g. ``{"step": 0}``); the filled dict is returned. ``trainable_only``: read
    only the parameters that require gradients (the others keep their values; a checkpoint
    that holds them too still loads).
    """
    opts = StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer, options=opts)
        state: dict[str, Any] = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(model, options=opts)}
    if extra is not None:
        state["extra"] = dict(extra)
    dcp.load(state, checkpoint_id=str(path))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=opts)
    else:
        set_model_state_dict(model, state["model"], options=opts)
    return state.get("extra")


def export_full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full, unsharded weights on CPU, keyed by Meta's names, on rank 0 (``{}`` elsewhere).

    Every rank must call it (it all-gathers the shards). The result is what the native,
    Meta or HF checkpoint writers take. Without a process group it is simply the state dict.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts)


def load_full_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load full (unsharded) weights, e.g. a pretrained checkpoint, into a parallelized model.

    Every rank passes the same ``state_dict``; each keeps only its own shards.
    """
    set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=True))
