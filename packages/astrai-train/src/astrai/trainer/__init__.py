"""Training: strategies (SEQ/SFT/DPO/GRPO), the Trainer and its callbacks, executors (none/DDP/FSDP) with
gradient accumulation, LoRA, mixed precision, LR schedules and the Muon optimizer."""

from astrai.trainer.accumulation import AccumOptimizer, AccumScheduler, GradientState
from astrai.trainer.callback import (
    CallbackFactory,
    GradientCheckpointingCallback,
    GradientClippingCallback,
    ProgressBarCallback,
    TrainCallback,
    ValidationCallback,
)
from astrai.trainer.checkpoint_callback import CheckpointCallback
from astrai.trainer.context import TrainContext, TrainContextBuilder
from astrai.trainer.dpo import DPO_LOSS_TYPES, DPOStrategy, dpo_loss, sequence_log_probs
from astrai.trainer.executor import (
    BaseExecutor,
    DDPExecutor,
    ExecutorFactory,
    FSDPExecutor,
    NoneExecutor,
    unwrap,
)
from astrai.trainer.grpo import GRPO_REDUCTIONS, GRPOStrategy, group_advantages
from astrai.trainer.log_probs import completion_log_probs, model_logits, token_log_probs
from astrai.trainer.lora import (
    adapters_disabled,
    apply_lora,
    has_lora,
    load_lora,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    save_lora,
)
from astrai.trainer.metric_logger import METRICS_FILE, MetricLoggerCallback, gradient_statistics, read_metrics
from astrai.trainer.muon import Muon, adjusted_lr, muon_param_groups, zeropower_via_newtonschulz5
from astrai.trainer.optimizer_fn import OptimizerFn, SchedulerFn
from astrai.trainer.plot import find_metrics, plot_loss
from astrai.trainer.precision import MixedPrecision
from astrai.trainer.reference import ReferenceModel, frozen_copy
from astrai.trainer.run_file import build_model, build_train_config, read_run_file
from astrai.trainer.schedule import (
    BaseScheduler,
    CosineScheduler,
    SchedulerFactory,
    SGDRScheduler,
    WSDScheduler,
)
from astrai.trainer.strategy import IGNORE_INDEX, BaseStrategy, SEQStrategy, SFTStrategy, StrategyFactory, batch_size
from astrai.trainer.trainer import Trainer

__all__ = [
    "AccumOptimizer",
    "AccumScheduler",
    "BaseExecutor",
    "BaseScheduler",
    "BaseStrategy",
    "CallbackFactory",
    "CheckpointCallback",
    "CosineScheduler",
    "DDPExecutor",
    "DPOStrategy",
    "DPO_LOSS_TYPES",
    "ExecutorFactory",
    "FSDPExecutor",
    "GRPOStrategy",
    "GRPO_REDUCTIONS",
    "GradientCheckpointingCallback",
    "GradientClippingCallback",
    "GradientState",
    "IGNORE_INDEX",
    "METRICS_FILE",
    "MetricLoggerCallback",
    "MixedPrecision",
    "Muon",
    "NoneExecutor",
    "OptimizerFn",
    "ProgressBarCallback",
    "ReferenceModel",
    "SEQStrategy",
    "SFTStrategy",
    "SGDRScheduler",
    "SchedulerFactory",
    "SchedulerFn",
    "StrategyFactory",
    "TrainCallback",
    "TrainContext",
    "TrainContextBuilder",
    "Trainer",
    "ValidationCallback",
    "WSDScheduler",
    "adapters_disabled",
    "adjusted_lr",
    "apply_lora",
    "batch_size",
    "build_model",
    "build_train_config",
    "completion_log_probs",
    "dpo_loss",
    "find_metrics",
    "frozen_copy",
    "gradient_statistics",
    "group_advantages",
    "has_lora",
    "load_lora",
    "load_lora_state_dict",
    "lora_state_dict",
    "merge_lora",
    "model_logits",
    "muon_param_groups",
    "plot_loss",
    "read_metrics",
    "read_run_file",
    "save_lora",
    "sequence_log_probs",
    "token_log_probs",
    "unwrap",
    "zeropower_via_newtonschulz5",
]
