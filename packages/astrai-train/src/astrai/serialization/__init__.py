"""Training checkpoints: atomic folders of safetensors weights, optimizer/scheduler/sampler/RNG state and
the run's config, plus the run's `latest` pointer."""

from astrai.serialization.checkpoint import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    META_FILE,
    MODEL_CONFIG_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    checkpoint_dir,
    clear_checkpoints,
    latest_checkpoint,
    mark_latest,
    prune_checkpoints,
    step_checkpoints,
)
from astrai.serialization.rng_state import get_rng_state, set_rng_state

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "META_FILE",
    "MODEL_CONFIG_FILE",
    "WEIGHTS_FILE",
    "Checkpoint",
    "checkpoint_dir",
    "clear_checkpoints",
    "get_rng_state",
    "latest_checkpoint",
    "mark_latest",
    "prune_checkpoints",
    "set_rng_state",
    "step_checkpoints",
]
