"""Trainer parts that need no Ray: schedule, DeepSpeed config, divergence guard, FLOPs, data stream, MLflow
logger when the server is gone, and the `launch run` command surface."""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import pytest
import torch

from scfm_platform import data
from scfm_platform.config import load_config
from scfm_platform.engine import deepspeed_config, lr_lambda, param_groups
from scfm_platform.errors import ConfigError, RunError
from scfm_platform.flops import batch_flops, peak_flops, tokens_flops
from scfm_platform.model import build_model
from scfm_platform.monitor import DivergenceGuard


def _cfg(*o: str):
    return load_config(None, ["data.atlas=synthetic:300", *o])


def test_warmup_then_cosine_to_floor():
    f = lr_lambda(_cfg("train.warmup_steps=10", "train.min_lr_ratio=0.1"), 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(10, 120))


def test_deepspeed_config_follows_run_config():
    cpu = torch.device("cpu")
    ds = deepspeed_config(_cfg("deepspeed.zero_stage=3", "train.grad_clip=0"), cpu)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.0
    assert ds["bf16"]["enabled"] is False  # fp32 on CPU with precision=auto
    assert deepspeed_config(_cfg("train.precision=bf16"), cpu)["bf16"]["enabled"] is True
    assert deepspeed_config(_cfg("deepspeed.zero_stage=0"), cpu)["zero_optimization"] == {"stage": 0}
    off = deepspeed_config(_cfg("deepspeed.offload_optimizer=true"), cpu)["zero_optimization"]["offload_optimizer"]
    assert off["device"] == "cpu"


