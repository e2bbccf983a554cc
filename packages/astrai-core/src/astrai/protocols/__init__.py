"""Structural interfaces shared across distributions (no torch import needed to name them)."""

from astrai.protocols.kv_cache import KVCacheView
from astrai.protocols.optim import OptimizerProtocol, SchedulerProtocol

__all__ = ["KVCacheView", "OptimizerProtocol", "SchedulerProtocol"]
