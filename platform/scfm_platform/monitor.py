"""Per-step bookkeeping on each worker: step timing, data-wait fraction, peak memory, and the divergence guard."""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from collections import deque

import torch

GIB = 2**30


class StepTimer:
    """Wall time of each step and how much of it went to waiting for the next batch."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.wait = 0.0

    def data_ready(self, t_asked: float) -> None:
        """Call when a batch arrives, with the time it was asked for."""
        self.wait += time.perf_counter() - t_asked

    def lap(self) -> tuple[float, float]:
        """(step seconds, fraction of them spent waiting for data); starts the next step."""
        now = time.perf_counter()
        dt, wait = max(now - self.last, 1e-9), self.wait
        self.last, self.wait = now, 0.0
        return dt, min(1.0, wait / dt)


class DivergenceGuard:
    """Stop on a non-finite loss or grad norm, or on a grad norm above `factor` × the median of the last 100
    normal steps for `patience` steps in a row. A shorter burst of spikes is let through (the optimizer step is
    taken, clipped if clipping is on) and kept out of the median; `spikes` counts them."""

    def __init__(self, factor: float, warmup: int = 10, window: int = 100, patience: int = 1):
        self.factor, self.warmup, self.patience = factor, warmup, max(1, patience)
        self.history: deque[float] = deque(maxlen=window)
        self.streak = 0  # consecutive steps above the threshold
        self.spikes = 0  # such steps let through so far

    def check(self, loss: float, grad_norm: float) -> str | None:
        """None if the step may go on, else the reason to stop (one line)."""
        if not math.isfinite(loss):
            return f"loss is {loss}"
        if not math.isfinite(grad_norm):
            return f"grad norm is {grad_norm}"
        if len(self.history) >= self.warmup:
            median = statistics.median(self.history)
            if grad_norm > self.factor * median:
                self.streak += 1
                if self.streak >= self.patience:
                    run = f" for {self.streak} steps in a row" if self.patience > 1 else ""
                    return f"grad norm {grad_norm:.3g} exceeds {self.factor:g} x running median {median:.3g}{run}"
                self.spikes += 1
                return None
        self.streak = 0
        self.history.append(grad_norm)
        return None


def peak_memory_bytes(device: torch.device) -> int:
    """This rank's peak memory so far: `torch.cuda.max_memory_allocated` on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
