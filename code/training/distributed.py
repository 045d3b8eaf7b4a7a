"""Processes of a training job: launch environment, process group, seeding, collectives and shutdown.

One process per device, launched by ``torchrun`` (or ``python -m torch.distributed.launch --use_env``,
which sets the same variables); plain ``python script.py`` is one process without a process group,
and every helper here is then the identity or a no-op, so the trainer has one code path.

Why there is no DDP: PEFT adapters with gradient checkpointing under DDP fail (parameters marked
ready twice). Instead the loss gathers the features of every rank with gradients
(``gather_with_grad``) and the trainer averages the gradients after backward
(``all_reduce_gradients``); see ``gather_with_grad`` for why that is the single-process gradient.
"""

from __future__ import annotations

import logging
import os
import random
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_MINUTES = 30.0
DEFAULT_BUCKET_MB = 25.0

Result = TypeVar("Result")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job. ``enabled`` is False for a single plain process."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool
    enabled: bool


def launch_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the launcher's variables; ``(0, 1, 0)`` when absent."""
    environ = os.environ if environ is None else environ

    def read(name: str, default: int) -> int:
        value = environ.get(name, "")
        if value == "":
            return default
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"environment variable {name}={value!r} is not an integer") from None

    world_size = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    # Single-node launches without LOCAL_RANK (rare) number devices like ranks.
    local_rank = read("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(f"inconsistent launch environment: RANK={rank} WORLD_SIZE={world_size} "
                         f"LOCAL_RANK={local_rank}")
    if world_size > 1 and "RANK" not in environ:
        raise ValueError(f"WORLD_SIZE={world_size} but RANK is not set; launch with torchrun")
    return rank, world_size, local_rank


def _pick_device(device_name: str, local_rank: int, distributed: bool) -> torch.device:
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device_name!r} requested but CUDA is not available")
    index = cuda_index(local_rank, torch.cuda.device_count()) if distributed else (device.index or 0)
    return torch.device("cuda", index)


def cuda_index(local_rank: int, visible_gpus: int) -> int:
    """The GPU a launched process owns: its local rank modulo the GPUs it sees. With one GPU per
    process (SLURM's usual binding, or CUDA_VISIBLE_DEVICES set per task) every process sees its
    own as ``cuda:0``; with as many visible as local ranks it is ``cuda:LOCAL_RANK``; with more
    processes than GPUs they share GPUs round-robin (nccl refuses two ranks on one GPU, so that
    layout runs only with gloo)."""
    if visible_gpus < 1:
        raise RuntimeError("CUDA is available but this process sees no GPU (check CUDA_VISIBLE_DEVICES)")
    return local_rank % visible_gpus


