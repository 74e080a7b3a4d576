"""Secrets stay out of what scfm prints and stores: secret-looking keys are masked, URI credentials stripped."""

from __future__ import annotations

import os
import subprocess
import sys

from scfm_platform.config import flatten, load_config, redact_uri, redacted, redacted_yaml

SECRET = "s3cr3t"
OVERRIDES = [
    "data.atlas=synthetic:10",
    f"tracking.uri=https://user:{SECRET}@mlflow.example.org/x",
    "cluster.address=http://ray:${oc.env:SCFM_TEST_PASSWORD}@127.0.0.1:8265",  # a credential from the environment
    "cluster.storage_secret=object-store-creds",
]


def test_redacted_masks_secret_keys_and_uri_credentials(monkeypatch):
    monkeypatch.setenv("SCFM_TEST_PASSWORD", SECRET)
    cfg = load_config(None, OVERRIDES)
    assert SECRET in cfg.tracking.uri and SECRET in cfg.cluster.address  # the run itself still gets them
    flat = redacted(flatten(cfg))
    assert SECRET not in repr(flat) and SECRET not in redacted_yaml(cfg)
    assert flat["tracking.uri"] == "https://***@mlflow.example.org/x"
    assert flat["cluster.address"] == "http://***@127.0.0.1:8265"
    assert flat["cluster.storage_secret"] == "***"
    # keys that only contain a secret word are left alone; nested dicts and lists are walked
    assert flat["data.tokens_per_batch"] == str(cfg.data.tokens_per_batch) and flat["data.tokenizer"] == "rank"
    nested = redacted({"s3": {"AWS_SECRET_ACCESS_KEY": "x1", "api-token": "x2", "Password": "x3", "endpoint": "e"},
                       "uris": ["s3://k:x4@bucket/a"], "tokens": "zarr://t"})  # fmt: skip
    assert nested == {"s3": {"AWS_SECRET_ACCESS_KEY": "***", "api-token": "***", "Password": "***", "endpoint": "e"},
                      "uris": ["s3://***@bucket/a"], "tokens": "zarr://t"}  # fmt: skip
    assert redact_uri("cannot reach https://u:p@h:5000/api (x)") == "cannot reach https://***@h:5000/api (x)"


def test_launch_validate_prints_no_secret(tmp_path):
    env = {**os.environ, "SCFM_TEST_PASSWORD": SECRET}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: secrets\n")
    p = subprocess.run([sys.executable, "-m", "scfm_launch.cli", "validate", str(cfg), *OVERRIDES],
                       capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-500:]
    assert "uri: https://***@mlflow.example.org/x" in p.stdout and "storage_secret: '***'" in p.stdout
    assert SECRET not in p.stdout + p.stderr
