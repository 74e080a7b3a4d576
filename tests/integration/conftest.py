"""Shared fixtures of the integration tests.

`trained`: one tiny 1-worker DeepSpeed ZeRO-2 Ray Train run on a small demo atlas (700 PBMC + 300 synthetic cells)
with a real MLflow server, shared by every test that needs a real checkpoint (test_eval_checkpoint.py,
test_eval_h5ad.py): (atlas, checkpoint, training result, tracking URI). Ray is shut down before the tests run.
"""

from __future__ import annotations

import pytest

TRAIN = [
    "name=evalckpt",
    "model.preset=tiny",
    "model.attention=softmax",  # the eval path is attention-agnostic; interpreted Triton would cost minutes on CI
    "data.engine=local",  # the same read/tokenize code in the worker: no Ray Data pipeline to start
    "data.max_len=64",
    "data.tokens_per_batch=1024",
    "data.max_cells_per_batch=16",
    "data.read_workers=1",
    "train.steps=4",
    "train.checkpoint_every=4",
    "train.warmup_steps=1",
    "train.val_every=0",
    "eval.every=4",  # in-training evaluation at the last step, on the PBMC cells only
    "eval.datasets=[pbmc68k_reduced]",
    "deepspeed.zero_stage=2",
    "resources.num_workers=1",
    "resources.use_gpu=false",
    "resources.cpus_per_worker=1",
    "resources.max_failures=0",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(atlas, checkpoint, training result, tracking URI): one tiny training run with a real MLflow server."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("deepspeed")
    from scfm_data_service import build_demo_atlas
    from scfm_platform.config import load_config
    from scfm_platform.tracking import LocalServer
    from scfm_platform.trainer import train

    if ray.is_initialized():
        ray.shutdown()
    atlas = str(tmp_path_factory.mktemp("atlas") / "demo")
    build_demo_atlas(atlas, synthetic_cells=300)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    server = LocalServer(tmp_path_factory.mktemp("mlflow"))
    uri = server.start()
    out = tmp_path_factory.mktemp("runs")
    try:
        cfg = load_config(None, [f"data.atlas={atlas}", f"train.output_dir={out}", *TRAIN])
        res = train(cfg, progress=False, print_fn=lambda *_: None, tracking_uri=uri)
        ray.shutdown()  # eval needs no Ray: the data service's local engine reads the atlas
        yield atlas, res.checkpoint, res, uri
    finally:
        server.stop()
        if ray.is_initialized():
            ray.shutdown()
