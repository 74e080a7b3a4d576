"""Sigmoid attention kernels under Triton's CPU interpreter (TRITON_INTERPRET=1), against a float64 oracle.

Every run draws fresh random inputs and poisons the kernels' outputs with NaN first, so an unwritten row
fails the comparison. Shape key: B batch, T padded length, N packed tokens, H/K query/key heads, D head dim.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

import scfm_kernels as sk
from scfm_kernels import _common, _op
from scfm_kernels._tile import sigmoid_parts

interpret_only = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the Triton kernels on CPU: set TRITON_INTERPRET=1 (the Makefile does)",
)

# Relative Frobenius error allowed against the float64 oracle, per input dtype.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _poison_and_forbid_fallback(monkeypatch):
    monkeypatch.setattr(_common, "POISON_OUTPUTS", True)

    def _no_fallback(*args, **kwargs):
        raise AssertionError("the public function fell back to the eager reference instead of the kernels")

    monkeypatch.setattr(_op, "sigmoid_attention_reference", _no_fallback)
    monkeypatch.setattr(_op, "sigmoid_attention_varlen_reference", _no_fallback)


def _rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def _lens(B: int, T: int, extra: tuple[int, ...] = (1,)) -> torch.Tensor:
    """Random lengths in [1, T] that always include T and the values in `extra`."""
    lens = torch.randint(1, T + 1, (B,))
    fixed = torch.tensor([T, *extra])[:B]
    lens[: fixed.numel()] = fixed
    return lens[torch.randperm(B)].to(torch.int32)


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not torch.isnan(a).any(), "NaN in the kernel's result: some element was never written"
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()


def _oracle(q, k, v, seq_lens, go, deterministic=True, **kw):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out = sk.sigmoid_attention_reference(q64, k64, v64, seq_lens, **kw)
    return (out, *torch.autograd.grad(out, (q64, k64, v64), go.double()))


def _check_padded(B, T, H, K, D, dtype, seq_lens, **kw):
    q, k, v = _rand(B, T, H, D, dtype=dtype), _rand(B, T, K, D, dtype=dtype), _rand(B, T, K, D, dtype=dtype)
    out = sk.sigmoid_attention(q, k, v, seq_lens, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    want = _oracle(q, k, v, seq_lens, go, **kw)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), want):
        err = _relerr(got, ref)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e} >= {TOL[dtype]:.0e} ({dtype}, D={D})"
    if seq_lens is not None:
        for b, n in enumerate(seq_lens.tolist()):
            for name, t in zip(("out", "dq", "dk", "dv"), (out, *grads)):
                assert torch.all(t[b, n:] == 0), f"{name}[{b}, {n}:] (padding) is not exactly 0"


def _check_packed_bf16(lengths: list[int], H: int, K: int, D: int, **kw) -> None:
    """Packed bf16 sequences of these lengths (max_seqlen = the longest): output and all three gradients against
    the float64 oracle."""
    lens = torch.tensor(lengths, dtype=torch.int32)
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    N, T = int(cu[-1]), max(lengths)
    q, k, v = (_rand(N, H, D, dtype=torch.bfloat16), _rand(N, K, D, dtype=torch.bfloat16),
               _rand(N, K, D, dtype=torch.bfloat16))  # fmt: skip
    out = sk.sigmoid_attention_varlen(q, k, v, cu, T, **kw)
    go = torch.randn_like(out)
    got = (out, *torch.autograd.grad(out, (q, k, v), go))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sk.sigmoid_attention_varlen_reference(q64, k64, v64, cu, T)
    want = (ref, *torch.autograd.grad(ref, (q64, k64, v64), go.double()))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert _relerr(g, w) < TOL[torch.bfloat16], name


@interpret_only
@pytest.mark.parametrize(
    ("B", "T", "H", "K", "D", "dtype"),
    [
        (3, 48, 2, 2, 32, torch.float32),  # plain multi-head, T a multiple of the block
        (3, 37, 4, 2, 48, torch.float32),  # GQA, non-power-of-two D, ragged last block
        (2, 64, 4, 1, 64, torch.bfloat16),  # MQA in bf16
        (3, 33, 2, 2, 16, torch.float16),  # smallest D in fp16
        (2, 24, 2, 1, 80, torch.float32),  # D=80 padded to 128
    ],
)
def test_padded_forward_and_grads_match_float64(B, T, H, K, D, dtype):
    _check_padded(B, T, H, K, D, dtype, _lens(B, T))


@interpret_only
def test_dense_default_lengths_and_overrides():
    _check_padded(2, 32, 2, 1, 32, torch.float32, None)
    _check_padded(2, 40, 2, 2, 32, torch.float32, _lens(2, 40), bias=-2.0, scale=0.3)


@interpret_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_saturated_logits_give_zero_or_one_weights_not_nan(dtype):
    """Logits far past ±120 (scale 40): the reciprocal's clamp keeps 1 / (1 + 2^z) finite (weights ≈ 0 or 1)."""
    _check_padded(2, 40, 2, 1, 32, dtype, _lens(2, 40), scale=40.0)


