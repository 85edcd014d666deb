"""On a GPU: the host-device copies of engine/transfer.py do not make the host wait for the work
queued before them (async scheduling and speculative steps rest on it)."""
import functools
import time

import pytest
import torch

from gemforge.engine.transfer import HostCopy, read, to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@functools.cache
def cycles_per_second() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return 10_000_000 / (start.elapsed_time(end) / 1e3)


def busy(seconds: float) -> None:
    """Queue about `seconds` of device work on the current stream."""
    torch.cuda._sleep(int(seconds * cycles_per_second()))


@pytest.mark.parametrize("as_tensor", [False, True], ids=["list", "host-tensor"])  # (block tables: a tensor)
def test_copies_to_the_device_do_not_wait_for_queued_work(as_tensor):
    def values(i):
        v = list(range(i, i + 300))
        return torch.tensor(v, dtype=torch.int32) if as_tensor else v
    for i in range(20):  # the pinned allocator's blocks for these sizes, free again after the sync
        to_device(values(i), "cuda", torch.int64)
    torch.cuda.synchronize()
    busy(0.2)
    t = time.perf_counter()
    copied = [to_device(values(i), torch.device("cuda"), torch.int64) for i in range(20)]
    host = time.perf_counter() - t
    assert host < 0.05, f"20 copies took {host * 1e3:.1f} ms behind 200 ms of queued work: they waited"
    assert [c.tolist() for c in copied] == [list(range(i, i + 300)) for i in range(20)]  # (and arrived whole)
    assert all(c.dtype == torch.int64 for c in copied)


def test_a_host_copy_waits_only_for_the_work_before_it():
    x = torch.arange(10, device="cuda")
    torch.cuda.synchronize()
    copy = HostCopy(x * 2)
    busy(0.2)  # queued after the copy
    t = time.perf_counter()
    assert copy.read() == list(range(0, 20, 2))
    assert time.perf_counter() - t < 0.1
    assert read(x, x + 1) == [list(range(10)), list(range(1, 11))]
