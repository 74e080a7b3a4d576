"""The forward's schedule tool (tests/gpu/trace_fwd_ws.py) on a made-up schedule, and `_fwd_ws.trace`'s checks of
its buffer. The stamps themselves are written on the GPU only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from scfm_kernels import _fwd_ws

_TOOL = Path(__file__).resolve().parents[1] / "gpu" / "trace_fwd_ws.py"


def _tool():
    spec = importlib.util.spec_from_file_location("trace_fwd_ws", _TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _program(start_us: float, loop_us: float, sm: int, mhz: float = 1500.0) -> list[int]:
    """Stamps (ns) of a program that plans for 1 µs, waits 2 µs for its Q, loops, and ends 3 µs later."""
    t = [start_us, start_us + 1, start_us + 3 + loop_us + 3, sm, start_us + 3, start_us + 3 + loop_us]
    ns = [int(x * 1000) if i != 3 else int(x) for i, x in enumerate(t)]
    cycles = [0, int(loop_us * mhz)]
    return [*ns, *cycles]


def test_the_summary_reads_span_busy_time_phases_gaps_and_clock():
    tool = _tool()
    rows = [
        _program(10, 100, sm=0), _program(120, 100, sm=0),  # SM 0: 2 µs gap, ends at 226
        _program(10, 50, sm=1), _program(70, 50, sm=1),  # SM 1: 4 µs gap, ends at 126
    ]  # fmt: skip
    rows.append([int(130e3), int(130.5e3), int(134e3), 1, 0, 0, 0, 0])  # a tile past the end: 4 µs, no loop
    f = tool.summarize(np.array(rows, dtype=np.int64), n_sm=2)
    assert f["programs"] == 5 and f["real"] == 4 and f["sms"] == 2
    assert f["span_us"] == pytest.approx(216.0)  # 10 µs … 226 µs
    assert f["ideal_us"] == pytest.approx((106 * 2 + 56 * 2) / 2)
    assert f["plan_us"] == pytest.approx(1.0) and f["to_q_us"] == pytest.approx(3.0)
    assert f["loop_us"] == pytest.approx(75.0) and f["epilogue_us"] == pytest.approx(3.0)
    assert f["empty_us"] == pytest.approx(4.0)
    assert f["gap_per_sm_us"] == pytest.approx((4.0 + 8.0) / 2)  # SM 1: 66 → 70 and 126 → 130
    assert f["sm_idle_at_end_us"] == pytest.approx((0 + 92) / 2)
    assert f["loop_mhz"] == pytest.approx(1500.0)


def test_trace_takes_only_an_int64_gpu_buffer():
    with pytest.raises(ValueError, match=r"int64 CUDA buffer, got torch.float32 on cpu"), _fwd_ws.trace(torch.zeros(8)):
        pass
    assert _fwd_ws._trace_buffer is None