@interpret_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fixed_descriptor_forward_launch_matches_float64(dtype):
    """A fixed launch (the benchmarks' `config`) of the descriptor key loop: lengths 0, 1, a block edge, ragged."""
    from scfm_kernels._fwd import attention_forward

    B, T, H, K, D = 5, 53, 2, 1, 32
    lens = torch.tensor([0, 1, 16, T, 29], dtype=torch.int32)
    q, k, v = (
        torch.randn(B, T, H, D, dtype=dtype),
        torch.randn(B, T, K, D, dtype=dtype),
        torch.randn(B, T, K, D, dtype=dtype),
    )
    bias = -torch.log(lens.clamp(min=1).float())
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, USE_TMA=True)
    out = attention_forward(q, k, v, lens, bias, D**-0.5, False, T, config=cfg)
    ref = sk.sigmoid_attention_reference(q.double(), k.double(), v.double(), lens.clamp(min=1))
    for b, n in enumerate(lens.tolist()):
        assert torch.all(out[b, n:] == 0), f"out[{b}, {n}:] (padding) is not exactly 0"
        if n:
            err = _relerr(out[b, :n], ref[b, :n])
            assert err < TOL[dtype], f"sequence {b} (n={n}): relative error {err:.2e} >= {TOL[dtype]:.0e}"


@interpret_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_pass_backward_matches_float64(dtype):
    """deterministic=False: dQ summed with atomics inside the dK/dV kernel (GQA, lengths 1, T and ragged)."""
    _check_padded(3, 37, 4, 2, 48, dtype, _lens(3, 37), deterministic=False)


@interpret_only
def test_one_pass_backward_packed_and_float32_fallback():
    _check_packed_bf16([1, 30, 17], 2, 1, 32, deterministic=False)
    # float32 has no tensor-descriptor path: deterministic=False falls back to the two-kernel backward.
    _check_padded(2, 20, 2, 2, 32, torch.float32, _lens(2, 20), deterministic=False)


@interpret_only
@pytest.mark.parametrize(("mib", "pairs_per_launch"), [(None, 6), ("0.07", 1), ("0", None)])
def test_backward_dq_paths_match_float64(mib, pairs_per_launch, monkeypatch):
    """The deterministic backward's dQ, bf16, D = 128, GQA, lengths 1, T and ragged: from the stored dSᵀ with every
    (batch, key head) pair in one launch (the default budget), one pair per launch (a 0.07 MiB budget holds one
    pair's 2 × 128² values), and recomputed (budget 0, no scratch buffer). The scratch buffer is poisoned with NaN
    like every output, so a dSᵀ tile read before it was written fails the comparison."""
    from scfm_kernels import _bwd

    if mib is None:
        monkeypatch.delenv("SCFM_KERNELS_DS_SCRATCH_MIB", raising=False)
    else:
        monkeypatch.setenv("SCFM_KERNELS_DS_SCRATCH_MIB", mib)
    made = []

    def recording(shape, dtype, device):
        made.append(tuple(shape))
        return _common.new_output(shape, dtype, device)

    monkeypatch.setattr(_bwd, "new_output", recording)
    _check_padded(3, 37, 4, 2, 128, torch.bfloat16, _lens(3, 37))
    scratch = [s for s in made if len(s) == 3]  # [pairs per launch x group, T_DS, T_DS]
    if pairs_per_launch is None:
        assert scratch == []
    else:
        assert scratch == [(pairs_per_launch * 2, 128, 128)]


