"""The trainer bench's precision modes: the fp32-master AdamW of its bf16 mode, and a CPU run of the script."""

from __future__ import annotations

import json

import torch

from scfm_platform import bench


def test_master_weight_adamw_steps_fp32_masters_and_rounds_into_bf16_params():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape).to(torch.bfloat16)) for shape in ((5, 3), (7,))]
    ref = [torch.nn.Parameter(p.detach().float()) for p in params]  # the masters start from the bf16 values
    adamw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05)
    opt, ref_opt = bench.MasterWeightAdamW(params, **adamw), torch.optim.AdamW(ref, **adamw)
    for _ in range(3):
        for p, r in zip(params, ref):
            g = torch.randn(p.shape).to(torch.bfloat16)
            p.grad, r.grad = g, g.float()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        for p, r, m in zip(params, ref, opt.masters):
            assert p.grad is None and p.dtype == torch.bfloat16
            torch.testing.assert_close(m, r.detach(), rtol=0, atol=0)  # fp32 state, not bf16-rounded
            torch.testing.assert_close(p.detach(), r.detach().to(torch.bfloat16), rtol=0, atol=0)
    assert any((m - m.to(torch.bfloat16).float()).abs().max() > 0 for m in opt.masters)


def test_bench_runs_both_precisions_on_cpu(tmp_path):
    results = {}
    for precision in ("bf16", "amp"):
        out = tmp_path / f"{precision}.json"
        argv = ["--device", "cpu", "--preset", "tiny", "--seq-len", "64", "--cells", "2", "--genes", "200"]
        argv += ["--steps", "2", "--warmup", "1", "--backends", "sigmoid", "--precision", precision, "--json", str(out)]
        assert bench.main(argv) == 0
        (row,) = json.loads(out.read_text())["results"]
        assert "error" not in row, row
        assert row["step_s"] > 0 and 0 < row["mfu"] < 1 and torch.isfinite(torch.tensor(row["loss"]))
        results[precision] = row
    assert results["bf16"]["params"] == results["amp"]["params"]