def test_no_weight_decay_on_norms_biases_embeddings():
    model = build_model(_cfg("model.layer_scale=0.1"), data.vocab_size(_cfg().data))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(".weight") and "emb" not in names[id(p)] for p in decay["params"])
    assert any("norm" in names[id(p)] for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_divergence_guard():
    g = DivergenceGuard(factor=10.0, warmup=3)
    assert g.check(float("nan"), 1.0) == "loss is nan"
    assert "grad norm is inf" in g.check(1.0, float("inf"))
    for _ in range(3):
        assert g.check(2.0, 1.0) is None
    assert g.check(2.0, 9.0) is None
    reason = g.check(2.0, 50.0)
    assert reason is not None and "exceeds 10 x running median" in reason


def test_divergence_guard_lets_short_spike_bursts_through():
    g = DivergenceGuard(factor=10.0, warmup=3, patience=3)
    for _ in range(3):
        assert g.check(2.0, 1.0) is None
    assert g.check(2.0, 500.0) is None and g.check(2.0, 80.0) is None  # two spikes in a row: let through
    assert g.spikes == 2 and list(g.history) == [1.0, 1.0, 1.0]  # spikes stay out of the median
    assert g.check(2.0, 1.2) is None  # a normal step ends the burst
    assert g.check(2.0, 50.0) is None and g.check(2.0, 50.0) is None
    reason = g.check(2.0, 50.0)
    assert reason is not None and "for 3 steps in a row" in reason
    assert g.check(float("inf"), 1.0) == "loss is inf"  # non-finite values stop at once, whatever the patience


def test_flops_formula_by_hand():
    model = build_model(_cfg("model.objective=gene"), 203)
    d = model.dims  # tiny: dim 64, depth 2, heads 4, mlp 256
    p_tok = 2 * (64 * 3 * 64 + 64 * 64 + 2 * 64 * 256)
    assert tokens_flops(d) == p_tok
    lens = torch.tensor([10, 4], dtype=torch.int32)
    want = 6 * p_tok * 14 + 12 * 2 * 64 * (100 + 16) + 6 * 64 * 203 * 3
    assert batch_flops(d, lens, 3) == want
    assert peak_flops(torch.device("cpu"), 2.0) == 2e12


def test_synthetic_stream_resumes_mid_epoch_and_is_rank_disjoint():
    d = _cfg("data.max_len=32", "data.tokens_per_batch=256").data
    full = list(data.batches(d, rank=0, world_size=2, epoch=1))
    tail = list(data.batches(d, rank=0, world_size=2, epoch=1, start_step=3))
    assert len(full) == data.steps_per_epoch(d, 2) and len(tail) == len(full) - 3
    for a, b in zip(full[3:], tail):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = next(data.batches(d, rank=1, world_size=2, epoch=1))
    assert not torch.equal(other["gene_ids"], full[0]["gene_ids"])


def test_synthetic_full_stream_has_no_padding_and_bad_specs_are_named():
    d = load_config(None, ["data.atlas=synthetic:300:full", "data.max_len=32", "data.tokens_per_batch=256"]).data
    assert data.steps_per_epoch(d, 1) == int(300 * (1 - d.val_fraction)) // 8
    lens = torch.cat([b["seq_lens"] for b in list(data.batches(d, rank=0, world_size=1, epoch=0))[:5]])
    assert torch.all(lens == 32)
    mixed = _cfg("data.max_len=32", "data.tokens_per_batch=256").data
    assert (next(data.batches(mixed, rank=0, world_size=1, epoch=0))["seq_lens"] < 32).any()
    for bad in ("synthetic:300:ful", "synthetic:lots"):
        d = load_config(None, [f"data.atlas={bad}"]).data
        with pytest.raises(ValueError, match=r"expected synthetic:<cells> or synthetic:<cells>:full"):
            data.steps_per_epoch(d, 1)


def test_logger_survives_a_missing_server():
    from scfm_platform.tracking import RunLogger

    log = RunLogger("http://127.0.0.1:9", "0" * 32, system_metrics=False)  # port 9: nothing listens
    t = time.monotonic()
    with pytest.warns(UserWarning, match="unreachable") as seen:
        for step in range(100):
            log.log_metrics({"loss": 1.0 / (step + 1)}, step)
        log.log_params({"a": "1"})
        time.sleep(1.5)
        log.close(timeout=3)  # retried every second until then; what is left is named, not silently dropped
    assert 3 <= time.monotonic() - t < 15
    lost = [str(w.message) for w in seen if "were not logged" in str(w.message)]
    assert len(lost) == 1 and "100 metric points and 1 other records" in lost[0], [str(w.message) for w in seen]


def _run_parser() -> argparse.ArgumentParser:
    from scfm_launch.commands import run

    parser = argparse.ArgumentParser(prog="launch")
    run.register(parser.add_subparsers(dest="command"))
    return parser


def test_launch_run_arguments_and_bad_input(tmp_path):
    args = _run_parser().parse_args(["run", "configs/demo.yaml", "model.attention=softmax", "--resume"])
    assert args.resume and args.overrides == ["model.attention=softmax"] and args.config == "configs/demo.yaml"
    with pytest.raises(ConfigError, match=r"model\.attention"):
        args.func(_run_parser().parse_args(["run", "configs/demo.yaml", "model.attention=linear"]))
    with pytest.raises(RunError, match="no earlier run"):
        from scfm_platform.trainer import _run_dir

        _run_dir(_cfg(f"train.output_dir={tmp_path}"), resume=True)


def test_launch_run_module_imports_nothing_heavy():
    heavy = "{'torch', 'ray', 'deepspeed', 'mlflow'}"
    code = f"import sys, scfm_launch.commands.run; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_silent_workers_get_one_warning_per_silence():
    """The driver's report loop warns once when no report has come for train.stall_warn_s, again after the next
    silence, never while reports flow; stall_warn_s=0 never warns."""
    import queue
    import threading

    from scfm_platform.trainer import _progress

    def run(after_s: float) -> tuple[list[str], list[dict]]:
        feed: queue.Queue = queue.Queue()

        def worker() -> None:  # silent 1.6 s, one report, silent 1.6 s, done
            time.sleep(1.6)
            feed.put({"step": 1, "loss": 1.0, "tokens_per_s": 1.0, "mfu": 0.0, "total_steps": 2})
            time.sleep(1.6)

        thread = threading.Thread(target=worker)
        thread.start()
        lines: list[str] = []
        history: list[dict] = []
        _progress(feed, thread, history, 2, False, after_s, lines.append)
        thread.join()
        return lines, history

    lines, history = run(0.6)
    assert [m["step"] for m in history] == [1]
    assert len(lines) == 2 and all("train.stall_warn_s=0.6" in x and "ray stack" in x for x in lines)
    assert run(0.0)[0] == []
    with pytest.raises(ConfigError, match="stall_warn_s"):
        _cfg("train.stall_warn_s=-1")
