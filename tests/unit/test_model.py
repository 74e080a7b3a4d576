"""Cell transformer: shapes, backends, masking of padding, presets, objective."""

from __future__ import annotations

import pytest
import torch

from scfm_data_service import schema
from scfm_platform.attention import attention
from scfm_platform.config import load_config
from scfm_platform.model import PRESETS, build_model, count_params, layer_groups, masked_positions
from scfm_platform.objective import masked_loss
from scfm_platform.synthetic import synthetic_batch

N_GENES = 200
VOCAB = N_GENES + schema.N_SPECIAL


def _cfg(*overrides: str):
    return load_config(None, ["data.atlas=unused", "data.max_len=32", "data.tokenizer=binned", *overrides])


def _batch(seed: int = 0, **kw):
    return synthetic_batch(4, 32, N_GENES, mask_ratio=0.3, generator=torch.Generator().manual_seed(seed), **kw)


def _loss(model, batch, cfg):
    out = model(batch["gene_ids"], batch["values"], batch["seq_lens"], batch["mask"])
    return masked_loss(out, batch, model.dims.value_encoding, cfg.data.n_bins)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("objective", ["gene", "value", "both"])
def test_shapes_per_backend_and_objective(kind, objective):
    cfg = _cfg(f"model.attention={kind}", f"model.objective={objective}")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    b = _batch()
    out = model(b["gene_ids"], b["values"], b["seq_lens"], b["mask"])
    M = int(b["mask"].sum())
    assert out.h_BTD.shape == (4, 32, 64)
    if objective in ("gene", "both"):
        assert out.gene_logits_MV.shape == (M, VOCAB)
    if objective in ("value", "both"):
        assert out.value_pred.shape == (M, cfg.data.n_bins)
    loss, parts = masked_loss(out, b, model.dims.value_encoding, cfg.data.n_bins)
    assert torch.isfinite(loss) and set(parts) <= {"gene_loss", "value_loss"}
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.numel() > 1)


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_padding_does_not_leak(kind):
    """Changing padded tokens changes nothing in the valid positions or the cell embedding."""
    cfg = _cfg(f"model.attention={kind}", "model.pooling=mean")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB).eval()
    b = _batch()
    ids, vals, lens = b["gene_ids"].clone(), b["values"].clone(), b["seq_lens"]
    valid = torch.arange(32)[None, :] < lens[:, None]
    h1 = model.encode(ids, vals, lens)
    ids[~valid] = 7
    vals[~valid] = 3.0
    h2 = model.encode(ids, vals, lens)
    torch.testing.assert_close(h1[valid], h2[valid])
    assert h2[~valid].abs().max() == 0
    torch.testing.assert_close(
        model.cell_embedding(ids, vals, lens), model.cell_embedding(*[b[k] for k in ("gene_ids", "values", "seq_lens")])
    )


