"""Named, timed stages: every defense stage records wall seconds and peak memory."""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time

import torch

log = logging.getLogger("bench")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class StageTimer:
    """Collects ``{stage: seconds}`` and the peak memory seen at the end of each stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.peak_mem_mb = 0.0

    @contextlib.contextmanager
    def __call__(self, name: str):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                mem = torch.cuda.max_memory_allocated(self.device) / 2**20
            else:
                mem = peak_rss_mb()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.peak_mem_mb = max(self.peak_mem_mb, mem)
            log.info("stage %s done in %.1fs", name, self.seconds[name])
