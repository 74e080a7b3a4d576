"""Sigmoid attention kernels on a CUDA GPU at realistic sizes, against a float64 oracle on the same GPU.

Shape key: B batch, T padded length, N packed tokens, H/K query/key heads, D head dim.
"""

from __future__ import annotations

import pytest
import torch

import scfm_kernels as sk
from scfm_kernels import _common

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in the kernel's result: some element was never written"
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


def _rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device="cuda").requires_grad_()


def _run(B, T, H, K, D, dtype, seq_lens):
    q, k, v = _rand(B, T, H, D, dtype=dtype), _rand(B, T, K, D, dtype=dtype), _rand(B, T, K, D, dtype=dtype)
    out = sk.sigmoid_attention(q, k, v, seq_lens)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sk.sigmoid_attention_reference(q64, k64, v64, seq_lens)
    refs = (ref, *torch.autograd.grad(ref, (q64, k64, v64), go.double()))
    return (q, k, v, go), (out, *grads), refs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("B", "T", "H", "K", "D"),
    [(2, 2048, 4, 4, 128), (2, 1536, 4, 2, 64), (2, 1000, 4, 1, 80), (1, 1024, 2, 2, 256), (2, 777, 2, 1, 48)],
)
def test_padded_matches_float64(B, T, H, K, D, dtype):
    lens = torch.randint(1, T + 1, (B,), device="cuda", dtype=torch.int32)
    lens[0] = T
    if B > 1:
        lens[1] = 1 if D != 128 else T // 2 + 3
    _, got, want = _run(B, T, H, K, D, dtype, lens)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        err = _relerr(g, w)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} ({dtype}, D={D}, T={T})"
    for b, n in enumerate(lens.tolist()):
        for name, t in zip(("out", "dq", "dk", "dv"), got):
            assert torch.all(t[b, n:] == 0), f"{name}[{b}, {n}:] (padding) is not exactly 0"


def test_every_forward_launch_of_the_autotuner_list_is_correct():
    """Each forward config the autotuner may pick (two- and one-warp-group tiles, 256-row tiles) at D=128."""
    from scfm_kernels._fwd import _fwd_configs, attention_forward

    B, T, H, D = 3, 2048, 4, 128
    lens = torch.tensor([T, 1, 1000], device="cuda", dtype=torch.int32)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = sk.sigmoid_attention_reference(q.double(), k.double(), v.double(), lens)
    for c in _fwd_configs():
        cfg = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        out = attention_forward(q, k, v, lens, -torch.log(lens.float()), D**-0.5, False, T, config=cfg)
        err = _relerr(out, ref)
        assert err < TOL[torch.bfloat16], f"{cfg}: relative error {err:.2e}"
        for b, n in enumerate(lens.tolist()):
            assert torch.all(out[b, n:] == 0), f"{cfg}: out[{b}, {n}:] (padding) is not exactly 0"


