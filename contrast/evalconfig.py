"""The typed configuration of an evaluation run (``main_linear.py``: linear probe or fine-tuning).

Built once from the parsed flags (:func:`contrast.option_eval.eval_config`); the entry script
hands each layer the group it needs. Its dump has the versioned form of
:mod:`contrast.runconfig` (``config_version``; sections ``data``, ``method``, ``optim``, ``loop``,
``runtime``, ``run``), so ``config.json`` of an evaluation run fed back with ``--config`` sets every
flag, and :func:`~contrast.runconfig.load_run_config` reads it like a pretraining run's.
"""
from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional, Tuple

from contrast.runconfig import CONFIG_VERSION, FACTS, VERSION_KEY, LoopConfig, RuntimeConfig

LINEAR, FINETUNE = "linear", "finetune"


@dataclass(frozen=True)
class DatasetConfig:
    """Where the splits are, how they are read, the evaluation transform's size and crop."""

    data_dir: str
    zip: bool
    cache_mode: str
    strict_data: bool
    index_dir: Optional[str]
    image_size: Optional[int]
    val_crop_fraction: Optional[float]
    num_workers: int


@dataclass(frozen=True)
class EvalDataConfig(DatasetConfig):
    """Dataset, loader, augmentation and label-subset flags."""

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
    linear_feature: Optional[str] = None
    drop_path: Optional[float] = None

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
    layer_decay: Optional[float] = None
    label_smoothing: Optional[float] = None


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

    def with_defaults(self, values: Mapping[str, Any]) -> "EvalRunConfig":
        """This config with each field still None (not given) in the model, optim and loop groups set
        from ``values`` (field name -> value; the protocol defaults)."""
        groups = {}
        for name in ("model", "optim", "loop"):
            group = getattr(self, name)
            unset = {f.name: values[f.name] for f in fields(group)
                     if f.name in values and getattr(group, f.name) is None}
            groups[name] = replace(group, **unset)
        return replace(self, **groups)


def eval_groups_from_flags(flags: Mapping[str, Any]) -> EvalRunConfig:
    """The :class:`EvalRunConfig` of parsed flags (``vars(args)``)."""
    return EvalRunConfig(**{"model" if section == "method" else section: _group(cls, flags)
                            for section, cls in EVAL_GROUPS.items()})


def dump_eval_config(cfg: EvalRunConfig, **facts: Any) -> Dict[str, Any]:
    """The versioned, JSON-ready dump of ``cfg`` plus the run's ``facts``."""
    out: Dict[str, Any] = {VERSION_KEY: CONFIG_VERSION}
    for section in EVAL_GROUPS:
        group = getattr(cfg, "model" if section == "method" else section)
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(group).items()}
    out[FACTS] = dict(facts)
    return out


@dataclass(frozen=True)
class FeatureDataConfig(DatasetConfig):
    """``main_knn.py``: the dataset, the evaluation transform, the loader and the probe's label subset."""

    batch_size: int
    label_fraction: Optional[float]
    label_subset: Optional[str]


@dataclass(frozen=True)
class EncoderConfig:
    """``main_knn.py``: what encodes the images (a checkpoint's backbone, a random-init one, the pixels)."""

    pretrained_model: str
    random_init: bool
    raw_pixels: bool
    arch: Optional[str]
    stem: Optional[str]
    patch_size: int = 16
    feature: Optional[str] = None


@dataclass(frozen=True)
class KnnConfig:
    """Weighted kNN: neighbours (several share one extraction), temperature, queries per block."""

    knn_k: Tuple[int, ...]
    knn_t: float
    chunk_size: int


@dataclass(frozen=True)
class CachedProbeConfig:
    """The linear classifier on cached features (``--linear-cached``)."""

    linear_cached: bool
    linear_aug_copies: int
    linear_crop: float
    linear_epochs: int
    linear_lr: float
    linear_batch_size: int
    linear_wd: float


@dataclass(frozen=True)
class FeatureRunConfig:
    """Output, device and seed of ``main_knn.py``."""

    output_dir: Optional[str]
    output_json: str
    save_features: str
    name: str
    device: str
    seed: int
    local_rank: int
    debug: bool


@dataclass(frozen=True)
class KnnRunConfig:
    """Every setting of ``main_knn.py``, by concern (see :data:`KNN_GROUPS`)."""

    data: FeatureDataConfig
    encoder: EncoderConfig
    knn: KnnConfig
    probe: CachedProbeConfig
    runtime: FeatureRunConfig


KNN_GROUPS = {"data": FeatureDataConfig, "encoder": EncoderConfig, "knn": KnnConfig, "probe": CachedProbeConfig,
              "runtime": FeatureRunConfig}


def knn_groups_from_flags(flags: Mapping[str, Any]) -> KnnRunConfig:
    """The :class:`KnnRunConfig` of parsed ``main_knn.py`` flags (``vars(args)``)."""
    return KnnRunConfig(**{name: _group(cls, flags) for name, cls in KNN_GROUPS.items()})


def _group(cls, flags: Mapping[str, Any]):
    """``cls`` filled from the flags of its field names (lists become tuples: the groups are frozen); a
    field with a default that the entry script has no flag for (a pretraining-only setting of a shared
    group, such as ``wandb``) keeps its default."""
    values = {f.name: flags[f.name] for f in fields(cls) if f.name in flags or f.default is MISSING}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
