"""The CPU ranks' shared-memory collectives: sums and gathers equal to gloo's on every rank, back to back
(the double-buffered slots are never overwritten while read), bitwise the same on all ranks, no file left
in /dev/shm, and a missing rank is an error after the timeout, not a hang."""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenmill.engine.executor.shm_collectives import SHM_DIR, ShmCollectives, supported_shm_device

pytestmark = pytest.mark.skipif(not supported_shm_device(torch.device("cpu")), reason="x86 with /dev/shm only")


def _shm_files() -> set[str]:
    return {f for f in os.listdir(SHM_DIR) if f.startswith("tokenmill-tp-")}


def _init(rank: int, world_size: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)


def _agree_with_gloo(rank: int, world_size: int, port: int) -> None:
    _init(rank, world_size, port)
    shm = ShmCollectives(slot_bytes=64 * 96 * 4)
    g = torch.Generator().manual_seed(rank)
    for i in range(300):  # many in a row, of changing shapes and dtypes, as a step's layers make them
        rows = 1 + i % 64
        dtype = torch.bfloat16 if i % 3 == 0 else torch.float32
        x = torch.randn(rows, 96, generator=g).to(dtype)
        want = x.clone()
        dist.all_reduce(want)
        got = shm.all_reduce(x.clone())
        # 3 ranks in another order round differently in bf16: a couple of its ulps (2^-7 relative)
        tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        same = got.clone()
        dist.broadcast(same, 0)
        assert torch.equal(same, got), "every rank must hold bitwise the same sum"
        parts = shm.all_gather(x)
        wanted = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(wanted, x)
        assert all(torch.equal(p, w) for p, w in zip(parts, wanted, strict=True))
    assert shm.fits(torch.empty(64, 96)) and not shm.fits(torch.empty(65, 96))
    dist.destroy_process_group()


def _one_rank_stays_away(rank: int, world_size: int, port: int) -> None:
    _init(rank, world_size, port)
    checks = []
    shm = ShmCollectives(slot_bytes=1024, check_peers=lambda: checks.append(1), timeout=timedelta(seconds=1))
    if rank == 0:
        with pytest.raises(RuntimeError, match=r"ranks \[1\] did not arrive within 1 s"):
            shm.all_reduce(torch.ones(4))
        assert checks, "the peers' liveness is checked while waiting"
    dist.barrier()
    dist.destroy_process_group()


def _no_room(rank: int, world_size: int, port: int) -> None:
    _init(rank, world_size, port)

    def full(fd, offset, size):
        raise OSError(28, "No space left on device")
    os.posix_fallocate = full  # this spawned process's only
    shm = ShmCollectives(slot_bytes=1024)
    assert not shm.fits(torch.ones(1)) and not shm.fits(torch.ones(0)), "with no room, all go through gloo"
    dist.destroy_process_group()


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_reduce_and_all_gather_equal_gloo(world_size):
    before = _shm_files()
    mp.spawn(_agree_with_gloo, args=(world_size, _free_port()), nprocs=world_size)
    assert _shm_files() == before


def test_a_rank_that_never_arrives_is_an_error_after_the_timeout():
    mp.spawn(_one_rank_stays_away, args=(2, _free_port()), nprocs=2)


def test_no_room_in_dev_shm_falls_back_to_gloo():
    before = _shm_files()
    mp.spawn(_no_room, args=(2, _free_port()), nprocs=2)
    assert _shm_files() == before
