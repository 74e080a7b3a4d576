"""The DeepSpeed engine on CPU does not depend on a JIT-compiled op: a lock file left in the torch extensions
folder by a process killed while compiling (the state a Ctrl-C or a killed worker leaves) must not hang training.
And the engine's flat parameter buffers keep every weight and bias 16-byte aligned."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("deepspeed")

SCRIPT = textwrap.dedent(
    """
    import torch, torch.distributed as dist
    from scfm_platform.config import load_config
    from scfm_platform.engine import initialize

    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    cfg = load_config(None, ["data.atlas=synthetic:64", "deepspeed.zero_stage=2", "train.warmup_steps=1"])
    engine = initialize(cfg, model, torch.device("cpu"), total_steps=4)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    import deepspeed.comm.comm as ds_comm

    print("shm_comm_op", ds_comm.cdb.shm_comm_op)
    print("losses", *losses)

    # The cell transformer under ZeRO-2: DeepSpeed packs each parameter group into one flat buffer. Its first
    # parameter is the 203-gene output bias; every parameter whose size is a multiple of 8 must still start on a
    # 16-byte boundary (cuBLAS takes its slow align-1 kernels for misaligned weights and biases).
    from scfm_platform import data
    from scfm_platform.model import build_model

    cfg = load_config(None, ["data.atlas=synthetic:64", "deepspeed.zero_stage=2", "model.preset=tiny"])
    model = build_model(cfg, data.vocab_size(cfg.data))
    assert next(iter(model.parameters())).numel() % 8 != 0  # the case that misaligned them
    engine = initialize(cfg, model, torch.device("cpu"), total_steps=4)
    bad = [n for n, p in engine.module.named_parameters() if p.numel() % 8 == 0 and p.data_ptr() % 16]
    print("misaligned", len(bad), *bad[:5])

    # grad_norms on ZeRO-2's gradient partitions against plain autograd on a copy of the same weights.
    import copy, math
    from scfm_platform.engine import grad_norms
    from scfm_platform.model import layer_groups
    from scfm_platform.objective import masked_loss
    from scfm_platform.synthetic import synthetic_batch

    ref = copy.deepcopy(engine.module)
    b = synthetic_batch(4, 64, 200, generator=torch.Generator().manual_seed(1))
    args = (b["gene_ids"], b["values"], b["seq_lens"], b["mask"])
    dims = ref.dims
    masked_loss(ref(*args), b, dims.value_encoding, dims.n_bins)[0].backward()
    want = {k: math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in ps if p.grad is not None))
            for k, ps in layer_groups(ref).items()}
    engine.backward(masked_loss(engine(*args), b, dims.value_encoding, dims.n_bins)[0])
    total, per = grad_norms(engine, layer_groups(engine.module))
    worst = max(abs(per[k] - want[k]) / max(want[k], 1e-12) for k in want)
    print("gradnorm", total, math.sqrt(sum(v * v for v in want.values())), worst)

    # A checkpoint records the optimizer's parameter layout; one with another layout is refused, not misloaded.
    import json
    from scfm_platform import checkpoint
    from scfm_platform.errors import RunError

    ckpt = checkpoint.save(engine, checkpoint.TrainState(3, 0, 3), 0, run={})
    assert checkpoint.load(engine, ckpt, 0) == checkpoint.TrainState(3, 0, 3)
    state_file = ckpt / checkpoint.STATE_FILE
    for edit in ({"param_layout": "0123456789abcdef"}, {}):  # another layout; none recorded (older scfm)
        state = {k: v for k, v in json.loads(state_file.read_text()).items() if k != "param_layout"}
        state_file.write_text(json.dumps({**state, **edit}))
        try:
            checkpoint.load(engine, ckpt, 0)
            print("layout accepted", edit)
        except RunError as e:
            print("layout refused", "another parameter layout" in str(e))
    # One saved with other weights (bf16: DeepSpeed's bf16 optimizer state) is refused as well.
    state = {k: v for k, v in json.loads(state_file.read_text()).items() if k != "param_layout"}
    state_file.write_text(json.dumps({**state, "param_layout": checkpoint.param_layout(engine.module),
                                      "weights_dtype": "torch.bfloat16"}))
    try:
        checkpoint.load(engine, ckpt, 0)
        print("dtype accepted")
    except RunError as e:
        print("dtype refused", "saved with torch.bfloat16 weights" in str(e))

    # train.precision=amp: fp32 weights and optimizer (no DeepSpeed bf16 wrapper), the forward under bf16 autocast.
    from scfm_platform.engine import autocast

    cfg = load_config(None, ["data.atlas=synthetic:64", "model.preset=tiny", "train.precision=amp",
                             "train.warmup_steps=1"])
    model = build_model(cfg, data.vocab_size(cfg.data))
    engine = initialize(cfg, model, torch.device("cpu"), total_steps=4)
    before = [p.detach().clone() for p in engine.module.parameters()]
    losses, dtypes = [], set()
    for _ in range(3):
        with autocast(cfg, torch.device("cpu")):
            out = engine(*args)
            loss = masked_loss(out, b, dims.value_encoding, dims.n_bins)[0]
        dtypes |= {t.dtype for t in (out.h_BTD, out.gene_logits_MV) if t is not None}
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    weights = {str(p.dtype) for p in engine.module.parameters()}
    moved = sum(not torch.equal(p, q) for p, q in zip(engine.module.parameters(), before))
    print("amp", engine.bfloat16_enabled(), ",".join(sorted(weights)), ",".join(sorted(map(str, dtypes))), moved,
          *losses)
    dist.destroy_process_group()
    """
)


def test_cpu_engine_trains_with_a_stale_extension_lock(tmp_path):
    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()  # left by a compile that was killed
    from scfm_platform.tracking import free_port

    env = os.environ | {
        "TORCH_EXTENSIONS_DIR": str(ext),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "DS_ACCELERATOR": "cpu",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    try:
        out = subprocess.run(
            [sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"deepspeed.initialize on CPU did not finish in 240 s (waiting on the extension lock?): {e}")
    assert out.returncode == 0, out.stderr[-3000:]
    keys = ("shm_comm_op", "losses", "misaligned", "gradnorm")
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(keys))
    layouts = [line for line in out.stdout.splitlines() if line.startswith("layout")]
    assert layouts == ["layout refused True"] * 2, layouts
    assert "dtype refused True" in out.stdout, out.stdout[-2000:]
    amp = next(line for line in out.stdout.splitlines() if line.startswith("amp ")).split()
    assert amp[1] == "False", "amp must run DeepSpeed without its bf16 optimizer"
    assert amp[2] == "torch.float32", f"amp keeps fp32 weights, got {amp[2]}"
    assert "torch.bfloat16" in amp[3], f"the forward under amp must produce bf16 outputs, got {amp[3]}"
    assert int(amp[4]) > 0, "no weight changed in three amp steps"
    assert all(math.isfinite(float(v)) for v in amp[5:]), amp
    assert lines["shm_comm_op"] == "None"
    assert lines["misaligned"].split()[0] == "0", f"parameters off 16-byte boundaries: {lines['misaligned']}"
    total, want, worst_rel = (float(x) for x in lines["gradnorm"].split())
    assert want > 0 and abs(total - want) < 1e-4 * want and worst_rel < 1e-4, lines["gradnorm"]
    losses = [float(v) for v in lines["losses"].split()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (ext / "deepspeed_shm_comm" / "lock").exists()  # untouched: nothing waited on it or removed it
