"""The typed configuration of an evaluation run (``main_linear.py``: linear probe or fine-tuning).

Built once from the parsed flags (:func:`contrast.option_eval.eval_config`); the entry script
hands each layer the group it needs. Its dump has the versioned form of
:mod:`contrast.runconfig` (``config_version``; sections ``data``, ``method``, ``optim``, ``loop``,
``runtime``, ``run``), so ``config.json`` of an evaluation run fed back with ``--config`` sets every
flag, and :func:`~contrast.runconfig.load_run_config` reads it like a pretraining run's.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

from contrast.runconfig import CONFIG_VERSION, FACTS, VERSION_KEY, LoopConfig, RuntimeConfig

LINEAR, FINETUNE = "linear", "finetune"


@dataclass(frozen=True)
class EvalDataConfig:
    """Dataset, loader, augmentation and label-subset flags."""

    data_dir: str
    zip: bool
    cache_mode: str
    strict_data: bool
    index_dir: Optional[str]
    image_size: Optional[int]
    val_crop_fraction: Optional[float]
    num_workers: int
    total_batch_size: int
    aug: str
    crop: float
    plain_aug: bool
    label_fraction: Optional[float]
    label_subset: Optional[str]


@dataclass(frozen=True)
class EvalModelConfig:
    """What is evaluated and how: the backbone's source, its architecture, the protocol."""

    finetune: bool
    pretrained_model: str
    random_init: bool
    arch: Optional[str]
    stem: Optional[str]
    sync_bn: bool
    eval: bool

    @property
    def mode(self) -> str:
        return FINETUNE if self.finetune else LINEAR


@dataclass(frozen=True)
class EvalOptimConfig:
    """Optimiser, lr and its schedule, precision."""

    learning_rate: float
    lr_scaling: str
    optimizer: str
    momentum: float
    nesterov: bool
    weight_decay: float
    lr_scheduler: str
    cosine_form: str
    warmup_epoch: int
    warmup_multiplier: float
    lr_decay_epochs: Tuple[int, ...]
    lr_decay_rate: float
    amp_opt_level: str


#: section name -> group class (``method`` holds :class:`EvalModelConfig`).
EVAL_GROUPS = {"data": EvalDataConfig, "method": EvalModelConfig, "optim": EvalOptimConfig, "loop": LoopConfig,
               "runtime": RuntimeConfig}


@dataclass(frozen=True)
class EvalRunConfig:
    """Every setting of an evaluation run, by concern."""

    data: EvalDataConfig
    model: EvalModelConfig
    optim: EvalOptimConfig
    loop: LoopConfig
    runtime: RuntimeConfig

    def with_backbone(self, arch: str, stem: str, image_size: int, val_crop_fraction: float) -> "EvalRunConfig":
        """This config with the backbone and image settings resolved (from a checkpoint or defaults)."""
        return replace(self, model=replace(self.model, arch=arch, stem=stem),
                       data=replace(self.data, image_size=image_size, val_crop_fraction=val_crop_fraction))


def eval_groups_from_flags(flags: Mapping[str, Any]) -> EvalRunConfig:
    """The :class:`EvalRunConfig` of parsed flags (``vars(args)``)."""
    groups = {}
    for section, cls in EVAL_GROUPS.items():
        values = {f.name: flags[f.name] for f in fields(cls)}
        if cls is EvalOptimConfig:
            values["lr_decay_epochs"] = tuple(values["lr_decay_epochs"])
        groups["model" if section == "method" else section] = cls(**values)
    return EvalRunConfig(**groups)


def dump_eval_config(cfg: EvalRunConfig, **facts: Any) -> Dict[str, Any]:
    """The versioned, JSON-ready dump of ``cfg`` plus the run's ``facts``."""
    out: Dict[str, Any] = {VERSION_KEY: CONFIG_VERSION}
    for section in EVAL_GROUPS:
        group = getattr(cfg, "model" if section == "method" else section)
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(group).items()}
    out[FACTS] = dict(facts)
    return out