def init_distributed(device_name: str = "auto", timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
                     environ: Mapping[str, str] | None = None) -> DistContext:
    """Join the job's process group (nccl on CUDA, gloo otherwise) if launched with more than one
    process. ``timeout_minutes`` bounds every collective, so a lost rank cannot hang the others forever."""
    rank, world_size, local_rank = launch_environment(environ)
    enabled = world_size > 1
    device = _pick_device(device_name, local_rank, enabled)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        options: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes), **options)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                       is_main=rank == 0, enabled=enabled)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed ``random``, numpy and torch (every device) with ``seed + rank``; returns that seed."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def _comm_device() -> torch.device:
    """The device collectives of small helper tensors run on (nccl only moves CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _first_dims(x: torch.Tensor) -> list[int]:
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=_comm_device())
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``x`` in rank order; ranks may hold different first dims."""
    largest = max(sizes)
    if largest == 0:
        return x.new_empty((0, *x.shape[1:]))
    local = x.to(_comm_device()).contiguous()
    if local.shape[0] < largest:
        local = torch.cat([local, local.new_zeros((largest - local.shape[0], *local.shape[1:]))])
    parts = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(parts, local)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).to(x.device)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of the gradients of its rows.

    Why this, plus averaging parameter gradients over ranks, is the single-process gradient: every
    rank computes the same global loss L from the same gathered features, so the job optimises
    N copies of L. Rank r's features x_r enter all N copies; the summed backward gives rank r
    ``N * dL/dx_r`` (the other copies' gradients, of equal value, arrive through the all_reduce),
    hence ``N * dL/dx_r * dx_r/dθ`` for its encoder parameters θ. Averaging over ranks gives
    ``Σ_r dL/dx_r * dx_r/dθ = dL/dθ``, the gradient one process gets on the global batch.
    Parameters of the loss itself (a learnable temperature) get dL/dτ on every rank, and the
    average leaves that unchanged.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.rows = (sum(sizes[:rank]), sum(sizes[: rank + 1]))
        return _gather_padded(local, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        summed = grad.to(_comm_device(), copy=True).contiguous()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        start, stop = ctx.rows
        return summed[start:stop].to(grad.device), None, None


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order, differentiable; the identity in one process.

    Every rank must call it, in the same order; first dims may differ between ranks."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x, _first_dims(x), dist.get_rank())


def all_gather_tensor(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order, without gradient (validation features,
    keys); first dims may differ between ranks."""
    if not is_distributed():
        return x.detach()
    with torch.no_grad():
        return _gather_padded(x.detach(), _first_dims(x))


def all_reduce_mean(value: float) -> float:
    """The mean of a number over ranks."""
    if not is_distributed():
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total.item()) / dist.get_world_size()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects)."""
    if not is_distributed():
        return obj
    holder = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src, device=_comm_device())
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_gradients(parameters: Iterable[nn.Parameter], bucket_mb: float = DEFAULT_BUCKET_MB) -> None:
    """Average the gradients of ``parameters`` over ranks, in place (every rank passes the same
    parameters in the same order). A gradient that is None on some ranks counts as zeros there;
    one that is None on every rank stays None."""
    if not is_distributed():
        return
    params = [p for p in parameters if p.requires_grad]
    world_size = dist.get_world_size()
    # Ranks must agree on which gradients exist, or their buckets would not line up.
    has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX)
    grads: list[torch.Tensor] = []
    for param, anywhere in zip(params, has_grad.tolist(), strict=True):
        if not anywhere:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        elif param.grad.is_sparse:
            raise ValueError("all_reduce_gradients does not handle sparse gradients")
        grads.append(param.grad)
    for bucket in _buckets(grads, int(bucket_mb * 2**20)):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        offset = 0
        for grad in bucket:
            grad.copy_(flat[offset: offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def _buckets(tensors: list[torch.Tensor], cap_bytes: int) -> Iterator[list[torch.Tensor]]:
    """Consecutive groups of one device and dtype, each up to ``cap_bytes`` (or one larger tensor)."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for tensor in group:
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > cap_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(tensor)
            size += nbytes
        if bucket:
            yield bucket


def _exit_failed(context: DistContext, code: int) -> None:
    """Print the traceback with the rank and end this process at once. No barrier and no
    destroy_process_group: the other ranks may be blocked in a collective, and waiting for them
    would hang; torchrun sees the non-zero exit and stops the whole job."""
    print(f"[rank {context.rank}/{context.world_size}] failed:\n{traceback.format_exc()}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    logging.shutdown()
    os._exit(code)


def shutdown() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy the group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def distributed_session(device_name: str = "auto",
                        timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Iterator[DistContext]:
    """``init_distributed`` on entry; on success ``shutdown``; on an exception in a multi-process job
    the traceback (with the rank) and an immediate non-zero exit of this process. A single plain
    process sees its exceptions as usual."""
    context = init_distributed(device_name, timeout_minutes)
    try:
        yield context
    except BaseException as exc:
        code = _exit_code(exc)
        if code == 0:  # sys.exit(0) inside the job is a success
            shutdown()
            raise
        if not context.enabled:
            raise
        _exit_failed(context, code)
    shutdown()


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, SystemExit):
        if exc.code is None:
            return 0
        return exc.code if isinstance(exc.code, int) else 1
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


def run_distributed(main: Callable[[DistContext], Result], device_name: str = "auto",
                    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> Result:
    """Run ``main(context)`` inside ``distributed_session``; returns what ``main`` returns."""
    with distributed_session(device_name, timeout_minutes) as context:
        return main(context)
