"""Several processes, one per device, on PyTorch's own stack: torchrun's environment, the process
group, FSDP2 sharding (`fully_shard`), the few collectives the loop needs, and sharded checkpoints
(`torch.distributed.checkpoint`). This is the one module that knows about them.

With one process (no torchrun) `init` returns a `World` of one and every function here is the
identity or does nothing, so a single-process run is exactly what it was.

Where exactness needs care (each checked against one process in tests/test_distributed.py):
- Gradients are summed across ranks, not averaged: each rank's loss is already its share of the
  step's global average (the trainer divides by `World.sum` of the step's token counts), so the
  sum is the one-process gradient, and the gradient norm and its clip threshold mean what they
  mean in one process. FSDP2 averages by default; gloo has no PREMUL_SUM, so the reduction is
  forced to a plain sum.
- The model is built on the meta device on every rank and filled from rank 0's copy of the
  weights, so the host holds one copy, not one per process. Non-persistent buffers (rotary
  frequencies) are not in a state dict and hold garbage after `to_empty`: they are broadcast
  from rank 0 too.
- `clip_grad_norm_` over sharded parameters returns a DTensor; `full_value` reduces it.
"""

from __future__ import annotations

import ctypes
import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from oprd.models import ModelSpec, decoder_layers, empty_model, resolve_device, resolve_dtype
from oprd.models import load_model as load_whole

COLLECTIVE_TIMEOUT_S = int(os.environ.get("OPRD_COLLECTIVE_TIMEOUT_S", "1800"))  # a hung rank fails, never waits


@dataclass(frozen=True)
class World:
    """Which process this is, of how many, and the collectives among them (the identity for one)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over every process (a copy; `value` itself is left alone)."""
        return self._all_reduce(value, dist.ReduceOp.SUM) if self.distributed else value

    def max(self, value: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(value, dist.ReduceOp.MAX) if self.distributed else value

    @staticmethod
    def _all_reduce(value: torch.Tensor, op) -> torch.Tensor:
        reduced = value.detach().clone()
        if reduced.device.type == "cpu" and dist.get_backend() == "nccl":  # NCCL reduces GPU tensors only
            reduced = reduced.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(reduced, op=op)
        return reduced.to(value.device)

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any process."""
        return bool(self.max(torch.tensor(int(flag))))

    def gather(self, value) -> list:
        """Every process's `value` (picklable), in rank order, on every process."""
        if not self.distributed:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value):
        """Rank 0's `value`, on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


ONE_PROCESS = World()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> tuple[World, torch.device]:
    """The process group when torchrun started several processes (NCCL on GPUs, gloo on the CPU),
    and this process's device (GPU LOCAL_RANK); else a world of one on `device`."""
    if not launched_by_torchrun():
        return World(), resolve_device(device)
    if dist.is_initialized():
        return current(), _local_device(device)
    local = _local_device(device)
    dist.init_process_group("nccl" if local.type == "cuda" else "gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
                            device_id=local if local.type == "cuda" else None)
    return current(), local