@pytest.mark.parametrize("D", [64, 128])
def test_every_warp_specialized_forward_launch_is_correct(D):
    """Each launch of the warp-specialized forward's list (three consumers, 64 or 128 keys per stage), padded
    with GQA and lengths T, 1 and T/2 + 3, and packed; it must also be what runs by default."""
    from scfm_kernels import _fwd_ws
    from scfm_kernels._fwd import attention_forward

    B, T, H, K = 3, 2048, 4, 2
    lens = torch.tensor([T, 1, T // 2 + 3], device="cuda", dtype=torch.int32)
    q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, T, K, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ref = sk.sigmoid_attention_reference(q.double(), k.double(), v.double(), lens)
    cu = torch.tensor([0, 700, 701, 701, 2000], device="cuda", dtype=torch.int32)  # with an empty sequence
    qp, kp, vp = (t[0, :2000].contiguous() for t in (q, k, v))
    ref_p = sk.sigmoid_attention_varlen_reference(qp.double(), kp.double(), vp.double(), cu, 1299)
    bias_p = -torch.log((cu[1:] - cu[:-1]).clamp(min=1).float())
    assert _fwd_ws.supported(q, True), "the warp-specialized forward should serve bf16 at this head dim"
    for cfg in _fwd_ws.fwd_ws_configs(D):
        cfg = dict(cfg, KERNEL="ws")
        out = attention_forward(q, k, v, lens, -torch.log(lens.float()), D**-0.5, False, T, config=cfg)
        err = _relerr(out, ref)
        assert err < TOL[torch.bfloat16], f"{cfg}: relative error {err:.2e}"
        for b, n in enumerate(lens.tolist()):
            assert torch.all(out[b, n:] == 0), f"{cfg}: out[{b}, {n}:] (padding) is not exactly 0"
        out_p = attention_forward(qp, kp, vp, cu, bias_p, D**-0.5, True, 1299, config=cfg)
        err = _relerr(out_p, ref_p)
        assert err < TOL[torch.bfloat16], f"{cfg}, packed: relative error {err:.2e}"


@pytest.mark.parametrize("nsm", [5, 7, 16, 40])
def test_tail_split_forward_is_correct_and_deterministic(nsm, monkeypatch):
    """The warp-specialized forward with its last wave split over the keys (`_split`), the multiprocessor count it
    plans for set low so that 2, 3 or 4 parts occur (40: three): padded with GQA and packed, against float64 and
    against the same launch unsplit; bitwise the same on a second run."""
    from scfm_kernels import _fwd_ws, _split
    from scfm_kernels._fwd import attention_forward

    monkeypatch.setattr(_split, "num_sms", lambda device: nsm)
    B, T, H, K = 3, 1500, 4, 2
    lens = torch.tensor([T, 1, 700], device="cuda", dtype=torch.int32)
    cu = torch.tensor([0, 700, 701, 701, 1400], device="cuda", dtype=torch.int32)
    for D in (64, 128):
        q = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, T, K, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ref = sk.sigmoid_attention_reference(q.double(), k.double(), v.double(), lens)
        qp, kp, vp = (t[0, :1400].contiguous() for t in (q, k, v))
        ref_p = sk.sigmoid_attention_varlen_reference(qp.double(), kp.double(), vp.double(), cu, 700)
        bias, bias_p = -torch.log(lens.float()), -torch.log((cu[1:] - cu[:-1]).clamp(min=1).float())
        for cfg in _fwd_ws.fwd_ws_configs(D):
            split, whole = dict(cfg, KERNEL="ws", SPLIT=1), dict(cfg, KERNEL="ws", SPLIT=0)
            out = attention_forward(q, k, v, lens, bias, D**-0.5, False, T, config=split)
            err = _relerr(out, ref)
            assert err < TOL[torch.bfloat16], f"D={D} {cfg} nsm={nsm}: relative error {err:.2e}"
            for b, n in enumerate(lens.tolist()):
                assert torch.all(out[b, n:] == 0), f"D={D} {cfg} nsm={nsm}: out[{b}, {n}:] is not exactly 0"
            assert torch.equal(out, attention_forward(q, k, v, lens, bias, D**-0.5, False, T, config=split))
            unsplit = attention_forward(q, k, v, lens, bias, D**-0.5, False, T, config=whole)
            assert _relerr(out, unsplit.double()) < 4e-3, f"D={D} {cfg} nsm={nsm}: split and whole differ"
            out_p = attention_forward(qp, kp, vp, cu, bias_p, D**-0.5, True, 700, config=split)
            err = _relerr(out_p, ref_p)
            assert err < TOL[torch.bfloat16], f"D={D} {cfg} nsm={nsm}, packed: relative error {err:.2e}"


@pytest.mark.parametrize("nsm", [5, 7, 16, 40])
def test_tail_split_backward_is_correct_and_deterministic(nsm, monkeypatch):
    """The planned dK/dV launch (`_bwd._dkdv_plan`: its last round of key blocks split over the queries, the
    multiprocessor count it plans for set low so that splits occur), warp-specialized, padded with GQA and packed:
    all three gradients against float64 and against the 2-D grid, padding rows exactly 0, bitwise the same on a
    second run."""
    from scfm_kernels import _bwd, _split
    from scfm_kernels._bwd import attention_backward

    monkeypatch.setattr(_split, "num_sms", lambda device: nsm)
    monkeypatch.setattr(_bwd, "BWD_PLAN", True)
    B, T, H, K = 3, 1500, 4, 2
    # Lengths at which the plan splits some key blocks at every nsm here (2 / 3 / 4 / 12 at 5 / 7 / 16 / 40; with a
    # 1-token sequence in place of the 1000 it would split none at 5 and 40).
    lens = torch.tensor([T, 700, 1000], device="cuda", dtype=torch.int32)
    cu = torch.tensor([0, 700, 701, 701, 1400], device="cuda", dtype=torch.int32)
    splits = 0
    real_plan = _split.plan

    def spy(*args):
        nonlocal splits
        work = real_plan(*args)
        B_, H_, n_m, nsm_ = args[3]
        splits += int(work[_split.grid_size(n_m, B_, H_, nsm_) * int(_split.ROW) + 1].item() > 0)
        return work

    monkeypatch.setattr(_split, "plan", spy)
    for D in (64, 128):
        q, go = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.randn(B, T, K, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        refs = torch.autograd.grad(sk.sigmoid_attention_reference(q64, k64, v64, lens), (q64, k64, v64), go.double())
        bias = -torch.log(lens.float())
        run = lambda t=(go, q, k, v, lens, bias, D**-0.5): attention_backward(*t, False, T)  # noqa: E731
        got = run()
        assert all(torch.equal(a, b) for a, b in zip(got, run())), f"D={D} nsm={nsm}: two runs differ"
        monkeypatch.setattr(_bwd, "BWD_PLAN", False)
        whole = run()
        monkeypatch.setattr(_bwd, "BWD_PLAN", True)
        for name, t, ref, w in zip(("dq", "dk", "dv"), got, refs, whole):
            err = _relerr(t, ref)
            assert err < TOL[torch.bfloat16], f"{name} D={D} nsm={nsm}: relative error {err:.2e}"
            assert _relerr(t, w.double()) < 4e-3, f"{name} D={D} nsm={nsm}: planned and 2-D grid differ"
            for b, n in enumerate(lens.tolist()):
                assert torch.all(t[b, n:] == 0), f"{name}[{b}, {n}:] D={D} nsm={nsm} (padding) is not exactly 0"
        qp, kp, vp, gp = (t[0, :1400].contiguous() for t in (q, k, v, go))
        r64 = [t.double().requires_grad_() for t in (qp, kp, vp)]
        refs_p = torch.autograd.grad(sk.sigmoid_attention_varlen_reference(*r64, cu, 700), r64, gp.double())
        bias_p = -torch.log((cu[1:] - cu[:-1]).clamp(min=1).float())
        got_p = attention_backward(gp, qp, kp, vp, cu, bias_p, D**-0.5, True, 700)
        for name, t, ref in zip(("dq", "dk", "dv"), got_p, refs_p):
            err = _relerr(t, ref)
            assert err < TOL[torch.bfloat16], f"{name} D={D} nsm={nsm}, packed: relative error {err:.2e}"
    assert splits > 0, f"nsm={nsm}: no launch split a key block"


def _gqa_batch(D: int):
    """A GQA batch (3 sequences of lengths T, 1 and T/2 + 3 in T = 2048, 4 query and 2 key heads, bf16) and its
    float64 gradients: (T, lengths, (q, k, v, dO), (dq, dk, dv) references)."""
    B, T, H, K = 3, 2048, 4, 2
    lens = torch.tensor([T, 1, T // 2 + 3], device="cuda", dtype=torch.int32)
    q, go = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(B, T, K, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    refs = torch.autograd.grad(sk.sigmoid_attention_reference(q64, k64, v64, lens), (q64, k64, v64), go.double())
    return T, lens, (q, k, v, go), refs


@pytest.mark.parametrize("D", [64, 128])
def test_every_warp_specialized_dkdv_launch_is_correct(D):
    """The stored-dS backward with the warp-specialized dK/dV kernel (`_bwd_ws`, the default) at each launch of its
    list, with the default reciprocal step and SIG=3: GQA, lengths T, 1 and T/2 + 3, against float64; bitwise the
    same on a second run (deterministic)."""
    from scfm_kernels import _bwd_ws
    from scfm_kernels._bwd import attention_backward

    T, lens, (q, k, v, go), refs = _gqa_batch(D)
    bias = -torch.log(lens.float())
    for cfg in [dict(c, SIG=sig) for c in _bwd_ws.dkdv_ws_configs(D) for sig in (1, 3)]:
        run = lambda c=cfg: attention_backward(  # noqa: E731
            go, q, k, v, lens, bias, D**-0.5, False, T, dkdv_config=dict(c, KERNEL="ws"), dq_path="stored"
        )
        got = run()
        for name, t, ref in zip(("dq", "dk", "dv"), got, refs):
            err = _relerr(t, ref)
            assert err < TOL[torch.bfloat16], f"{name} with {cfg}: relative error {err:.2e}"
            for b, n in enumerate(lens.tolist()):
                assert torch.all(t[b, n:] == 0), f"{name}[{b}, {n}:] (padding) is not exactly 0 ({cfg})"
        again = run()
        assert all(torch.equal(a, b) for a, b in zip(got, again)), f"{cfg}: two runs differ"


@pytest.mark.parametrize("D", [64])
def test_every_one_pass_dkdv_launch_is_correct(D):
    """The one-pass backward (deterministic=False) with the warp-specialized dK/dV kernel adding dQ shares by
    bulk reduces, at each launch of its list and each in the variants ONE_PASS=3 and 4: GQA, lengths T, 1 and
    T/2 + 3 (so the second consumer of the last key tile is idle), against float64, padding rows exactly 0; packed
    (with an empty sequence) equal to padded within the reduces' rounding."""
    from scfm_kernels import _bwd_ws
    from scfm_kernels._bwd import attention_backward

    T, lens, (q, k, v, go), refs = _gqa_batch(D)
    bias = -torch.log(lens.float())
    # Packed, an empty sequence between the others: the same gradients on the valid rows.
    plens = [T, 0, 1, T // 2 + 3]
    cu = torch.tensor([0, *torch.tensor(plens).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    rows = [(0, T), (1, 1), (2, T // 2 + 3)]

    def pack(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t[b, :n] for b, n in rows])

    pb = -torch.log(torch.tensor(plens, device="cuda").float().clamp(min=1))
    # Each launch with the compiler's staged reduce (ONE_PASS 1, the default), with the kernel's own buffer (3) and
    # with the two consumers taking turns at one share over both dS tiles (4).
    for cfg in [dict(c, ONE_PASS=mode) for c in _bwd_ws.one_pass_configs(D) for mode in (1, 3, 4)]:
        c = dict(cfg, KERNEL="ws")
        got = attention_backward(go, q, k, v, lens, bias, D**-0.5, False, T, dkdv_config=c, dq_path="one_pass")
        for name, t, ref in zip(("dq", "dk", "dv"), got, refs):
            err = _relerr(t, ref)
            assert err < TOL[torch.bfloat16], f"{name} with {cfg}: relative error {err:.2e}"
            for b, n in enumerate(lens.tolist()):
                assert torch.all(t[b, n:] == 0), f"{name}[{b}, {n}:] (padding) is not exactly 0 ({cfg})"
        got_p = attention_backward(
            pack(go), pack(q), pack(k), pack(v), cu, pb, D**-0.5, True, T, dkdv_config=c, dq_path="one_pass"
        )
        for name, t, ref in zip(("dq", "dk", "dv"), got_p, got):
            err = _relerr(t, pack(ref).double())
            assert err < 1e-2, f"{name} with {cfg}, packed against padded: relative difference {err:.2e}"


def test_every_backward_launch_of_the_autotuner_lists_is_correct():
    """Each dK/dV, dQ and dQ-from-dS config the autotuners may pick, with GQA and padding: the stored-dS path
    (dK/dV configs with the first dQ-from-dS config and the other way round, one (batch, key head) pair per launch
    for the first pairing) and the recompute path (each dQ config)."""
    from scfm_kernels._bwd import _dkdv_configs, _dq_configs, _dq_ds_configs, attention_backward

    B, T, H, K, D = 3, 2048, 4, 2, 128
    lens = torch.tensor([T, 1, 1000], device="cuda", dtype=torch.int32)
    q, go = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(B, T, K, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    out = sk.sigmoid_attention_reference(q64, k64, v64, lens)
    refs = torch.autograd.grad(out, (q64, k64, v64), go.double())

    def launches(configs):
        return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in configs]

    dkdv, dq, dq_ds = launches(_dkdv_configs()), launches(_dq_configs()), launches(_dq_ds_configs())
    runs = [(c, dq_ds[0], "stored") for c in dkdv] + [(dkdv[0], c, "stored") for c in dq_ds[1:]]
    runs += [(dkdv[0], c, "recompute") for c in dq]
    for i, (dkdv_cfg, dq_cfg, path) in enumerate(runs):
        budget = "16" if i == 0 else None  # 16 MiB: one pair (2 heads x 2048^2 x 2 bytes) per launch
        with pytest.MonkeyPatch.context() as mp:
            if budget:
                mp.setenv("SCFM_KERNELS_DS_SCRATCH_MIB", budget)
            got = attention_backward(
                go, q, k, v, lens, -torch.log(lens.float()), D**-0.5, False, T,
                dkdv_config=dkdv_cfg, dq_config=dq_cfg, dq_path=path,
            )  # fmt: skip
        what = f"{path}: dkdv {dkdv_cfg}, dq {dq_cfg}"
        for name, t, ref in zip(("dq", "dk", "dv"), got, refs):
            err = _relerr(t, ref)
            assert err < TOL[torch.bfloat16], f"{name} with {what}: relative error {err:.2e}"
            for b, n in enumerate(lens.tolist()):
                assert torch.all(t[b, n:] == 0), f"{name}[{b}, {n}:] (padding) is not exactly 0 ({what})"


def test_stored_and_recomputed_dq_agree_under_the_autotuner(monkeypatch):
    """The default (stored dS, autotuned, bounded scratch) against the recompute path: same dQ to bf16 rounding."""
    from scfm_kernels import _bwd

    monkeypatch.setattr(_bwd, "AUTOTUNE", True)
    _bwd._dkdv_tuned.cache.clear()  # tune again with every config, not with an earlier test's pick
    _bwd._dq_ds_tuned.cache.clear()
    monkeypatch.setenv("SCFM_KERNELS_DS_SCRATCH_MIB", "40")  # 40 MiB: 2 of the 6 pairs per launch
    made = []

    def recording(shape, dtype, device):
        made.append(tuple(shape))
        return _common.new_output(shape, dtype, device)

    monkeypatch.setattr(_bwd, "new_output", recording)
    B, T, H, K, D = 3, 2048, 4, 2, 128
    lens = torch.tensor([T, 700, 1500], device="cuda", dtype=torch.int32)
    q, go = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(B, T, K, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    args = (go, q, k, v, lens, -torch.log(lens.float()), D**-0.5, False, T)
    stored = _bwd.attention_backward(*args)
    assert [m for m in made if len(m) == 3] == [(4, 2048, 2048)]  # the default took the stored path, 2 pairs x 2
    recomputed = _bwd.attention_backward(*args, dq_path="recompute")
    for name, a, b in zip(("dq", "dk", "dv"), stored, recomputed):
        err = _relerr(a, b.double())
        assert err < 1e-2, f"{name}: stored vs recompute relative difference {err:.2e}"


@pytest.mark.parametrize(
    ("T", "H", "K", "D", "autotune"),
    [
        (2048, 4, 4, 128, False),
        (1536, 4, 2, 64, False),
        (1000, 4, 1, 80, False),
        (2048, 4, 2, 128, True),
        (2048, 4, 2, 64, True),
    ],
)
def test_one_pass_backward_matches_float64(T, H, K, D, autotune, monkeypatch):
    """deterministic=False: dQ summed with bulk reduces inside the dK/dV kernel (the Triton one; the
    warp-specialized one at D = 64). With the autotuner on, every config it times adds into the same dQ
    buffer: the buffer must be reset before each timing launch."""
    from scfm_kernels import _bwd, _bwd_ws, _common

    if autotune:
        monkeypatch.setattr(_bwd, "AUTOTUNE", True)
        monkeypatch.setattr(_common, "AUTOTUNE", True)
        _bwd._dkdv_tuned.cache.clear()
        if _bwd_ws._tuned_1p is not None:
            _bwd_ws._tuned_1p.cache.clear()
    lens = torch.tensor([T, 1, T // 2 + 3], device="cuda", dtype=torch.int32)
    q, k, v = (
        _rand(3, T, H, D, dtype=torch.bfloat16),
        _rand(3, T, K, D, dtype=torch.bfloat16),
        _rand(3, T, K, D, dtype=torch.bfloat16),
    )
    out = sk.sigmoid_attention(q, k, v, lens, deterministic=False)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sk.sigmoid_attention_reference(q64, k64, v64, lens)
    want = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        err = _relerr(g, w)
        assert err < TOL[torch.bfloat16], f"{name}: relative error {err:.2e} (one pass, D={D}, T={T})"
    for b, n in enumerate(lens.tolist()):
        for name, t in zip(("dq", "dk", "dv"), got):
            assert torch.all(t[b, n:] == 0), f"{name}[{b}, {n}:] (padding) is not exactly 0"


def test_float32_dense():
    _, got, want = _run(1, 512, 2, 1, 64, torch.float32, None)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert _relerr(g, w) < TOL[torch.float32], name


def test_backward_is_deterministic():
    B, T, H, K, D = 2, 1024, 4, 2, 128
    lens = torch.tensor([T, 600], device="cuda", dtype=torch.int32)
    q, k, v = (
        _rand(B, T, H, D, dtype=torch.bfloat16),
        _rand(B, T, K, D, dtype=torch.bfloat16),
        _rand(B, T, K, D, dtype=torch.bfloat16),
    )
    go = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    first = torch.autograd.grad(sk.sigmoid_attention(q, k, v, lens), (q, k, v), go)
    for _ in range(3):
        again = torch.autograd.grad(sk.sigmoid_attention(q, k, v, lens), (q, k, v), go)
        for a, b in zip(first, again):
            assert torch.equal(a, b), "backward differs between identical runs"


def test_varlen_equals_padded():
    T, H, K, D = 1024, 4, 2, 128
    lens = torch.tensor([T, 1, 517, 0, 900], dtype=torch.int32, device="cuda")
    B = lens.numel()
    cu = torch.zeros(B + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(lens, 0)
    N = int(cu[-1])
    dt = torch.bfloat16
    q, k, v = _rand(N, H, D, dtype=dt), _rand(N, K, D, dtype=dt), _rand(N, K, D, dtype=dt)
    out = sk.sigmoid_attention_varlen(q, k, v, cu, T)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)

    def pad(x_N):
        x_BT = x_N.new_zeros(B, T, *x_N.shape[1:])
        for b in range(B):
            x_BT[b, : lens[b]] = x_N[cu[b] : cu[b + 1]]
        return x_BT

    qp, kp, vp = (pad(t.detach()).requires_grad_() for t in (q, k, v))
    out_p = sk.sigmoid_attention(qp, kp, vp, lens)
    grads_p = torch.autograd.grad(out_p, (qp, kp, vp), pad(go))
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_p, *grads_p)):
        assert _relerr(pad(a), b.double()) < 5e-3, f"varlen {name} differs from padded"


def test_torch_compile_inductor_no_graph_break():
    B, T, H, D = 2, 512, 4, 64
    lens = torch.tensor([T, 300], device="cuda", dtype=torch.int32)
    q, k, v = (_rand(B, T, H, D, dtype=torch.bfloat16) for _ in range(3))

    def loss(q, k, v):
        return (sk.sigmoid_attention(q, k, v, lens).float() ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for g, w in zip(got, want):
        assert _relerr(g, w.double()) < 1e-3


def test_saturated_logits_give_zero_or_one_weights_not_nan():
    """Logits far past ±120 (scale 40): the clamp keeps every weight finite, and P(1 − P) = P·(e·P) accurate."""
    B, T, H, D = 2, 1024, 4, 64
    lens = torch.tensor([T, 700], device="cuda", dtype=torch.int32)
    q, k, v = (_rand(B, T, H, D, dtype=torch.bfloat16) for _ in range(3))
    out = sk.sigmoid_attention(q, k, v, lens, scale=40.0)
    go = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), go))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sk.sigmoid_attention_reference(q64, k64, v64, lens, scale=40.0)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), go.double()))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(a).all(), f"{name}: non-finite values at saturated logits"
        err = _relerr(a, b)
        assert err < TOL[torch.bfloat16], f"{name}: relative error {err:.2e} at saturated logits"
