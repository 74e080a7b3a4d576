"""The trainer bench's step profile: kernel names land in the right category, and --profile on CPU reports them."""

from __future__ import annotations

import json
import time

import pytest

from scfm_platform import bench
from scfm_platform.step_profile import by_category, category


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("_fwd_kernel", "attention fwd (sigmoid)"),
        ("_fwd_ws_kernel", "attention fwd (sigmoid)"),
        (
            "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false>>",
            "attention (softmax)",
        ),
        (
            "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>",
            "attention (softmax)",
        ),
        ("_dkdv_kernel", "attention bwd (sigmoid)"),
        ("_dkdv_ws_kernel", "attention bwd (sigmoid)"),
        ("_dq_kernel", "attention bwd (sigmoid)"),
        ("_dq_ds_kernel", "attention bwd (sigmoid)"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_128x128x128_4x1x1", "attention (softmax)"),
        ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT", "matmul"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "matmul"),
        ("void at::native::(anonymous namespace)::fused_adamw_kernel<float>", "optimizer"),
        ("triton_red_fused_native_layer_norm_0", "fused elementwise/norm"),
        ("void at::native::indexSelectLargeIndex<float, long>", "embedding"),
        ("aten::addmm", "matmul"),
        ("Memcpy DtoD (Device -> Device)", "copy/fill"),
        ("some_unknown_kernel", "other"),
    ],
)
def test_category(name, expected):
    assert category(name) == expected


def test_by_category_sums_and_orders():
    rows = [
        {"name": "a", "ms": 1.0, "calls": 1, "category": "matmul"},
        {"name": "b", "ms": 3.0, "calls": 1, "category": "other"},
        {"name": "c", "ms": 0.5, "calls": 1, "category": "matmul"},
    ]
    assert list(by_category(rows).items()) == [("other", 3.0), ("matmul", 1.5)]


def test_bench_profile_on_cpu(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--preset", "tiny", "--seq-len", "64", "--cells", "2", "--genes", "200"]
    argv += ["--steps", "1", "--warmup", "1", "--backends", "sigmoid", "--profile", "--json", str(out)]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())["results"][0]
    assert res["backend"] == "sigmoid" and "error" not in res
    prof = res["profile_ms"]
    assert prof.get("matmul", 0) > 0 and sum(prof.values()) > 0
    assert "category" in capsys.readouterr().out


def test_step_window_profiles_the_steps_after_the_skip():
    import torch

    from scfm_platform.step_profile import StepWindow

    a = torch.randn(64, 64)
    window = StepWindow(torch.device("cpu"), after=2, steps=2)
    got = []
    for done in range(6):  # done: steps finished before this one
        window.begin(done)
        a = a @ a.T / 64
        rows = window.end(done + 1)
        got.append(rows is not None)
    assert got == [False, False, False, True, False, False]  # closes after steps 3 and 4, once
    assert window.first == 2 and window.step_ms > 0


def test_step_window_on_a_resumed_run_starts_at_its_first_step():
    import torch

    from scfm_platform.step_profile import StepWindow

    window = StepWindow(torch.device("cpu"), after=2, steps=1)
    window.begin(10)
    torch.randn(32, 32) @ torch.randn(32, 32)
    rows = window.end(11)
    assert window.first == 10 and rows and any(r["category"] == "matmul" for r in rows)
    window.close()  # already closed: nothing to do


def test_host_phases_are_rows_of_their_own_and_stay_out_of_the_kernel_sums():
    import torch

    from scfm_platform.step_profile import HOST, StepWindow, format_profile, phase

    a = torch.randn(96, 96)
    window = StepWindow(torch.device("cpu"), after=0, steps=2)
    rows = None
    for done in range(2):
        window.begin(done)
        with phase("products"):
            a = a @ a.T / 96
        with phase("sleep"):
            time.sleep(0.02)
        rows = window.end(done + 1)
    host = {r["name"]: r for r in rows if r["category"] == HOST}
    assert set(host) == {"products", "sleep"} and host["sleep"]["ms"] >= 19 and host["products"]["calls"] == 1
    assert HOST not in by_category(rows) and by_category(rows).get("matmul", 0) > 0
    text = format_profile(rows, window.step_ms)
    assert "phase (CPU wall time" in text
    assert any(line.strip().endswith("sleep") for line in text.splitlines())


def test_idle_gaps_group_the_device_idle_time_by_the_kernels_around_it():
    from scfm_platform.step_profile import GAP, idle_gaps

    spans = [
        (0, 100, "a"), (10, 50, "nested"),  # nested inside a: no gap
        (130, 200, "b"),  # 30 µs after a
        (205, 300, "a"),  # 5 µs: counted in the total only
        (290, 320, "c"),  # overlaps: no gap
        (420, 500, "b"),  # 100 µs after c
        (530, 600, "b"),  # 30 µs after b
    ]  # fmt: skip
    rows = idle_gaps(spans, steps=2, min_us=20)
    assert all(r["category"] == GAP for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["after c -> before b"]["ms"] == 100 / 1e3 / 2
    assert by_name["after a -> before b"]["ms"] == 30 / 1e3 / 2
    assert by_name["after b -> before b"]["calls"] == 0.5
    assert rows[0]["name"] == "after c -> before b"  # the longest group first
    assert by_name["(all gaps)"]["ms"] == (30 + 5 + 100 + 30) / 1e3 / 2
    assert idle_gaps([], steps=1) == []


def test_the_profile_reports_idle_gaps_between_ops_and_keeps_them_out_of_the_sums():
    import torch

    from scfm_platform.step_profile import GAP, StepWindow, format_profile

    a = torch.randn(128, 128)
    window = StepWindow(torch.device("cpu"), after=0, steps=1)
    window.begin(0)
    a = a @ a.T
    time.sleep(0.03)  # no op runs: a gap of ≥ 30 ms between the two products
    a = a @ a.T
    rows = window.end(1)
    gaps = {r["name"]: r for r in rows if r["category"] == GAP}
    assert gaps["(all gaps)"]["ms"] >= 29
    assert max(r["ms"] for name, r in gaps.items() if name != "(all gaps)") >= 29
    assert GAP not in by_category(rows)
    assert "gap (the device runs nothing)" in format_profile(rows, window.step_ms)


def test_an_annotated_range_does_not_hide_an_idle_gap():
    import torch
    from torch.profiler import record_function

    from scfm_platform.step_profile import GAP, StepWindow

    a = torch.randn(128, 128)
    window = StepWindow(torch.device("cpu"), after=0, steps=1)
    window.begin(0)
    with record_function("a compiled region"):
        a = a @ a.T
        time.sleep(0.03)
        a = a @ a.T
    rows = window.end(1)
    assert next(r["ms"] for r in rows if r["category"] == GAP and r["name"] == "(all gaps)") >= 29
