"""Multi-host serving: `jax.distributed` start-up, and process 0 broadcasting each step's inputs to the others.

Every process builds the same mesh over all devices of all processes and runs the same jitted step (JAX is
multi-controller: each process launches the program on its own devices, and the collectives join them).
Only process 0 (the leader) runs the scheduler, the tokenizer and the HTTP server; it hands each step's
host inputs to `StepChannel.send`, which broadcasts them; every other process (a follower) sits in
`ModelRunner.follow()` (started by `jaxserve.follower`), receiving those inputs and running the same step,
until the leader sends STOP.

A step is two broadcasts: a fixed-size header (command, the step's static fields, every leaf's shape), so
the followers can build placeholders of the right shapes, then the arrays themselves.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxserve.config import EngineConfig

logger = logging.getLogger(__name__)

STEP, STOP = 1, 2
_MAX_DIMS = 2  # every leaf of (StepInputs, SamplingMetadata) is 1-d or 2-d


def initialize(config: EngineConfig) -> None:
    """Starts `jax.distributed` when `config.distributed` (idempotent). Call before anything else touches JAX.

    Flags win; else $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID; else JAX's own cluster
    detection (TPU VM slices, SLURM, Open MPI, ...).
    """
    if not config.distributed or jax.distributed.is_initialized():
        return

    def env_int(name):
        return int(os.environ[name]) if os.environ.get(name) else None

    if jax.config.jax_cpu_collectives_implementation is None:
        # CPU processes need a collectives library to talk to each other; accelerators ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
        num_processes=config.num_processes if config.num_processes is not None else env_int("JAX_NUM_PROCESSES"),
        process_id=config.process_id if config.process_id is not None else env_int("JAX_PROCESS_ID"))
    logger.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())


def is_leader() -> bool:
    return jax.process_index() == 0


class StepChannel:
    """Process 0 → every process: the host inputs of each step, or STOP. Built from a template (any step)."""

    def __init__(self, template):
        leaves, self._treedef = jax.tree.flatten(template)
        self._dtypes = [np.asarray(leaf).dtype for leaf in leaves]
        self._ndims = [np.ndim(leaf) for leaf in leaves]
        if max(self._ndims) > _MAX_DIMS:
            raise ValueError(f"step inputs have a leaf of {max(self._ndims)} dims; StepChannel sends up to {_MAX_DIMS}")
        self._template = template
        self._header_len = 1 + len(self._static(template)) + _MAX_DIMS * len(leaves)

    @staticmethod
    def _static(tree) -> list[int]:
        """The int static fields of each dataclass in the (step, metadata) tuple, in order."""
        return [getattr(part, f.name) for part in tree for f in dataclasses.fields(part)
                if f.metadata.get("static")]

    def send(self, tree) -> None:
        """Leader: broadcasts one step's inputs (numpy pytrees like the template)."""
        leaves = jax.tree.leaves(tree)
        dims = []
        for leaf in leaves:
            shape = list(np.shape(leaf))
            dims += shape + [0] * (_MAX_DIMS - len(shape))
        self._broadcast_header([STEP] + self._static(tree) + dims)
        multihost_utils.broadcast_one_to_all([np.asarray(leaf) for leaf in leaves])

    def send_stop(self) -> None:
        self._broadcast_header([STOP] + [0] * (self._header_len - 1))

    def receive(self):
        """Follower: the next step's inputs, or None when the leader sent STOP."""
        header = multihost_utils.broadcast_one_to_all(np.zeros(self._header_len, np.int32)).tolist()
        if header[0] == STOP:
            return None
        n_static = len(self._static(self._template))
        static, dims = header[1:1 + n_static], header[1 + n_static:]
        placeholders = [np.zeros(dims[_MAX_DIMS * i:_MAX_DIMS * i + nd], dtype)
                        for i, (nd, dtype) in enumerate(zip(self._ndims, self._dtypes))]
        leaves = multihost_utils.broadcast_one_to_all(placeholders)
        parts = jax.tree.unflatten(self._treedef, leaves)
        values = iter(static)
        return tuple(dataclasses.replace(part, **{f.name: next(values) for f in dataclasses.fields(part)
                                                 if f.metadata.get("static")}) for part in parts)

    def _broadcast_header(self, header: list[int]) -> None:
        multihost_utils.broadcast_one_to_all(np.asarray(header, np.int32))


def to_global(tree, sharding: jax.sharding.Sharding):
    """Host numpy leaves, identical on every process → global jax Arrays with `sharding` (multi-process jit)."""
    return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda idx: np.asarray(a)[idx]),
                        tree)