def _local_device(device: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if resolve_device(device).type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def current() -> World:
    if not dist.is_initialized():
        return World()
    return World(dist.get_rank(), dist.get_world_size())


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- values


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's value as a plain tensor (e.g. the total norm `clip_grad_norm_` returns under FSDP)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded parameter (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# --------------------------------------------------------------------------- sharding


def shard(model: torch.nn.Module, mp_policy: MixedPrecisionPolicy | None = None) -> torch.nn.Module:
    """FSDP2: each decoder block its own unit, then the root (embeddings, final norm, LM head).
    Gradients are summed across ranks (see the module notes)."""
    policy = mp_policy or MixedPrecisionPolicy()
    for block in decoder_layers(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def fill_from_rank0(model: torch.nn.Module, source: torch.nn.Module | None, device: torch.device) -> None:
    """Materialises a sharded meta-device `model` on `device` with the weights and non-persistent
    buffers of rank 0's `source` (None on the other ranks)."""
    model.to_empty(device=device)
    full = source.state_dict() if source is not None else {}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    persistent = set(model.state_dict())
    buffers = {name: buf.to("cpu") for name, buf in (source.named_buffers() if source is not None else [])
               if name not in persistent}
    buffers = current().broadcast(buffers)
    for name, buf in model.named_buffers():
        if name in buffers:
            buf.copy_(buffers[name].to(buf.device, buf.dtype))


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Keeps a sharded model's parameters gathered for the whole block (generation runs one forward
    per token; gathering each block's weights for every token would dominate), then shards them
    again. The identity for an unsharded model."""
    if not is_sharded(model):
        yield
        return
    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:  # back to fully_shard's default: every unit but the root reshards after forward
            unit.set_reshard_after_forward(unit is not model, recurse=False)
            unit.reshard()


def reshard(model: torch.nn.Module) -> None:
    """Frees the gathered parameters a forward-only (no backward) pass left in place."""
    if is_sharded(model):
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of a sharded model, gathered to rank 0 on the CPU (empty on the other ranks)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# --------------------------------------------------------------------------- sharded checkpoints


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ema_teacher: torch.nn.Module | None = None) -> None:
    """Model and optimizer (and an EMA teacher), each rank writing its own shards into `folder` (DCP)."""
    import torch.distributed.checkpoint as dcp

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if ema_teacher is not None:
        state["ema_teacher"] = get_model_state_dict(ema_teacher)
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 ema_teacher: torch.nn.Module | None = None) -> None:
    """The inverse of `save_sharded`. Partial: parameters that never took a step (the LM head of
    an OPRD-only run) have no optimizer state to restore."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    if ema_teacher is not None:
        state["ema_teacher"] = get_model_state_dict(ema_teacher)
    dcp.load(state, checkpoint_id=str(folder), planner=DefaultLoadPlanner(allow_partial_load=True))
    if ema_teacher is not None:
        missing = [key for key in state["ema_teacher"] if key not in _saved_keys(folder, "ema_teacher")]
        if missing:
            raise KeyError(f"the checkpoint holds no EMA teacher ({missing[0]} ...)")
        set_model_state_dict(ema_teacher, state["ema_teacher"])
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))


def _saved_keys(folder: Path, prefix: str) -> set[str]:
    """The keys under `prefix` a DCP checkpoint holds (allow_partial_load skips missing ones silently)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    return {key.removeprefix(prefix + ".") for key in metadata.state_dict_metadata if key.startswith(prefix + ".")}


# --------------------------------------------------------------------------- loading


def load_model(spec: ModelSpec, device: torch.device, world: World, *, dtype: torch.dtype | None = None,
               up_to_layer: int | None = None, shard_it: bool = True,
               mp_policy: MixedPrecisionPolicy | None = None) -> torch.nn.Module:
    """`models.load_model`, sharded across the processes of `world` (unless `shard_it` is false or
    there is one process): built on the meta device everywhere and filled from the copy that rank 0
    alone loads on its CPU."""
    if not world.distributed or not shard_it:
        return load_whole(spec, device, dtype=dtype, up_to_layer=up_to_layer)
    dtype = dtype or resolve_dtype(spec.dtype, device)
    source = load_whole(spec, torch.device("cpu"), dtype=dtype, up_to_layer=up_to_layer) if world.main else None
    model = shard(empty_model(spec, dtype, up_to_layer), mp_policy)
    fill_from_rank0(model, source, device)
    del source
    return_freed_memory()
    return model


def return_freed_memory() -> None:
    """Hands the heap pages that freed tensors leave behind back to the kernel. glibc keeps them
    resident otherwise, and loading a sharded model frees a lot: rank 0 builds the whole model to
    broadcast it and every rank receives each weight whole before keeping its shard (at
    Qwen3-0.6B's shape rank 0 stayed about 1.5 GiB above rank 1 until it did this)."""
    gc.collect()
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only; other C libraries return freed pages
    if trim is not None:
        trim(0)
