"""Run configuration: one YAML file per job, an OmegaConf structured config, `key=value` overrides.

`load_config("configs/demo.yaml", ["model.attention=softmax"])` returns a validated `RunConfig`. Unknown keys,
wrong types, missing required values and values outside their allowed set raise `ConfigError` with one line
naming the key and what is allowed. Each component owns one nested dataclass; every field is commented.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scfm_data_service.config import DataConfig
from scfm_platform.errors import ConfigError
from scfm_platform.eval.config import EvalConfig


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | small | base | 160m | 1b: fills dim/depth/heads/mlp_ratio left at 0
    dim: int = 0  # model width (0: from preset)
    depth: int = 0  # transformer blocks (0: from preset)
    heads: int = 0  # attention heads (0: from preset); head dim = dim / heads
    kv_heads: int = 0  # key/value heads for grouped-query attention (0: same as heads)
    mlp_ratio: float = 0.0  # MLP hidden = mlp_ratio * dim (0: from preset)
    attention: str = "sigmoid"  # sigmoid (scfm_kernels) | softmax (PyTorch SDPA)
    softmax_backend: str = "auto"  # auto | flash | cudnn | efficient | math: SDPA backend for softmax
    deterministic_attention: bool = True  # false: the sigmoid kernel's one-pass backward (dQ by atomics, GPU)
    qk_norm: bool = True  # RMS-normalise queries and keys per head (stabilises sigmoid attention)
    layer_scale: float = 0.0  # LayerScale init value on residual branches (0: off)
    value_encoding: str = "auto"  # auto | binned | continuous: how expression values enter the embedding
    objective: str = "gene"  # gene | value | both: what masked positions predict
    pooling: str = "cls"  # cls | mean: cell embedding from the CLS token or the mean of valid tokens
    dropout: float = 0.0  # dropout on attention output and MLP
    compile: bool = False  # torch.compile the model (GPU)
    # torch.compile mode: default | max-autotune-no-cudagraphs (autotunes the matmuls as Triton templates, which
    # lets the compiler fuse elementwise work such as GELU into their epilogues; compiles for minutes)
    compile_mode: str = "default"


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps in total (0: run `epochs` full epochs)
    epochs: int = 1  # used when steps == 0
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warm-up steps
    weight_decay: float = 0.05  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    grad_clip: float = 1.0  # global grad-norm clip; 0 turns clipping off (stress test)
    # auto (bf16 on GPU, fp32 on CPU) | bf16 (bf16 weights, DeepSpeed's fp32 master copy) | fp32 | amp (fp32
    # weights and optimizer, the forward under bf16 autocast: no DeepSpeed bf16 optimizer wrapper to run each step)
    precision: str = "auto"
    seed: int = 0  # seeds model init and dropout
    log_every: int = 0  # steps between reports to Ray Train (progress bar, run history); 0: time-based only
    report_every_s: float = 10.0  # seconds between those reports (MLflow gets every step regardless)
    stall_warn_s: float = 900.0  # warn once when no report has come for this long (stuck workers?); 0: never
    profile_steps: int = 0  # rank 0 profiles this many steps (0: off): kernel time by category, MLflow profile.txt
    profile_after: int = 3  # steps done before the profiled ones (compilation and autotuning stay out)
    val_every: int = 50  # steps between validation losses (0: never)
    val_batches: int = 8  # batches per validation pass
    checkpoint_every: int = 100  # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 2  # checkpoints Ray Train keeps
    divergence_factor: float = 100.0  # a grad norm above this times its running median is a spike
    divergence_patience: int = 3  # stop after this many spikes in a row (1: at the first); NaN/inf stops at once
    output_dir: str = "runs"  # local directory for checkpoints and run files
    stop_at_step: int = 0  # end this launch after this step with a checkpoint (0: run to the end); resumable
    peak_tflops: float = 0.0  # per-device peak TFLOP/s for MFU (0: known GPUs by name; CPU: nominal 1)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2  # ZeRO stage 0 | 1 | 2 | 3
    overlap_comm: bool = True  # overlap gradient reduction with backward
    reduce_bucket_size: int = 50_000_000  # elements per gradient reduce bucket
    allgather_bucket_size: int = 50_000_000  # elements per parameter all-gather bucket
    contiguous_gradients: bool = True  # copy gradients into one contiguous buffer
    offload_optimizer: bool = False  # ZeRO-Offload of optimizer state to CPU


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; None: `launch run` starts a local server (sqlite)
    experiment: str = "scfm"  # MLflow experiment name
    run_name: str | None = None  # MLflow run name (None: generated)
    local_port: int = 0  # port of the local MLflow server (0: a free port)
    local_dir: str = "mlruns"  # sqlite database and artifacts of the local server


@dataclass
class ResourcesConfig:
    num_workers: int = 1  # Ray Train workers (one per GPU on GPU nodes)
    use_gpu: str = "auto"  # auto | true | false
    cpus_per_worker: float = 1.0  # CPUs reserved per training worker
    gpus_per_worker: float = 1.0  # GPUs per worker when use_gpu
    max_failures: int = 2  # worker-failure restarts from the last checkpoint
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_SPREAD: how Ray places the workers over nodes


@dataclass
class ClusterConfig:
    target: str = "local"  # local | kubernetes | ray: where `launch submit` sends the run
    address: str | None = None  # Ray dashboard URL for target=ray (e.g. http://127.0.0.1:8265)
    namespace: str = "default"  # Kubernetes namespace
    context: str | None = None  # kubeconfig context (None: current)
    image: str = "scfm:latest"  # training image
    image_pull_policy: str = "IfNotPresent"  # Always | IfNotPresent | Never
    worker_replicas: int = 1  # GPU worker pods (nodes)
    gpus_per_node: int = 8  # nvidia.com/gpu per worker pod
    cpus_per_node: int = 32  # CPU request per worker pod
    memory_per_node: str = "256Gi"  # memory request per worker pod
    shm_size: str = "64Gi"  # /dev/shm size per pod
    node_selector: dict[str, str] = field(default_factory=dict)  # nodeSelector for worker pods
    tolerations: list[dict[str, Any]] = field(default_factory=list)  # tolerations for worker pods (as in a pod spec)
    checkpoint_pvc: str | None = None  # RWX PVC for run outputs/checkpoints (/checkpoints); None: pod scratch
    atlas_pvc: str | None = None  # PVC holding the atlas (mounted at /data); None: object-store URI
    storage_secret: str | None = None  # Secret with object-store credentials (env vars)
    mlflow: str = "deploy"  # deploy (the chart runs MLflow) | external (tracking.uri)


@dataclass
class RunConfig:
    name: str = "scfm"  # job name: Ray Train run, Kubernetes release, MLflow run prefix
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Keys whose values must come from a fixed set.
CHOICES: dict[str, tuple[Any, ...]] = {
    "data.tokenizer": ("rank", "binned"),
    "model.preset": ("tiny", "small", "base", "160m", "1b"),
    "model.attention": ("sigmoid", "softmax"),
    "model.softmax_backend": ("auto", "flash", "cudnn", "efficient", "math"),
    "model.value_encoding": ("auto", "binned", "continuous"),
    "model.objective": ("gene", "value", "both"),
    "model.pooling": ("cls", "mean"),
    "train.precision": ("auto", "bf16", "fp32", "amp"),
    "model.compile_mode": ("default", "max-autotune-no-cudagraphs"),
    "deepspeed.zero_stage": (0, 1, 2, 3),
    "resources.use_gpu": ("auto", "true", "false"),
    "resources.placement_strategy": ("PACK", "SPREAD", "STRICT_SPREAD"),
    "cluster.target": ("local", "kubernetes", "ray"),
    "cluster.image_pull_policy": ("Always", "IfNotPresent", "Never"),
    "cluster.mlflow": ("deploy", "external"),
}

# Numeric keys with bounds: (low, high, low inclusive).
RANGES: dict[str, tuple[float, float | None, bool]] = {
    "data.max_len": (2, None, True),
    "data.n_bins": (2, None, True),
    "data.tokens_per_batch": (1, None, True),
    "data.max_cells_per_batch": (1, None, True),
    "data.mask_ratio": (0.0, 1.0, False),
    "data.val_fraction": (0.0, 0.5, True),
    "data.shuffle_block_cells": (1, None, True),
    "data.bucket_window_batches": (1, None, True),
    "data.read_workers": (1, None, True),
    "model.dim": (0, None, True),
    "model.depth": (0, None, True),
    "model.heads": (0, None, True),
    "model.kv_heads": (0, None, True),
    "model.mlp_ratio": (0.0, None, True),
    "model.dropout": (0.0, 1.0, True),
    "model.layer_scale": (0.0, None, True),
    "train.steps": (0, None, True),
    "train.epochs": (1, None, True),
    "train.lr": (0.0, None, False),
    "train.min_lr_ratio": (0.0, 1.0, True),
    "train.warmup_steps": (0, None, True),
    "train.weight_decay": (0.0, None, True),
    "train.grad_clip": (0.0, None, True),
    "train.log_every": (0, None, True),
    "train.report_every_s": (0.0, None, True),
    "train.stall_warn_s": (0.0, None, True),
    "train.profile_steps": (0, None, True),
    "train.profile_after": (0, None, True),
    "train.val_every": (0, None, True),
    "train.val_batches": (1, None, True),
    "train.checkpoint_every": (0, None, True),
    "train.keep_checkpoints": (1, None, True),
    "train.divergence_factor": (1.0, None, False),
    "train.divergence_patience": (1, None, True),
    "train.stop_at_step": (0, None, True),
    "train.peak_tflops": (0.0, None, True),
    "tracking.local_port": (0, 65535, True),
    "resources.num_workers": (1, None, True),
    "resources.cpus_per_worker": (0.0, None, False),
    "resources.gpus_per_worker": (0.0, None, False),
    "resources.max_failures": (0, None, True),
    "cluster.worker_replicas": (1, None, True),
    "eval.every": (0, None, True),
    "eval.max_cells": (10, None, True),
    "cluster.gpus_per_node": (0, None, True),
    "cluster.cpus_per_node": (1, None, True),
}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config, apply `key=value` overrides, and validate it; raises ConfigError."""
    schema = OmegaConf.structured(RunConfig)
    try:
        merged = schema
        if path is not None:
            merged = OmegaConf.merge(merged, _read_yaml(Path(path)))
        if overrides:
            merged = OmegaConf.merge(merged, _parse_overrides(overrides))
        OmegaConf.resolve(merged)
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"missing required value for '{missing[0]}': set it in the YAML or as {missing[0]}=...")
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # odd values OmegaConf does not wrap
        raise ConfigError(f"invalid config value: {_first_line(e)}") from None
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Check allowed values, ranges and cross-field rules; raises ConfigError naming the key."""
    cfg.resources.use_gpu = str(cfg.resources.use_gpu).lower()  # YAML true/false arrive as "True"/"False"
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}")
    for key, (low, high, inclusive) in RANGES.items():
        value = _get(cfg, key)
        too_low = value < low if inclusive else value <= low
        if too_low or (high is not None and value > high) or value != value:  # value != value: NaN
            bound = f"≥ {low}" if inclusive else f"> {low}"
            bound += f" and ≤ {high}" if high is not None else ""
            raise ConfigError(f"{key}={value!r} is out of range; it must be {bound}")
    m = cfg.model
    if m.dim and m.heads and m.dim % m.heads:
        raise ConfigError(f"model.dim={m.dim} must be divisible by model.heads={m.heads}")
    if m.heads and m.kv_heads and m.heads % m.kv_heads:
        raise ConfigError(f"model.heads={m.heads} must be divisible by model.kv_heads={m.kv_heads}")
    if len(cfg.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.train.betas):
        raise ConfigError(f"train.betas={list(cfg.train.betas)} must be two numbers in [0, 1)")
    if cfg.cluster.target == "ray" and cfg.cluster.address is None:
        raise ConfigError("cluster.address is required when cluster.target=ray (e.g. http://127.0.0.1:8265)")
    if cfg.cluster.mlflow == "external" and cfg.cluster.target == "kubernetes" and not cfg.tracking.uri:
        raise ConfigError("tracking.uri is required when cluster.mlflow=external")


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (what `launch validate` prints and MLflow stores)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The resolved config as plain nested dicts (picklable for Ray workers)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(d: dict[str, Any]) -> RunConfig:
    """Inverse of `to_dict`, validated."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), d))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    validate(cfg)  # type: ignore[arg-type]
    return cfg  # type: ignore[return-value]


