"""Several processes on one node: ``torchrun --nproc-per-node N -m hcrlhf ...`` (docs/distributed.md).

One process stays the default and nothing here changes it: every helper is the identity (or a no-op) when
``torch.distributed`` is not initialised. Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment)
:func:`setup` opens the process group — NCCL on CUDA, gloo on the CPU — with a collective timeout, so a rank that
stops answering ends the job instead of hanging it, and pins each rank to its GPU (``LOCAL_RANK``).

What is split over the ranks, and what is shared:

* **data** — each rank takes one contiguous block of the rows (:func:`shard_bounds`): the prompts of an RL
  iteration (an RLOO group never straddles two ranks), the safety prompts of the safety test. Results come back
  in the global order with :func:`all_gather_rows`, so every rank sees the same costs, cost window, bound and λ;
* **gradients** — summed over ranks: each rank's loss is its share of the *global* loss (global
  denominators, :func:`all_reduce_sum`) times the world size, and the ranks average (FSDP2's reduce-scatter, or
  :func:`average_gradients` for replicated models);
* **models** — :func:`shard_model` applies FSDP2 (``fully_shard``) per decoder layer and at the root, with an
  optional bf16-parameters / fp32-reduction mixed-precision policy; or models stay replicated.

Collectives must be called the same number of times on every rank. An FSDP2 model all-gathers its weights on
every forward, so loops over micro-batches agree on their count first (:func:`agree_max`), and generation
runs on weights gathered once (:func:`gathered_for_generation`), since ranks stop generating at different
lengths.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import types
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "setup", "close", "is_distributed", "world_size", "rank", "is_main", "barrier", "main_first", "shard_bounds",
    "all_gather_rows", "all_reduce_sum", "agree_max", "broadcast_object", "all_gather_objects", "on_main", "check_same",
    "shard_model", "add_forward_method", "is_sharded", "gathered_for_generation", "average_gradients",
    "full_state_dict", "default_device", "DEFAULT_TIMEOUT_S",
]

#: Seconds a collective may wait for the other ranks before the job fails (``HCRLHF_DIST_TIMEOUT`` overrides).
DEFAULT_TIMEOUT_S = 1800


def setup(timeout_s: float | None = None) -> bool:
    """Open the process group when launched by ``torchrun`` with more than one process; returns whether this
    process is one of several.

    Safe to call more than once and in one process (then it does nothing). The backend is NCCL when CUDA is
    available, else gloo; each rank uses GPU ``LOCAL_RANK``. ``timeout_s`` (default ``HCRLHF_DIST_TIMEOUT`` or
    :data:`DEFAULT_TIMEOUT_S`) bounds how long a collective waits for a rank that died or hangs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if timeout_s is None:
        timeout_s = float(os.environ.get("HCRLHF_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_world_size() > 1


def close() -> None:
    """Leave the process group (at the end of a command; nothing to do in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True in a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that logs, writes reports and spends δ."""
    return rank() == 0


def default_device() -> torch.device:
    """This rank's GPU under torchrun with CUDA, else the CPU."""
    if torch.cuda.is_available() and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. building files in a shared cache), the other ranks after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard_bounds(n: int, *, of: int | None = None, index: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of rank ``index``'s contiguous block of ``n`` rows split over ``of`` ranks (default:
    this rank of this group). The first ``n % of`` ranks take one row more; blocks follow rank order, so
    concatenating them in rank order gives the rows back in order."""
    of = world_size() if of is None else of
    index = rank() if index is None else index
    base, extra = divmod(n, of)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0, in rank order (block sizes may differ; the trailing
    dimensions and the dtype must agree). One process: ``tensor`` itself."""
    if not is_distributed():
        return tensor
    sizes = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    gathered_sizes = [torch.empty_like(sizes) for _ in range(world_size())]
    dist.all_gather(gathered_sizes, sizes)
    counts = [int(s) for s in gathered_sizes]
    largest = max(counts)
    padded = tensor.new_zeros((largest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:count] for part, count in zip(parts, counts)])


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``tensor`` (a new tensor; ``tensor`` is unchanged). One process: ``tensor``."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def agree_max(value: int, device=None) -> int:
    """The largest ``value`` over ranks (e.g. a micro-batch count every rank must then run)."""
    if not is_distributed():
        return int(value)
    device = device if device is not None else default_device()
    out = torch.tensor([int(value)], dtype=torch.int64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out)