@interpret_only
@pytest.mark.parametrize(("fits", "launches"), [(1, 6), (0, 0)])
def test_backward_scratch_out_of_memory_halves_the_pairs_then_recomputes(fits, launches, monkeypatch):
    """When the dSᵀ scratch cannot be allocated the backward still runs and matches float64: with room for one
    pair's scratch, the pairs (6: three sequences x two key heads) go one per launch; with room for none, dQ is
    recomputed (no scratch) after a warning."""
    from scfm_kernels import _bwd

    monkeypatch.delenv("SCFM_KERNELS_DS_SCRATCH_MIB", raising=False)
    monkeypatch.setattr(_bwd, "_WARNED_SCRATCH", False)
    made, launched = [], []

    def scarce(shape, dtype, device):
        if len(shape) == 3 and shape[0] > fits * 2:  # a scratch for more pairs than fit (group 2)
            raise torch.OutOfMemoryError(f"no room for {tuple(shape)}")
        made.append(tuple(shape))
        return _common.new_output(shape, dtype, device)

    real_launch = _bwd._launch

    def counting(kernel, *args):
        if kernel is _bwd._dq_ds_kernel:
            launched.append(kernel)
        return real_launch(kernel, *args)

    monkeypatch.setattr(_bwd, "new_output", scarce)
    monkeypatch.setattr(_bwd, "_launch", counting)
    if fits:
        _check_padded(3, 37, 4, 2, 128, torch.bfloat16, _lens(3, 37))
    else:
        with pytest.warns(UserWarning, match="recomputes dQ"):
            _check_padded(3, 37, 4, 2, 128, torch.bfloat16, _lens(3, 37))
    assert [s for s in made if len(s) == 3] == ([(2, 128, 128)] if fits else [])
    assert len(launched) == launches


def test_dq_path_choice_follows_hardware_determinism_and_budget(monkeypatch):
    from scfm_kernels._bwd import ds_rows, pick_dq_path

    assert ds_rows(1) == 128 and ds_rows(128) == 128 and ds_rows(8000) == 8064
    one_pair = 2 * 8064**2 * 2  # group 2, T_DS 8064, 2-byte values
    assert pick_dq_path(True, True, 2, 128, 8000, 2, 5 * one_pair) == ("stored", 5)
    assert pick_dq_path(True, True, 2, 128, 8000, 2, one_pair - 1) == ("recompute", 0)
    assert pick_dq_path(True, True, 2, 64, 8000, 2, 5 * one_pair) == ("recompute", 0)  # measured slower at 64
    assert pick_dq_path(True, True, 2, 64, 8000, 2, 5 * one_pair, ws=True) == ("stored", 5)  # not with _bwd_ws
    assert pick_dq_path(True, True, 2, 96, 8000, 2, 5 * one_pair, ws=True) == ("recompute", 0)
    assert pick_dq_path(True, False, 2, 128, 8000, 2, 5 * one_pair) == ("recompute", 0)  # no descriptors (fp32)
    assert pick_dq_path(False, True, 2, 128, 8000, 2, 5 * one_pair) == ("one_pass", 0)
    monkeypatch.setenv("SCFM_KERNELS_DS_SCRATCH_MIB", "1.5")
    assert _common.ds_scratch_bytes(torch.device("cpu")) == 3 * 2**19
    monkeypatch.setenv("SCFM_KERNELS_DS_SCRATCH_MIB", "lots")
    with pytest.raises(ValueError, match=r"SCFM_KERNELS_DS_SCRATCH_MIB='lots': expected a number of MiB"):
        _common.ds_scratch_bytes(torch.device("cpu"))


@interpret_only
def test_stored_dq_path_handles_packed_sequences(monkeypatch):
    """Packed bf16 sequences (lengths 1, T, 0, ragged), one pair per launch: varlen equals the float64 oracle."""
    monkeypatch.setenv("SCFM_KERNELS_DS_SCRATCH_MIB", "0.04")
    _check_packed_bf16([1, 30, 0, 17], 2, 2, 128)


