"""Worker threads of the PyTorch backend: a small persistent, fork-aware pool running single-threaded kernels."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

# -- workers --------------------------------------------------------------------------------------------
# Chunks run on a small persistent pool of threads, each running single-threaded kernels (the kernels
# release the GIL). With OpenMP inside every op instead, each of the many mid-sized ops ends in a
# barrier: a thread descheduled by any other process then stalls both, and the gaps between ops leave a
# core idle. Workers take the next chunk as soon as they are free. SPARSE_ATTN_TORCH_WORKERS=0 (or 1)
# turns this off and runs the chunks in the caller's thread with torch's intra-op threads.
WORKERS_ENV = "SPARSE_ATTN_TORCH_WORKERS"
_pool = None
_pool_size = 0
_pool_pid = 0
_pool_lock = threading.Lock()


def worker_count() -> int:
    """Worker threads to use: SPARSE_ATTN_TORCH_WORKERS, else torch's intra-op thread count."""
    value = os.environ.get(WORKERS_ENV)
    if value is not None and value.strip():
        if not value.strip().isdigit():
            raise ValueError(f"{WORKERS_ENV} must be a non-negative integer, got {value!r}")
        return int(value)
    return torch.get_num_threads()


def _single_threaded(barrier: threading.Barrier) -> None:
    # torch initialises a thread's OpenMP/MKL thread counts lazily on first use, from the process
    # default: trigger that first, then make this worker (and only this worker) single-threaded.
    torch.get_num_threads()
    torch.set_num_threads(1)
    barrier.wait()


def _get_pool(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size, _pool_pid
    with _pool_lock:
        # A forked child inherits the executor but not its threads: start a new pool there.
        if _pool is None or _pool_size != size or _pool_pid != os.getpid():
            if _pool is not None:
                _pool.shutdown(wait=False)
            caller_threads = torch.get_num_threads()
            barrier = threading.Barrier(size + 1)
            _pool = ThreadPoolExecutor(size, thread_name_prefix="sparse_attn_torch")
            for _ in range(size):
                _pool.submit(_single_threaded, barrier)
            barrier.wait()  # every worker exists and is single-threaded
            # torch.set_num_threads also sets the default new threads start with: give it back.
            torch.set_num_threads(caller_threads)
            _pool_size, _pool_pid = size, os.getpid()
        return _pool


def _without_grad(fn, task, inference: bool):
    # Grad and inference modes are thread-local: the caller runs below autograd (and may be in inference
    # mode, whose tensors other threads may not update in place); a worker thread would not be.
    with torch.inference_mode(inference), torch.no_grad():
        return fn(task)


def ordered_map(fn, tasks: list):
    """Results of `fn` over `tasks`, in order, computed by the workers with a bounded number in flight."""
    workers = worker_count()
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    pool = _get_pool(workers)
    inference = torch.is_inference_mode_enabled()
    pending = []
    for task in tasks:
        pending.append(pool.submit(_without_grad, fn, task, inference))
        if len(pending) > workers:
            yield pending.pop(0).result()
    for future in pending:
        yield future.result()
