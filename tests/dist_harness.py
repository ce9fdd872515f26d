"""Run a function on N gloo ranks forked inside the test (seconds, not a launcher per test).

Heavy modules are imported once in the parent; each child joins a fresh process group on a
free local port with one thread, runs `fn(rank, world, *args)`, sends back its (picklable,
CPU) result, and exits hard so pytest's state in the fork is never torn down twice. A join
timeout turns a hang into a failure.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank, world, port, fn, args, queue):
    code = 0
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
        from sat_dist.parallel.state import destroy_distributed

        destroy_distributed()
    except BaseException:  # report everything, including assertion errors in fn
        queue.put((rank, "error", traceback.format_exc()))
        code = 1
    finally:
        # The queue's feeder thread sends in the background: flush it before the hard exit,
        # or a failing rank's traceback is lost and the parent waits out its timeout.
        queue.close()
        queue.join_thread()
        os._exit(code)


def run_ranks(world: int, fn, *args, timeout: float = 180.0) -> list:
    """Results of fn on ranks 0..world-1, in rank order; raises on any rank's failure."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
                break
    except Exception as e:  # queue.Empty on timeout
        errors.append(f"timed out after {timeout}s waiting for ranks ({type(e).__name__})")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
