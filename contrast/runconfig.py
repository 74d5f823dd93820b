"""The typed run configuration: one frozen group per concern, its versioned dump and its reader.

``contrast.option.run_config`` builds a :class:`RunConfig` once from the parsed flags; the entry
scripts hand each layer the group it needs. ``config.json`` and the ``config`` of every checkpoint
are :func:`dump_run_config`'s form::

    {"config_version": 2, "data": {...}, "method": {...}, "optim": {...}, "loop": {...},
     "eval": {...}, "runtime": {...}, "run": {...}}

Every section but ``run`` maps flag names (argparse ``dest``) to values, so the file fed back with
``--config`` sets every flag; ``run`` holds facts of the run (world size, device, effective lr,
loop epochs, ...). :func:`load_run_config` reads either this form or the flat ``vars(args)`` dicts
that older runs wrote (version 1), which it migrates; :func:`flat_config` and
:func:`config_value` read a field from either form.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from contrast.config import MethodConfig

CONFIG_VERSION = 2
VERSION_KEY = "config_version"
FACTS = "run"


@dataclass(frozen=True)
class DataConfig:
    """Dataset, augmentation, multi-crop, sampler and loader flags."""

    data_dir: str
    zip: bool
    cache_mode: str
    strict_data: bool
    index_dir: Optional[str]
    image_size: int
    val_crop_fraction: float
    num_workers: int
    batch_size: int
    aug: str
    crop: float
    plain_aug: bool
    num_crop: int
    image_size2: int
    crop2: float
    num_crop2: int
    use_sliding_window_sampler: bool
    window_size: int
    window_stride: int
    shuffle_per_epoch: bool


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, lr schedule and precision flags."""

    base_learning_rate: float
    lr_scaling: str
    optimizer: str
    weight_decay: float
    momentum: float
    lars_form: str
    lars_trust_coefficient: float
    lars_eps: Optional[float]
    lr_scheduler: str
    cosine_form: str
    warmup_epoch: int
    warmup_multiplier: float
    lr_decay_epochs: Tuple[int, ...]
    lr_decay_rate: float
    amp_opt_level: str
    weight_decay_end: Optional[float] = None
    clip_grad: float = 0.0


@dataclass(frozen=True)
class LoopConfig:
    """Epochs, logging, divergence handling, checkpoints and resume."""

    epochs: int
    start_epoch: int
    print_freq: int
    max_nonfinite: int
    on_divergence: str
    rollback_lr_factor: float
    save_freq: int
    keep_last: int
    save_every_minutes: float
    auto_resume: bool
    resume: str
    restart: bool
    allow_batch_change: bool


@dataclass(frozen=True)
class EvalConfig:
    """The kNN monitor, the online probe (None: on when the data has labels) and the collapse monitors."""

    knn_monitor: bool
    knn_freq: int
    knn_k: int
    knn_t: float
    online_probe: Optional[bool] = None
    online_probe_lr: float = 0.1
    monitor_collapse: bool = True
    monitor_collapse_freq: int = 50


@dataclass(frozen=True)
class RuntimeConfig:
    """Output folder, device, seed, launcher and kernel choices."""

    output_dir: str
    device: str
    seed: int
    local_rank: int
    debug: bool
    tensorboard: bool
    channels_last: bool
    compile: bool
    deterministic: bool
    wandb: bool = False
    wandb_project: str = "contrast"


GROUPS = {"data": DataConfig, "optim": OptimConfig, "loop": LoopConfig, "eval": EvalConfig,
          "runtime": RuntimeConfig}
#: The method section's shared flags (a method's own flags join them); MethodConfig field -> flag.
METHOD_FLAGS = {"name": "model", "feature_dim": "feature_dim", "mlp_head": "mlp_head",
                "head_hidden_dim": "mlp_hidden_dim", "temperature": "contrast_temperature",
                "momentum": "contrast_momentum", "num_negative": "contrast_num_negative",
                "view_batching": "view_batching"}
BACKBONE_FLAGS = ("arch", "stem", "zero_init_residual", "patch_size", "drop_path", "global_pool",
                  "freeze_patch_embed")
#: Flags of main_linear.py that the pretraining groups do not have (their sections in contrast/evalconfig.py).
LINEAR_FLAGS = {"pretrained_model": "method", "total_batch_size": "data", "learning_rate": "optim",
                "eval": "method", "finetune": "method", "random_init": "method", "sync_bn": "method",
                "nesterov": "optim", "label_fraction": "data", "label_subset": "data", "linear_feature": "method"}
#: Facts a run records beside its flags (the ``run`` section).
RUN_FACTS = ("world_size", "effective_lr", "num_instances", "loop_epochs", "iters_per_epoch",
             "warmup_loop_epochs", "decay_loop_epochs", "total_batch", "per_process_batch")
SECTIONS = ("data", "method", "optim", "loop", "eval", "runtime", FACTS)


def _section_of() -> Dict[str, str]:
    table = {f.name: name for name, cls in GROUPS.items() for f in fields(cls)}
    table.update({flag: "method" for flag in (*METHOD_FLAGS.values(), *BACKBONE_FLAGS)})
    table.update(LINEAR_FLAGS)
    return table


