"""The trainer bench's step profile: kernel names land in the right category, and --profile on CPU reports them."""

from __future__ import annotations

import json

import pytest

from scfm_platform import bench
from scfm_platform.step_profile import by_category, category


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("_fwd_kernel", "attention fwd (sigmoid)"),
        ("_dkdv_kernel", "attention bwd (sigmoid)"),
        ("_dq_kernel", "attention bwd (sigmoid)"),
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