def flatten(cfg: RunConfig) -> dict[str, str]:
    """`{"model.attention": "sigmoid", ...}` for MLflow params."""
    out: dict[str, str] = {}

    def walk(obj: Any, prefix: str) -> None:
        if is_dataclass(obj):
            for f in fields(obj):
                walk(getattr(obj, f.name), f"{prefix}{f.name}.")
        else:
            out[prefix[:-1]] = str(obj)

    walk(cfg, "")
    return out


# Keys whose values are secrets (matched on `_`/`.`/`-`-separated parts of the key, so `data.tokens` is not one).
SECRET_KEY = re.compile(
    r"(^|[._-])(password|passwd|secret|token|api_key|apikey|access_key|credentials?)([._-]|$)", re.IGNORECASE
)
_URI_USERINFO = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
MASK = "***"


def redact_uri(text: str) -> str:
    """`https://user:pw@host/x` → `https://***@host/x` (anywhere in `text`)."""
    return _URI_USERINFO.sub(rf"\1{MASK}@", text)


def redacted(flat: dict[str, Any]) -> dict[str, Any]:
    """A copy of a flat or nested config dict with secret-looking keys masked and URI credentials stripped."""
    out: dict[str, Any] = {}
    for k, v in flat.items():
        if isinstance(v, dict):
            out[k] = redacted(v)
        elif SECRET_KEY.search(str(k)) and v not in (None, "", "None"):
            out[k] = MASK
        elif isinstance(v, str):
            out[k] = redact_uri(v)
        elif isinstance(v, list):
            out[k] = [redact_uri(x) if isinstance(x, str) else x for x in v]
        else:
            out[k] = v
    return out


