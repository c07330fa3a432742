"""A follower process of a multi-host server: everything process 1..N-1 does.

Only process 0 (the leader) runs the engine, the tokenizer and the HTTP server. Every other process loads
the same model into its share of the mesh and runs the steps the leader broadcasts
(`jaxserve.worker.distributed.StepChannel`) until the leader says STOP.
"""

from __future__ import annotations

import logging

import jax

from jaxserve.config import EngineConfig
from jaxserve.model_registry import resolve_engine_model
from jaxserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def run_follower(config: EngineConfig) -> int:
    """A follower process's whole life: load the model, then run the leader's steps until it says STOP."""
    runner = ModelRunner(config, resolve_engine_model(config))
    logger.info("follower %d ready; running the leader's steps", jax.process_index())
    runner.follow()
    logger.info("follower %d: the leader stopped", jax.process_index())
    return 0