@interpret_only
def test_stored_dq_path_with_an_understated_max_seqlen_reads_and_writes_only_its_buffer(monkeypatch):
    """Packed bf16 input whose max_seqlen (40) is under a sequence's length (70): rows past max_seqlen are dropped
    (as documented), but the dSᵀ buffer — poisoned with NaN, sized from max_seqlen — is neither overrun nor read
    where unwritten: dQ is finite, dK and dV match the recompute path, dQ matches it on the short sequence."""
    from scfm_kernels import _bwd

    lens = torch.tensor([70, 20], dtype=torch.int32)
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
    H, D, T = 2, 128, 40
    q, k, v, go = (torch.randn(int(cu[-1]), H, D, dtype=torch.bfloat16) for _ in range(4))
    bias = -torch.log(lens.float())
    stored = _bwd.attention_backward(go, q, k, v, cu, bias, D**-0.5, True, T, dq_path="stored")
    recomputed = _bwd.attention_backward(go, q, k, v, cu, bias, D**-0.5, True, T, dq_path="recompute")
    assert torch.isfinite(stored[0][:T]).all() and torch.isfinite(stored[0][70:]).all()
    for name, a, b in zip(("dk", "dv"), stored[1:], recomputed[1:]):
        assert torch.equal(a[:T], b[:T]) and torch.equal(a[70:], b[70:]), name
    assert _relerr(stored[0][70:], recomputed[0][70:].double()) < 1e-2


@interpret_only
def test_backward_of_an_empty_batch_is_empty():
    q, k, v = (_rand(0, 16, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    out = sk.sigmoid_attention(q, k, v, torch.zeros(0, dtype=torch.int32))
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out), allow_unused=True)
    assert out.shape == q.shape and all(g is None or g.shape == q.shape for g in grads)


@interpret_only
def test_varlen_equals_padded_and_reference():
    T, H, K, D = 40, 2, 1, 32
    lens = torch.tensor([1, T, 0, 23], dtype=torch.int32)
    B = lens.numel()
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    N = int(cu[-1])
    q, k, v = (
        _rand(N, H, D, dtype=torch.float32),
        _rand(N, K, D, dtype=torch.float32),
        _rand(N, K, D, dtype=torch.float32),
    )
    out = sk.sigmoid_attention_varlen(q, k, v, cu, T)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)

    def pad(x_N: torch.Tensor) -> torch.Tensor:
        x_BT = x_N.new_zeros(B, T, *x_N.shape[1:])
        for b in range(B):
            x_BT[b, : lens[b]] = x_N[cu[b] : cu[b + 1]]
        return x_BT

    qp, kp, vp = (pad(t.detach()).requires_grad_() for t in (q, k, v))
    out_p = sk.sigmoid_attention(qp, kp, vp, lens)
    grads_p = torch.autograd.grad(out_p, (qp, kp, vp), pad(go))
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_p, *grads_p)):
        assert _relerr(pad(got), want.double()) < 1e-6, f"varlen {name} differs from padded"

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = sk.sigmoid_attention_varlen_reference(q64, k64, v64, cu, T)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert _relerr(got, want) < TOL[torch.float32], f"varlen {name} differs from the float64 oracle"


@interpret_only
def test_torch_compile_traces_without_graph_break():
    B, T, H, D = 2, 32, 2, 32
    lens = _lens(B, T)
    q, k, v = (_rand(B, T, H, D, dtype=torch.float32) for _ in range(3))

    def loss(q, k, v):
        return (sk.sigmoid_attention(q, k, v, lens) ** 2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))  # eager: the autograd.Function path
    for g, w in zip(got, want):
        assert _relerr(g, w.double()) < 1e-6

    traced = []

    def record(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch.compile(loss, backend=record, fullgraph=True)(q, k, v)
    assert any("scfm.sigmoid_attn_fwd" in t for t in traced), traced  # compiled: the custom op
    assert type(sk.sigmoid_attention(q, k, v, lens).grad_fn).__name__ == "_EagerAttentionBackward"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: (torch.randn(2, 8, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16), None), "4 dims"),
        (
            lambda: (torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16).half(), torch.randn(2, 8, 2, 16), None),
            "to share one dtype",
        ),
        (
            lambda: (torch.randn(2, 8, 3, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16), None),
            "multiple of the key/value head count",
        ),
        (lambda: (torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8), torch.randn(2, 8, 2, 8), None), "16 <= D"),
        (
            lambda: (torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16), torch.ones(2)),
            "expected torch.int32",
        ),
        (
            lambda: (
                torch.randn(2, 8, 2, 16),
                torch.randn(2, 8, 2, 16, device="meta"),
                torch.randn(2, 8, 2, 16),
                None,
            ),
            "one device",
        ),
        (
            lambda: (
                torch.randn(2, 8, 2, 16).double(),
                torch.randn(2, 8, 2, 16).double(),
                torch.randn(2, 8, 2, 16).double(),
                None,
            ),
            "expected one of",
        ),
    ],
)
def test_bad_inputs_say_what_was_given_and_expected(make, message):
    q, k, v, seq_lens = make()
    with pytest.raises(ValueError, match=message) as info:
        sk.sigmoid_attention(q, k, v, seq_lens)
    assert "expected" in str(info.value)


