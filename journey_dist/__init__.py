"""journey-dist: from tokens to data-, tensor- and pipeline-parallel GPT training."""

from journey_dist.config import ConfigError, GPTConfig, ParallelConfig, get_preset
from journey_dist.model import GPT

__all__ = ["GPT", "ConfigError", "GPTConfig", "ParallelConfig", "get_preset"]
__version__ = "0.1.0"
