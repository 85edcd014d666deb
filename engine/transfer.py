"""Copies between host and device that do not make the host wait for the device.

`torch.tensor(values, device="cuda")` copies synchronously: the host waits for everything queued on
the stream first, which in a step that is meant to run ahead of the device (async scheduling, chained
draft steps, a speculative step's verify forward) is a stall per call. A copy from pinned host memory
with non_blocking=True is queued behind the stream's work and returns at once; from pageable memory
CUDA only says the driver "may synchronize with the stream" to stage it, so `to_device` pins first
(torch's caching host allocator keeps each pinned block until the copy that read it has run).
"""
from __future__ import annotations

import torch


def to_device(values, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values, dtype) (values: a list, or a host tensor) on `device`, queued on the current
    stream without a host wait: on a GPU from pinned memory (from pageable memory CUDA may synchronise)."""
    cuda = (device.type if isinstance(device, torch.device) else str(device).split(":")[0]) == "cuda"
    if isinstance(values, torch.Tensor):
        host = values if dtype is None else values.to(dtype)
        return (host.pin_memory() if cuda else host).to(device, non_blocking=True)
    return torch.tensor(values, dtype=dtype, pin_memory=cuda).to(device, non_blocking=True)


def take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] (a copy, the indices sent without a host wait), or x itself when rows are all of its
    rows in order."""
    if len(rows) == x.shape[0] and rows == list(range(len(rows))):
        return x
    return x[to_device(rows, x.device)]


class HostCopy:
    """A device tensor's copy to the host, started now: `read()` waits for the work queued before the
    copy and no further (reading the device tensor itself would wait for everything queued on the
    stream since: on a GPU, the next step too)."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            self.host, self.copied = tensor, None
            return
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.host.copy_(tensor, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()

    def read(self) -> list:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()


def read(*tensors: torch.Tensor) -> list[list]:
    """The values of int64 tensors as lists, in ONE device-to-host copy (reading them one by one
    waits for the device, and pays a copy, each time)."""
    flat = torch.cat([t.reshape(-1) for t in tensors]).tolist() if tensors else []
    out, at = [], 0
    for t in tensors:
        out.append(flat[at: at + t.numel()])
        at += t.numel()
    return out