def test_varlen_rejects_bad_cu_seqlens():
    q = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match=r"cu_seqlens has dtype torch.int64; expected torch.int32"):
        sk.sigmoid_attention_varlen(q, q, q, torch.tensor([0, 4, 10]), 6)
    with pytest.raises(ValueError, match="max_seqlen is 0; expected a positive int"):
        sk.sigmoid_attention_varlen(q, q, q, torch.tensor([0, 4, 10], dtype=torch.int32), 0)


def test_sequences_past_32_bit_offsets_are_refused_before_any_launch():
    """One sequence spanning 2^31 elements (131,072 tokens × 128 heads × 128, padded or packed, or a head-major
    layout whose head stride carries it there) is refused with what was given; 131,071 contiguous tokens pass.
    Meta tensors: no memory is needed, and the check comes before any launch."""
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(1, 131072, 128, 128, **meta)
    with pytest.raises(ValueError, match=r"q \(1, 131072, 128, 128\): one sequence of 131072 tokens spans "
                                         r"2,147,483,648 elements .* expected fewer than 2\^31"):  # fmt: skip
        sk.sigmoid_attention(q, q[:, :, :1], q[:, :, :1])
    packed = torch.empty(2 * 131072, 128, 128, **meta)
    with pytest.raises(ValueError, match="one sequence of 131072 tokens"):
        cu = torch.tensor([0, 131072, 262144], dtype=torch.int32, device="meta")
        sk.sigmoid_attention_varlen(packed, packed, packed, cu, 131072)
    # Head-major storage with room for 131,136 tokens per head, viewed as [B, T, H, D] of 131,071 tokens: its head
    # stride carries the last element past 2^31, although the same tokens stored contiguously (q) fit.
    q = torch.empty(1, 131071, 128, 128, **meta)
    head_major = torch.empty(1, 128, 131136, 128, **meta).transpose(1, 2)[:, :131071]
    with pytest.raises(ValueError, match=r"k \(1, 131071, 128, 128\)"):
        sk.sigmoid_attention(q, head_major, head_major)
    from scfm_kernels._validate import check_sequence_extent

    check_sequence_extent(131071, q=torch.empty(1, 131071, 128, 128, **meta))  # 2^31 − 16384 elements: fine


@triton.jit
def _sigmoid_probe(X, P, Q, N, SIG: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    z = -tl.load(X + offs, mask=offs < N) * 1.4426950408889634
    p, e = sigmoid_parts(z, False, SIG)
    tl.store(P + offs, p, mask=offs < N)
    tl.store(Q + offs, e * p, mask=offs < N)


@interpret_only
@pytest.mark.parametrize(("sig", "bound"), [(1, 1.4e-4), (3, 1.3e-3)])
def test_sigmoid_weights_keep_their_stated_error(sig, bound):
    """The weights' sigmoid (SIG 1: third-order step, fp16 and the backward; SIG 3: centred Newton step, the bf16
    forward) stays within its documented relative error for p and for 1 − p = e·p, and saturates cleanly past
    the clamp. The interpreter's ex2 is exact, so this checks the reciprocal and its constants."""
    x = torch.cat([torch.linspace(-80, 80, 160_001), torch.randn(50_000) * 3 - 9])
    far = torch.tensor([-1e4, -200.0, -90.0, 90.0, 200.0, 1e4])
    xs = torch.cat([x, far])
    p, q = torch.empty_like(xs), torch.empty_like(xs)
    _sigmoid_probe[(triton.cdiv(xs.numel(), 4096),)](xs, p, q, xs.numel(), SIG=sig, BLOCK=4096)
    n = x.numel()
    ref_p, ref_q = torch.sigmoid(x.double()), torch.sigmoid(-x.double())
    err_p = ((p[:n].double() - ref_p).abs() / ref_p).max().item()
    err_q = ((q[:n].double() - ref_q).abs() / ref_q).max().item()
    assert err_p <= bound and err_q <= bound, f"SIG {sig}: relative error p {err_p:.2e}, 1-p {err_q:.2e} > {bound}"
    p_far = p[n:]
    assert torch.isfinite(p_far).all() and (p_far >= 0).all() and (p_far <= 1 + bound).all()
    assert (p_far[:3] < 1e-30).all() and (p_far[3:] > 1 - bound).all()
