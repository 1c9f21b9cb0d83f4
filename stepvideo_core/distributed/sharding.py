"""Weight sharding: the DiT loaded straight into FSDP2 shards, one tensor at a time in host memory."""

from __future__ import annotations

import torch

from ..dit import DIT_NAME, StepVideoDiT, open_dit_checkpoint, resolve_compute_dtype
from ..loading import check_keys, storage_dtype, to_storage_dtype
from .plan import ParallelContext


def load_dit_sharded(path, ctx: ParallelContext, weight_dtype: torch.dtype = torch.bfloat16,
                     compute_dtype: torch.dtype | None = None, operations=None, **config_overrides) -> StepVideoDiT:
    """``load_dit`` straight into sharded blocks: the model is built and sharded on the meta device, then each
    rank reads the checkpoint one tensor at a time and keeps only its own rows of the block weights (of a GGUF, it
    reads only those rows from the file).

    Every transformer block is wrapped with FSDP2's ``fully_shard`` over all ranks (dim 0 of each tensor); the
    rest of the DiT (embeddings, projections: about 1% of it) is whole on every rank. A block gathers its
    weights just before it runs and frees them after (``reshard_after_forward``), so a rank holds 1/world of
    the blocks plus the block at hand. Host memory holds one tensor at a time, so four 24 GB GPUs on a 64 GB
    machine can load the 30B DiT in fp8, which neither fits one GPU nor four whole copies in host memory.

    A GGUF file is sharded as its quantized bytes: a block-type weight becomes a ``uint8`` parameter laid out as
    rows of whole blocks (``gguf_ops``), so FSDP2's dim-0 split gives each rank whole rows of blocks and the
    all-gather before a block runs rebuilds the file's bytes exactly; the layer dequantizes them in its forward,
    as on one device. FSDP2 gathers a block's uint8 and float tensors together (as bytes when their dtypes
    differ), which is exact, and nothing is ever dequantized to be stored: a rank holds 1/world of the
    quantized block bytes. Every other tensor of a GGUF is stored in the compute dtype, as ``load_dit`` does."""
    from torch.distributed.device_mesh import init_device_mesh  # FSDP2 is imported only when sharding
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    compute_dtype = resolve_compute_dtype(weight_dtype, compute_dtype)
    model, ckpt, key_map = open_dit_checkpoint(path, operations, **config_overrides)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapping = check_keys(ckpt, expected, DIT_NAME, key_map)
    gguf_file = getattr(ckpt, "file", None)
    if gguf_file is not None:  # the gguf package is imported only for a GGUF file
        from ..gguf_loading import stays_quantized
        from ..gguf_ops import set_quantized_weight
    readers = {}  # parameter name -> (rows -> those rows of the tensor as stored: quantized bytes or storage dtype)
    for name, param in list(model.named_parameters()):  # storage first: FSDP2 shards what it is given
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        key = mapping[name]
        if gguf_file is not None:
            if stays_quantized(owner, attr, ckpt.qtype(key)):
                shape = ckpt.raw_shape(key)
                set_quantized_weight(owner, torch.empty(shape, dtype=torch.uint8, device="meta"), ckpt.qtype(key),
                                     expected[name])
                readers[name] = lambda rows, key=key, shape=shape: ckpt.raw(key, rows).view(-1, *shape[1:])
                continue
            dtype = compute_dtype  # as load_dit stores a GGUF's unquantized tensors
            readers[name] = lambda rows, key=key: ckpt.read(key, compute_dtype)[rows]
        else:
            dtype = storage_dtype(owner, attr, weight_dtype, compute_dtype)
            readers[name] = lambda rows, key=key, dtype=dtype: to_storage_dtype(ckpt.read(key), dtype)[rows]
        owner._parameters[attr] = torch.nn.Parameter(param.to(dtype), requires_grad=False)
    mesh = init_device_mesh(ctx.device.type, (ctx.plan.world_size,))
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    model.to_empty(device=ctx.device)
    world, rank = ctx.plan.world_size, ctx.rank
    with torch.no_grad():
        for name, param in model.named_parameters():
            if isinstance(param, DTensor):
                param.to_local().copy_(readers[name](shard_rows(param.shape[0], rank, world)))
            else:
                param.copy_(readers[name](slice(None)))
    model.compute_dtype = compute_dtype
    if gguf_file is not None:
        model.weight_format, model.gguf_file = ckpt.dominant_type(), gguf_file
    return model.eval()


def shard_rows(rows: int, rank: int, world: int) -> slice:
    """The rows of dim 0 that FSDP2's Shard(0) gives ``rank``: ``torch.chunk``'s split (chunks of ceil(rows / world),
    none left for the last ranks when rows are few)."""
    size = -(-rows // world)
    start = min(rank * size, rows)
    return slice(start, min(start + size, rows))