def redacted_yaml(cfg: RunConfig) -> str:
    """`to_yaml(cfg)` with secrets masked: what `launch validate` prints and MLflow stores."""
    return OmegaConf.to_yaml(OmegaConf.create(redacted(to_dict(cfg))))


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path} is not valid YAML: {first}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path} must hold a mapping of sections (data:, model:, ...), not a list")
    return loaded


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} must look like key=value, e.g. model.attention=softmax")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(_describe(e)) from None
    except Exception as e:  # YAML errors in a value come in many types
        raise ConfigError(f"override value is not valid YAML ({_first_line(e)}) in: {' '.join(overrides)!r}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return " ".join(text.split("\n")[0].split()) if text else type(e).__name__


def _describe(e: OmegaConfBaseException) -> str:
    key = str(getattr(e, "full_key", None) or "").replace("\n", "\\n")
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    name = type(e).__name__
    if name == "ConfigKeyError" or "not in struct" in msg:
        section = key.rpartition(".")[0]
        allowed = _allowed_keys(section)
        return f"unknown key '{key}'; allowed keys{' in ' + section if section else ''}: {', '.join(allowed)}"
    if name in ("ValidationError", "ConfigTypeError", "ConfigValueError"):
        want = _field_type(key)
        return f"wrong type for '{key}': {msg}" + (f"; expected {want}" if want else "")
    if name == "MissingMandatoryValue":
        return f"missing required value for '{key}'"
    return f"{key + ': ' if key else ''}{msg}"


def _section_class(section: str) -> Any:
    cls: Any = RunConfig
    for part in [p for p in section.split(".") if p]:
        match = [f for f in fields(cls) if f.name == part]
        if not match or not is_dataclass(match[0].default_factory()):  # type: ignore[misc]
            return None
        cls = type(match[0].default_factory())  # type: ignore[misc]
    return cls


def _allowed_keys(section: str) -> list[str]:
    cls = _section_class(section)
    return [f.name for f in fields(cls)] if cls is not None else []


def _field_type(key: str) -> str:
    section, _, leaf = key.rpartition(".")
    cls = _section_class(section)
    if cls is None:
        return ""
    for f in fields(cls):
        if f.name == leaf:
            return str(f.type)
    return ""


def _get(cfg: RunConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


__all__ = [
    "MISSING",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "EvalConfig",
    "ModelConfig",
    "ResourcesConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "redact_uri",
    "redacted",
    "redacted_yaml",
    "to_dict",
    "to_yaml",
]