def test_attention_backends_agree_with_reference_math():
    """softmax backend = explicit masked softmax; sigmoid backend = explicit sigmoid with −log(n) bias."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    lens = torch.tensor([6, 4], dtype=torch.int32)
    valid = torch.arange(6)[None, :] < lens[:, None]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / 16**0.5
    sm = s.masked_fill(~valid[:, None, None, :], float("-inf")).softmax(-1)
    sg = torch.sigmoid(s - torch.log(lens.double())[:, None, None, None]) * valid[:, None, None, :]
    for kind, p in (("softmax", sm), ("sigmoid", sg)):
        want = torch.einsum("bhqk,bkhd->bqhd", p, v) * valid[:, :, None, None]
        torch.testing.assert_close(attention(q, k, v, lens, kind=kind), want)
    torch.testing.assert_close(
        attention(q, k, v, lens, kind="softmax", softmax_backend="math"), attention(q, k, v, lens, kind="softmax")
    )


def test_gqa_and_stabilizers():
    cfg = _cfg("model.heads=4", "model.kv_heads=2", "model.qk_norm=true", "model.layer_scale=0.1")
    model = build_model(cfg, VOCAB)
    assert model.blocks[0].ls1 is not None and isinstance(model.blocks[0].q_norm, torch.nn.RMSNorm)
    loss, _ = _loss(model, _batch(), cfg)
    loss.backward()
    assert model.blocks[0].ls1.grad is not None


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_both_backends_learn(kind):
    """A few AdamW steps on one batch lower the masked-gene loss."""
    cfg = _cfg(f"model.attention={kind}")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    b = _batch()
    losses = []
    for _ in range(15):
        loss, _ = _loss(model, b, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_presets_and_param_counts():
    assert set(PRESETS) == {"tiny", "small", "base", "160m", "1b"}
    with torch.device("meta"):
        m160 = build_model(load_config(None, ["data.atlas=x", "model.preset=160m"]), 60_003)
        m1b = build_model(load_config(None, ["data.atlas=x", "model.preset=1b"]), 60_003)
    assert 150e6 < count_params(m160) < 170e6
    assert 0.9e9 < count_params(m1b) < 1.2e9
    groups = layer_groups(m160)
    assert len(groups) == 16 + 2 and sum(len(v) for v in groups.values()) == len(list(m160.parameters()))


def test_config_fields_override_preset():
    m = build_model(_cfg("model.dim=48", "model.depth=3", "model.heads=3", "model.mlp_ratio=2"), VOCAB)
    assert (m.dims.dim, m.dims.depth, m.dims.heads, m.dims.mlp_hidden) == (48, 3, 3, 96)
    assert len(m.blocks) == 3


def test_deterministic_attention_switch_reaches_every_block():
    """model.deterministic_attention=false selects the sigmoid kernel's one-pass backward (GPU only; the CPU
    reference has a single backward, so the same model trains identically here)."""
    assert all(b.deterministic for b in build_model(_cfg(), VOCAB).blocks)
    m = build_model(_cfg("model.deterministic_attention=false"), VOCAB)
    assert not any(b.deterministic for b in m.blocks)
    torch.manual_seed(0)
    a = build_model(_cfg(), VOCAB)
    torch.manual_seed(0)
    b = build_model(_cfg("model.deterministic_attention=false"), VOCAB)
    assert torch.equal(_loss(a, _batch(), _cfg())[0], _loss(b, _batch(), _cfg())[0])


@pytest.mark.parametrize("n_genes", [N_GENES, 64 * 4 - schema.N_SPECIAL])  # odd vocabulary, and one of 64 rows
def test_gene_head_padding_changes_nothing(n_genes):
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg, n_genes + schema.N_SPECIAL).double()
    h_MD = torch.randn(7, model.dims.dim, dtype=torch.float64, requires_grad=True)
    got = model.gene_logits(h_MD)
    want = torch.nn.functional.linear(h_MD, model.gene_emb.weight, model.gene_bias)
    assert got.shape == want.shape == (7, n_genes + schema.N_SPECIAL)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (h_MD, model.gene_emb.weight, model.gene_bias), g)
    want_grads = torch.autograd.grad(want, (h_MD, model.gene_emb.weight, model.gene_bias), g)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("objective", ["gene", "value", "both"])
def test_host_positions_match_the_bool_mask(objective):
    """Masked positions made on the host (the trainer's no-sync path) give the bool mask's heads, loss and grads."""
    cfg = _cfg(f"model.objective={objective}")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    b = _batch(seed=3)
    pos_M = masked_positions(b["mask"])
    assert pos_M.dtype == torch.int64 and pos_M.shape[0] == int(b["mask"].sum())
    torch.testing.assert_close(b["target_gene_ids"].flatten()[pos_M], b["target_gene_ids"][b["mask"]], rtol=0, atol=0)
    args = (b["gene_ids"], b["values"], b["seq_lens"])
    ref_out = model(*args, b["mask"])
    ref_loss, ref_parts = masked_loss(ref_out, b, model.dims.value_encoding, cfg.data.n_bins)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()), allow_unused=True)
    out = model(*args, pos_M)
    loss, parts = masked_loss(out, b, model.dims.value_encoding, cfg.data.n_bins, pos_M)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    assert set(parts) == set(ref_parts) and torch.equal(loss, ref_loss)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert (g is None) == (ref is None)
        if g is not None:
            torch.testing.assert_close(g, ref)


def test_loss_of_a_batch_without_masked_positions_is_zero():
    cfg = _cfg("model.objective=both")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    b = _batch()
    b["mask"] = torch.zeros_like(b["mask"])
    out = model(b["gene_ids"], b["values"], b["seq_lens"], masked_positions(b["mask"]))
    loss, _ = masked_loss(out, b, model.dims.value_encoding, cfg.data.n_bins)
    assert out.gene_logits_MV.shape == (0, VOCAB) and float(loss) == 0.0


def test_compiled_loss_matches_eager_as_the_masked_count_changes():
    """The trainer compiles the loss with the model (`model.compile`); M differs batch to batch, so the compiled
    loss must follow a new M (a recompile with M dynamic) and give the eager loss and gradients."""
    cfg = _cfg("model.objective=both")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    compiled = torch.compile(masked_loss)
    counts = set()
    for seed in range(3):
        b = _batch(seed=seed)
        pos_M = masked_positions(b["mask"])
        counts.add(pos_M.shape[0])
        out = model(b["gene_ids"], b["values"], b["seq_lens"], pos_M)
        heads = [out.gene_logits_MV, out.value_pred]
        want, _ = masked_loss(out, b, model.dims.value_encoding, cfg.data.n_bins, pos_M)
        got, _ = compiled(out, b, model.dims.value_encoding, cfg.data.n_bins, pos_M)
        torch.testing.assert_close(got, want)
        for g, ref in zip(torch.autograd.grad(got, heads), torch.autograd.grad(want, heads), strict=True):
            torch.testing.assert_close(g, ref)
    assert len(counts) > 1  # the batches do change M