def broadcast_object(value, src: int = 0):
    """``value`` of rank ``src`` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(items: list) -> list:
    """Concatenate every rank's list ``items`` in rank order (any picklable items, e.g. response texts)."""
    if not is_distributed():
        return list(items)
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def on_main(function, *args, share: bool = True, **kwargs):
    """Run ``function`` on rank 0 only and return its result on every rank (``share=False``: on rank 0 only, the
    others get None, for results that do not travel, such as an open ledger); an exception it raises is raised on
    every rank, so that no rank waits in a collective for a rank that failed. For work that must happen once:
    spending δ in the ledger, writing a report. One process: ``function(*args, **kwargs)``."""
    if not is_distributed():
        return function(*args, **kwargs)
    outcome, kept = None, None
    if is_main():
        try:
            kept = function(*args, **kwargs)
            outcome = (True, kept if share else None)
        except Exception as error:  # re-raised below, on every rank
            outcome = (False, error if _picklable(error) else RuntimeError(f"{type(error).__name__}: {error}"))
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value if share or not is_main() else kept


def _picklable(value) -> bool:
    import pickle

    try:
        pickle.loads(pickle.dumps(value))
    except Exception:  # noqa: BLE001 - any failure means "send a plain error instead"
        return False
    return True


def check_same(name: str, values: Sequence[float]) -> None:
    """Raise on every rank unless ``values`` are equal on all ranks (the debug check of replicated state such
    as the cost window's μ̂, σ̂, the bound and λ)."""
    if not is_distributed():
        return
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, [float(v) for v in values])
    if any(other != gathered[0] for other in gathered):
        rows = "; ".join(f"rank {i}: {v}" for i, v in enumerate(gathered))
        raise RuntimeError(f"{name} differs between ranks (it must be identical on every rank): {rows}")


# ------------------------------------------------------------------------------------- models


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (its ``_no_split_modules`` classes, as accelerate and
    verl pick FSDP units)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names and m is not model]


def shard_model(model: nn.Module, *, mixed_precision: bool = False, forward_methods: Sequence[str] = ()) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) over this process group: one unit per decoder layer
    (the model's ``_no_split_modules``), one at the root (embeddings, final norm, LM head, score heads).

    Args:
        model: on this rank's device, every rank holding the same weights (the root unit's parameters are
            sharded from them).
        mixed_precision: bf16 parameters in forward/backward with fp32 gradient reduction (the fp32 master
            weights stay sharded); CUDA only.
        forward_methods: names of methods other than ``forward`` that use the root's parameters (registered
            with ``register_fsdp_forward_method`` so that they gather and release them, e.g. ``generate``).

    Returns:
        ``model``, sharded in place. One process: ``model`` unchanged.
    """
    if not is_distributed():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
              else MixedPrecisionPolicy())
    for layer in _decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for name in forward_methods:
        register_fsdp_forward_method(model, name)
    return model


def add_forward_method(model: nn.Module, name: str, function) -> None:
    """Bind ``function(model, ...)`` as ``model.<name>`` (for :func:`shard_model`'s ``forward_methods``)."""
    setattr(model, name, types.MethodType(function, model))


def is_sharded(model: nn.Module) -> bool:
    """True for a model sharded by FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered_for_generation(model: nn.Module):
    """Inside the block an FSDP2 model holds its full weights on every rank and keeps them between forwards:
    generation then runs without collectives, so ranks may stop at different lengths (which would deadlock a
    per-forward all-gather). Unchanged for a model that is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True)


def average_gradients(parameters) -> None:
    """Average the gradients of replicated (not sharded) parameters over ranks, in one flat all-reduce per
    dtype. Parameters without a gradient on this rank take part as zeros (every rank must send the same
    sizes)."""
    if not is_distributed():
        return
    by_dtype: dict = {}
    for parameter in parameters:
        if parameter.requires_grad:
            by_dtype.setdefault((parameter.dtype, parameter.device), []).append(parameter)
    for group in by_dtype.values():
        for parameter in group:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size()
        offset = 0
        for parameter in group:
            n = parameter.numel()
            parameter.grad.copy_(flat[offset:offset + n].view_as(parameter.grad))
            offset += n


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's state dict on the CPU: gathered from the shards on every rank (a collective; rank 0
    then writes it). A model that is not sharded: its own state dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
