"""This process: its memory (resident, peak, malloc's in-use heap) and its share of the cores in a parallel sweep.
Used by the pipeline (``memory/peak_mb``), the memory-growth callback and the bench scripts."""
from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)
MB = 2**20


def _proc_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    kb = _proc_status_kb("VmRSS")
    return 0 if kb is None else kb * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                                "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def heap_bytes() -> int | None:
    """Bytes malloc has handed out and not had back (glibc's ``mallinfo2``: in-use heap chunks plus mmapped
    blocks; where torch's CPU tensors live), or None off glibc. Unlike resident memory it does not stay flat
    while a leak reuses memory freed earlier, nor move with the allocator's caching."""
    if _MALLINFO2 is None:
        return None
    m = _MALLINFO2()
    return m.uordblks + m.hblkhd


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) in MiB since start or :func:`reset_peak_rss` (NaN off Linux)."""
    kb = _proc_status_kb("VmHWM")
    return float("nan") if kb is None else kb / 1024


def reset_peak_rss() -> None:
    """Reset the peak resident memory (VmHWM) to the current one (Linux; a no-op elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def share_cores_in_parallel_sweeps() -> int | None:
    """In a ``hydra/launcher=joblib`` multirun, give this job its share of the cores: ``cpu_count // n_jobs``
    torch (intra-op and OpenMP) threads, at least 1. Several torch processes that each take every core slow each
    other down many times over on a small machine (spinning OpenMP threads fight for the same cores), far more
    than running them one after another. Returns the threads set, or None outside such a sweep."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    launcher = hc.get("launcher") or {}
    if not str(hc.get("mode")).endswith("MULTIRUN") or "joblib" not in str(launcher.get("_target_", "")).lower():
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n_jobs = int(launcher.get("n_jobs") or -1)
    n_jobs = cores + 1 + n_jobs if n_jobs < 0 else n_jobs  # joblib: -1 = all cores, -2 = all but one, ...
    threads = max(1, cores // max(1, n_jobs))
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)  # for processes it starts
    log.info("parallel sweep: %d jobs at a time on %d cores -> %d torch thread(s) for this job", n_jobs, cores, threads)
    return threads
