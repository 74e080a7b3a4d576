"""The DeepSpeed engine on CPU does not depend on a JIT-compiled op: a lock file left in the torch extensions
folder by a process killed while compiling (the state a Ctrl-C or a killed worker leaves) must not hang training."""

from __future__ import annotations

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
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if line.startswith(("shm_comm_op", "losses")))
    assert lines["shm_comm_op"] == "None"
    losses = [float(v) for v in lines["losses"].split()]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (ext / "deepspeed_shm_comm" / "lock").exists()  # untouched: nothing waited on it or removed it
