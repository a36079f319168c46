"""Checkpointing, in one component: the atomic checkpoint folder (``folder``) and the sharded, reshardable
DCP part of it (``sharded``). Callers use ``from scalelab import checkpoint as ckpt``."""

from scalelab.checkpoint.folder import (
    META_FILE,
    MODEL_FILE,
    SHARDED_DIR,
    STATE_FILE,
    checkpoint_step,
    discard_checkpoints_after,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    load_train_state,
    load_weights_into,
    model_config_from,
    model_state_for_saving,
    prune_checkpoints,
    read_safetensors,
    remove_run_folder,
    save_checkpoint,
    save_weights,
    verify_checkpoint,
)
from scalelab.checkpoint.sharded import full_model_state, load_dcp, load_full, load_into, save_dcp, write_shards

__all__ = [
    "META_FILE", "MODEL_FILE", "SHARDED_DIR", "STATE_FILE", "checkpoint_step", "discard_checkpoints_after",
    "full_model_state", "latest_checkpoint", "list_checkpoints", "load_dcp", "load_full", "load_into",
    "load_model", "load_train_state", "load_weights_into", "model_config_from", "model_state_for_saving",
    "prune_checkpoints", "read_safetensors", "remove_run_folder", "save_checkpoint", "save_dcp",
    "save_weights", "verify_checkpoint", "write_shards",
]