SECTION_OF = _section_of()


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a pretraining run, by concern; ``method`` is the method's typed config."""

    data: DataConfig
    method: MethodConfig
    optim: OptimConfig
    loop: LoopConfig
    eval: EvalConfig
    runtime: RuntimeConfig

    @property
    def model(self) -> str:
        return self.method.name

    def for_world_size(self, world_size: int, peak_lr: float) -> "RunConfig":
        """This config for ``world_size`` processes (the method's total batch and peak lr)."""
        method = replace(self.method, total_batch_size=self.data.batch_size * world_size, peak_lr=peak_lr)
        return replace(self, method=method)


def groups_from_flags(flags: Mapping[str, Any]) -> Dict[str, Any]:
    """The non-method groups of :class:`RunConfig` from parsed flags (``vars(args)``)."""
    out = {}
    for name, cls in GROUPS.items():
        values = {f.name: flags[f.name] for f in fields(cls)}
        if name == "optim":
            values["lr_decay_epochs"] = tuple(values["lr_decay_epochs"])
        out[name] = cls(**values)
    return out


def method_flags(method: MethodConfig) -> Dict[str, Any]:
    """The flag values a :class:`MethodConfig` was built from (the ``method`` section)."""
    values = {flag: getattr(method, field) for field, flag in METHOD_FLAGS.items()}
    values.update({name: getattr(method.backbone, name) for name in BACKBONE_FLAGS})
    values.update(method.options)
    return values


def dump_run_config(cfg: RunConfig, **facts: Any) -> Dict[str, Any]:
    """The versioned, JSON-ready dump of ``cfg`` plus the run's ``facts``."""
    out: Dict[str, Any] = {VERSION_KEY: CONFIG_VERSION}
    for name in GROUPS:
        out[name] = _plain(asdict(getattr(cfg, name)))
    out["method"] = _plain(method_flags(cfg.method))
    out[FACTS] = _plain(facts)
    return {k: out[k] for k in (VERSION_KEY, *SECTIONS)}


def _plain(values: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


def add_facts(config: Mapping[str, Any], **facts: Any) -> Dict[str, Any]:
    """``config`` (either form) in the current form with ``facts`` added to its ``run`` section."""
    out = load_run_config(config)
    out[FACTS] = {**out.get(FACTS, {}), **_plain(facts)}
    return out


def is_grouped(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` has the grouped form (a version key, or a section holding a mapping)."""
    return VERSION_KEY in config or any(k in SECTIONS and isinstance(v, Mapping) for k, v in config.items())


def migrate(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """A version-1 (flat ``vars(args)`` + facts) config in the current form: each flag to its
    section, the known facts to ``run``, any other key (a method's own flag) to ``method``."""
    out: Dict[str, Any] = {VERSION_KEY: CONFIG_VERSION, **{name: {} for name in SECTIONS}}
    for key, value in flat.items():
        section = FACTS if key in RUN_FACTS else SECTION_OF.get(key, "method")
        out[section][key] = value
    return out


def load_run_config(source: Union[str, os.PathLike, Mapping[str, Any], None]) -> Dict[str, Any]:
    """A run's configuration in the current grouped form, from a ``config.json`` path, a dict of
    either form (a checkpoint's ``config``), an ``argparse.Namespace`` (old checkpoints) or None.
    ``ValueError`` names a file of another format or a newer version."""
    where = ""
    if source is None:
        return migrate({})
    if isinstance(source, (str, os.PathLike)):
        where = f"{source}: "
        source = read_file(str(source))
    if not isinstance(source, Mapping):
        source = vars(source)
    if not is_grouped(source):
        return migrate(source)
    version = source.get(VERSION_KEY, CONFIG_VERSION)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ValueError(f"{where}config_version {version!r} is newer than this contrast reads ({CONFIG_VERSION})")
    unknown = [k for k in source if k not in (VERSION_KEY, *SECTIONS)]
    if unknown:
        raise ValueError(f"{where}unknown section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
    return {VERSION_KEY: CONFIG_VERSION, **{name: dict(source.get(name) or {}) for name in SECTIONS}}


def read_file(path: str) -> Dict[str, Any]:
    """A JSON or YAML (``.yaml``/``.yml``) mapping; ``ValueError`` names the file."""
    try:
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml
                data = yaml.safe_load(f)
            else:
                data = json.load(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:   # json.JSONDecodeError
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except Exception as e:   # yaml.YAMLError
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: holds a {type(data).__name__}, not a mapping of settings")
    return data


def flat_config(config: Union[Mapping[str, Any], None]) -> Dict[str, Any]:
    """Every field of a config of either form in one dict (the ``run`` facts win, as in version 1)."""
    grouped = load_run_config(config)
    return {k: v for name in SECTIONS for k, v in grouped[name].items()}


def config_value(config: Union[Mapping[str, Any], None], name: str, default: Any = None) -> Any:
    """Field ``name`` of a config of either form (``default`` when absent)."""
    return flat_config(config).get(name, default)


def settings(config: Mapping[str, Any]) -> List[Tuple[str, str, Any]]:
    """The (section, flag, value) settings of a config of either form: every field but the facts."""
    grouped = load_run_config(config)
    return [(name, k, v) for name in SECTIONS if name != FACTS for k, v in grouped[name].items()]
