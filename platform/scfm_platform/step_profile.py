"""Where a training step's time goes: device kernels (or CPU ops) grouped into a few categories.

    rows = profile_step(step, steps=2, device=torch.device("cuda"))    # a step function, run here
    print(format_profile(rows, step_ms))

    window = StepWindow(device, after=3, steps=2)                        # inside a training loop
    window.begin(done)  ...one step...  rows = window.end(done + 1)      # rows once the window has closed

Categories are matched on the kernel or op name, first match wins (`CATEGORIES`): the sigmoid kernels' forward and
backward, softmax attention (cuDNN / flash / memory-efficient), matrix products, the optimizer, compiled fused
elementwise/reduction kernels, embedding lookups and their scatter-add backward, copies, and the rest.

Host phases: a loop that wraps its parts in `phase("name")` gets their host (CPU) wall time per step as rows of
category "host phase" (kept out of the kernel sums): where the GPU's idle time comes from when the host is behind.
The profiler's own per-op cost inflates them; compare phases with each other, not with the unprofiled step.

Idle gaps: the stretches where the device runs no kernel (on CPU: no op), grouped by the kernels on either side
(`idle_gaps`), as rows of category "idle gap" (kept out of the sums too): which hand-over leaves the GPU waiting.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

HOST = "host phase"
GAP = "idle gap"
_PHASE = "phase: "
_KEPT_OUT = (HOST, GAP)  # row categories that are not kernel time


def phase(name: str) -> record_function:
    """A context manager marking one part of a training step for the profile's host-phase rows."""
    return record_function(_PHASE + name)


CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.I))
    for name, pattern in (
        # scfm_kernels' own names, not as the tail of another's (SDPA flash's kernel is `flash_fwd_kernel`).
        ("attention fwd (sigmoid)", r"(?<![a-z0-9])_fwd(?:_ws)?_kernel"),
        ("attention bwd (sigmoid)", r"(?<![a-z0-9])(?:_dkdv(?:_ws)?_kernel|_dq_kernel|_dq_ds_kernel)"),
        ("attention (softmax)", r"cudnn|fmha|flash|sdpa|attention"),
        ("optimizer", r"adam|multi_tensor|foreach"),
        ("embedding", r"embedding|index_?put|index_?select|scatter|gather|radix|sort|unique"),
        ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|wgmma|aten::(?:mm|addmm|bmm|linear|matmul)\b"),
        ("fused elementwise/norm", r"^triton_|layer_norm|rms_norm|gelu|elementwise|reduce|softmax|cross_entropy"),
        ("copy/fill", r"memcpy|memset|copy|fill|cat|zero"),
    )
)


def category(name: str) -> str:
    """The category of one kernel or op name; "other" when none matches."""
    for cat, pattern in CATEGORIES:
        if pattern.search(name):
            return cat
    return "other"


def profile_step(step: Callable[[], object], steps: int, device: torch.device) -> list[dict[str, float | str]]:
    """Run `step` `steps` times under the profiler; per kernel (CUDA) or op (CPU, self time): milliseconds per
    step, calls per step and category, longest first."""
    window = StepWindow(device, after=0, steps=steps)
    rows = None
    for done in range(steps):
        window.begin(done)
        step()
        rows = window.end(done + 1)
    return rows or []


class StepWindow:
    """Profiles `steps` consecutive steps of a loop, starting once `after` steps are done (a resumed run starts at
    its first step past `after`). Call `begin(done)` before each step and `end(done)` after it, `done` counting
    finished steps; `end` returns the rows when the window closes (else None) and `step_ms` is then the mean wall
    time of a profiled step."""

    def __init__(self, device: torch.device, after: int, steps: int):
        self.device, self.after, self.steps = device, after, steps
        self.step_ms = 0.0
        self.first = -1  # steps done when profiling started
        self._prof: profile | None = None
        self._t0 = 0.0

    def begin(self, done: int) -> None:
        if self.first < 0 and self.steps > 0 and done >= self.after:
            self.first, self._t0 = done, time.perf_counter()
            self._prof = profile(activities=_activities(self.device))
            self._prof.start()

    def end(self, done: int) -> list[dict[str, float | str]] | None:
        if self._prof is None or done < self.first + self.steps:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self._prof.stop()
        self.step_ms = (time.perf_counter() - self._t0) * 1e3 / self.steps
        rows, self._prof = _rows(self._prof, self.steps, self.device), None
        return rows

    def close(self) -> None:
        """Stop a window the loop left before it closed (nothing is reported)."""
        if self._prof is not None:
            self._prof.stop()
            self._prof = None


