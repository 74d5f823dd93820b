"""Evaluation beyond the linear protocol: weighted kNN (InstDisc), the online kNN monitor,
cached-feature linear evaluation, and sharded frozen-feature extraction."""
from contrast.eval.features import (ShardSampler, backbone_spec, build_eval_loader, extract_features,
                                    backbone_from_checkpoint)
from contrast.eval.knn import KNNMonitor, knn_evaluate, knn_predict, knn_predict_multi, topk_accuracy
from contrast.eval.linear_cached import build_probe, train_linear_cached

__all__ = ["ShardSampler", "backbone_spec", "build_eval_loader", "extract_features", "backbone_from_checkpoint",
           "KNNMonitor", "knn_evaluate", "knn_predict", "knn_predict_multi", "topk_accuracy", "build_probe",
           "train_linear_cached"]
