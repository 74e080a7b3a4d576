"""Config loading: YAML + overrides, and one-line errors that name the key and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scfm_platform.config import RunConfig, flatten, from_dict, load_config, to_dict, to_yaml
from scfm_platform.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.data.atlas  # every example names its atlas
    assert cfg.model.attention in ("sigmoid", "softmax")


def test_required_examples_exist() -> None:
    names = {p.name for p in CONFIGS}
    for want in (
        "demo.yaml",
        "h200_160m_8k.yaml",
        "stress_160m_8k_noclip_sigmoid.yaml",
        "stress_160m_8k_noclip_softmax.yaml",
    ):
        assert want in names


def test_stress_configs_differ_only_in_attention_and_name() -> None:
    a = flatten(load_config("configs/stress_160m_8k_noclip_sigmoid.yaml"))
    b = flatten(load_config("configs/stress_160m_8k_noclip_softmax.yaml"))
    assert {k for k in a if a[k] != b[k]} == {"name", "model.attention"}
    assert a["train.grad_clip"] == "0.0"


def test_overrides_apply_with_types(tmp_path: Path) -> None:
    cfg = load_config("configs/demo.yaml", ["model.attention=softmax", "train.steps=7", "data.mask_ratio=0.3"])
    assert cfg.model.attention == "softmax"
    assert cfg.train.steps == 7
    assert cfg.data.mask_ratio == pytest.approx(0.3)


def test_defaults_without_file_need_atlas() -> None:
    with pytest.raises(ConfigError, match=r"missing required value for 'data.atlas'"):
        load_config(None)
    assert load_config(None, ["data.atlas=/tmp/a"]).data.atlas == "/tmp/a"


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["model.atention=softmax"], r"unknown key 'model.atention'; allowed keys in model: preset, dim"),
        (["nosuch.key=1"], r"unknown key 'nosuch'"),
        (["train.steps=abc"], r"wrong type for 'train.steps'.*expected int"),
        (["model.qk_norm=maybe"], r"wrong type for 'model.qk_norm'"),
        (["model.attention=cosine"], r"model.attention='cosine' is not allowed; choose one of: sigmoid, softmax"),
        (["deepspeed.zero_stage=4"], r"deepspeed.zero_stage=4 is not allowed; choose one of: 0, 1, 2, 3"),
        (["train.precision=fp8"], r"train.precision='fp8' is not allowed; choose one of: auto, bf16, fp32, amp"),
        (
            ["model.compile_mode=max-autotune"],
            r"model.compile_mode='max-autotune' is not allowed; choose one of: default, max-autotune-no-cudagraphs",
        ),
        (
            ["resources.placement_strategy=spread"],
            r"resources.placement_strategy='spread' is not allowed; choose one of: PACK, SPREAD, STRICT_SPREAD",
        ),
        (["data.mask_ratio=1.5"], r"data.mask_ratio=1.5 is out of range; it must be > 0.0 and ≤ 1.0"),
        (["train.lr=0"], r"train.lr=0.0 is out of range; it must be > 0.0"),
        (["model.dim=100", "model.heads=3"], r"model.dim=100 must be divisible by model.heads=3"),
        (["cluster.target=ray"], r"cluster.address is required when cluster.target=ray"),
        (["train.betas=[0.9]"], r"train.betas=\[0.9\] must be two numbers"),
        (["attention"], r"override 'attention' must look like key=value"),
        (["=3"], r"override '=3' must look like key=value"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config("configs/demo.yaml", overrides)
    assert "\n" not in str(info.value)


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(broken)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("data:\n  atlas: x\n  max_length: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data.max_length'.*max_len"):
        load_config(unknown)


def test_round_trips() -> None:
    cfg = load_config("configs/h200_160m_8k.yaml", ["cluster.node_selector.pool=h200"])
    again = from_dict(to_dict(cfg))
    assert again == cfg
    assert "attention: sigmoid" in to_yaml(cfg)
    flat = flatten(cfg)
    assert flat["cluster.node_selector"] == "{'pool': 'h200'}"
    assert flat["data.max_len"] == "8192"


def test_use_gpu_accepts_yaml_booleans(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  atlas: a\nresources:\n  use_gpu: true\n")
    assert load_config(p).resources.use_gpu == "true"


def test_cli_error_is_one_line_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "scfm_launch", "validate", "configs/demo.yaml", "model.attention=cosine"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines == ["launch validate: error: model.attention='cosine' is not allowed; choose one of: sigmoid, softmax"]
