"""Checkpoints: every file a run writes to resume or to hand its weights on, and the only code
that knows their format.

* :mod:`~contrast.checkpoint.files`: names, atomic writes, manifests with SHA-256 and their
  verification, recovery of an output folder, the save hooks tests inject faults through;
* :mod:`~contrast.checkpoint.format`: the format version, the entries of a file, migrations;
* :mod:`~contrast.checkpoint.state`: saving, reading and restoring a training run;
* :mod:`~contrast.checkpoint.resume`: which checkpoint a run resumes, epoch checkpoints.
"""
from contrast.checkpoint.files import (CURRENT, EPOCH_PREFIX, MANIFEST_SUFFIX, CheckpointError, CheckpointSaveError,
                                       FileRecord, SaveHooks, atomic_save, checkpoint_files, file_digest, load_file,
                                       manifest_path, read_manifest, recover_output_dir, set_save_hooks, shard_path,
                                       verify_files)
from contrast.checkpoint.format import FINETUNE, LINEAR, MIGRATIONS, PRETRAIN, VERSION, Record, migrate, strip_prefix
from contrast.checkpoint.resume import (ResumeChoice, choose_resume, copy_checkpoint, epoch_checkpoints,
                                        prune_epoch_checkpoints, remove_checkpoint, set_aside)
from contrast.checkpoint.state import (Checkpoint, describe_config, extract_backbone, list_state_differences,
                                       load_model_state, load_shards, read_checkpoint, restore_training_state,
                                       rng_state, save_training_checkpoint, set_rng_state,
                                       write_pretrained_checkpoint)

__all__ = ["CURRENT", "EPOCH_PREFIX", "MANIFEST_SUFFIX", "CheckpointError", "CheckpointSaveError", "FileRecord",
           "SaveHooks", "atomic_save", "checkpoint_files", "file_digest", "load_file", "manifest_path",
           "read_manifest", "recover_output_dir", "set_save_hooks", "shard_path", "verify_files", "FINETUNE", "LINEAR",
           "MIGRATIONS", "PRETRAIN", "VERSION", "Record", "migrate", "strip_prefix", "ResumeChoice", "choose_resume",
           "copy_checkpoint", "epoch_checkpoints", "prune_epoch_checkpoints", "remove_checkpoint", "set_aside",
           "Checkpoint", "describe_config", "extract_backbone", "list_state_differences", "load_model_state",
           "load_shards", "read_checkpoint", "restore_training_state", "rng_state", "save_training_checkpoint",
           "set_rng_state", "write_pretrained_checkpoint"]