def _activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def _rows(prof: profile, steps: int, device: torch.device) -> list[dict[str, float | str]]:
    cuda = device.type == "cuda"
    rows, host = [], []
    for ev in prof.key_averages():
        if ev.key.startswith(_PHASE):  # the CPU range; its copy on the GPU timeline spans kernels counted below
            if ev.device_type == torch.autograd.DeviceType.CPU:
                ms = ev.cpu_time_total / 1e3 / steps
                host.append({"name": ev.key[len(_PHASE) :], "ms": ms, "calls": ev.count / steps, "category": HOST})
            continue
        if cuda and ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.self_device_time_total if cuda else ev.self_cpu_time_total
        if us <= 0:
            continue
        rows.append({"name": ev.key, "ms": us / 1e3 / steps, "calls": ev.count / steps, "category": category(ev.key)})
    gaps = idle_gaps([(ev.time_range.start, ev.time_range.end, ev.key) for ev in _timeline(prof, cuda)], steps)
    return sorted(rows, key=lambda r: -r["ms"]) + host + gaps


def _timeline(prof: profile, cuda: bool) -> list:
    """The profiled kernels (CUDA) or ops (CPU); host phases and other annotated ranges (`record_function`, a
    compiled region's marker), which span idle time as well as work, left out."""
    want = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    return [
        ev
        for ev in prof.events()
        if ev.device_type == want and not getattr(ev, "is_user_annotation", False) and not ev.key.startswith(_PHASE)
    ]


def idle_gaps(
    spans: list[tuple[float, float, str]], steps: int, min_us: float = 20.0, top: int = 8
) -> list[dict[str, float | str]]:
    """The device's idle time between busy spans (start µs, end µs, name; they may overlap or nest): gaps of at
    least min_us, grouped by (the span that ended last before it, the span that starts it), the `top` groups by
    total time, as rows of category GAP: ms and count per step, named "after A -> before B". A last row "(all
    gaps)" holds every gap's total, small ones included; no spans, no rows."""
    if not spans:
        return []
    groups: dict[tuple[str, str], list[float]] = {}
    total = 0.0
    end, last = None, ""
    for start, stop, name in sorted(spans):
        if end is not None and start > end:
            total += start - end
            if start - end >= min_us:
                groups.setdefault((last, name), []).append(start - end)
        if end is None or stop >= end:
            end, last = stop, name
    out = [
        {"name": f"after {a[:50]} -> before {b[:50]}", "ms": sum(g) / 1e3 / steps, "calls": len(g) / steps,
         "category": GAP}
        for (a, b), g in groups.items()
    ]  # fmt: skip
    whole = {"name": "(all gaps)", "ms": total / 1e3 / steps, "calls": 0.0, "category": GAP}
    return [*sorted(out, key=lambda r: -r["ms"])[:top], whole]


def kernel_rows(rows: list[dict[str, float | str]]) -> list[dict[str, float | str]]:
    """The kernel (CPU: op) rows of a profile, host phases and idle gaps left out, in their order (longest first)."""
    return [r for r in rows if r["category"] not in _KEPT_OUT]


def by_category(rows: list[dict[str, float | str]]) -> dict[str, float]:
    """Milliseconds per step per kernel category, largest first (host phases and idle gaps left out)."""
    out: dict[str, float] = {}
    for r in kernel_rows(rows):
        out[str(r["category"])] = out.get(str(r["category"]), 0.0) + float(r["ms"])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def format_profile(rows: list[dict[str, float | str]], step_ms: float, top: int = 12) -> str:
    """A table of categories (ms per step, share of the timed step), the `top` longest kernels, the longest idle
    gaps between kernels and, when the loop marked them, its host phases (CPU wall ms per step)."""
    kernels = kernel_rows(rows)
    lines = [f"{'category':<26} {'ms/step':>9} {'% step':>7}"]
    for cat, ms in by_category(kernels).items():
        lines.append(f"{cat:<26} {ms:9.2f} {100 * ms / step_ms:6.1f}%")
    busy = sum(float(r["ms"]) for r in kernels)
    lines.append(f"{'(sum; idle = step - sum)':<26} {busy:9.2f} {100 * busy / step_ms:6.1f}%")
    lines.append("")
    lines.append(f"{'ms/step':>9} {'calls':>6}  kernel")
    for r in kernels[:top]:
        lines.append(f"{float(r['ms']):9.2f} {float(r['calls']):6.0f}  {str(r['name'])[:110]}")
    gaps = [r for r in rows if r["category"] == GAP]
    if gaps:
        lines += ["", f"{'idle ms/step':>12} {'count':>6}  gap (the device runs nothing)"]
        lines += [f"{float(r['ms']):12.2f} {float(r['calls']):6.1f}  {str(r['name'])[:110]}" for r in gaps]
    host = [r for r in rows if r["category"] == HOST]
    if host:
        lines += ["", f"{'host ms/step':>12}  phase (CPU wall time, profiler overhead included)"]
        lines += [f"{float(r['ms']):12.2f}  {r['name']}" for r in host]
    return "\n".join(lines)
