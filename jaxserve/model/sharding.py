"""Tensor and data parallelism as named shardings: the mesh, one table of rules, and the head layout.

The mesh has two axes named for what they do: `data` (replicas of the weights, each taking a slice of a
step's tokens) and `model` (tensor parallelism: each device holds a slice of every layer). Model code
names only logical axes (`llama.weight_info`, and the activation constraints in `llama.forward`);
`ShardingRules` maps those to mesh axes, so changing the layout is a change to that one table.

The default rules are Megatron's: Q/K/V and gate/up are column-parallel (split over heads / ffw), O and
down row-parallel, so XLA inserts one all-reduce after each attention block and one after each MLP;
the embedding and the LM head are split over the vocabulary, norms replicated. The KV cache
`[L, P, page_size, 2K, H]` is split over its KV-head axis: K and V are interleaved per head, so each
device's contiguous block of 2K/TP rows holds whole heads, K and V together.

KV heads: TP must divide the query heads N. When it does not divide the KV heads K, each KV head is
repeated r times (K' = lcm(K, TP) = r * K, the smallest layout TP divides), which keeps every query
head on the device of its KV head; the model then runs as if it had K' KV heads (`serving_config`).
Sizes for which no such layout exists (SmolLM2's 9 / 3 heads at TP = 2, 4, 8) are refused with a
ValueError that names the valid sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxserve.config import ModelConfig
from jaxserve.model.weight_info import ArrayInfo
from pallas_kernels.kv_cache import QuantizedKV

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "model")
MeshAxes = str | tuple[str, ...] | None


def make_mesh(tensor_parallel_size: int = 1, data_parallel_size: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over the first data * tensor devices (of all processes, in `jax.devices()` order)."""
    if tensor_parallel_size < 1 or data_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size and data_parallel_size must be positive, got "
                         f"{tensor_parallel_size} and {data_parallel_size}")
    devices = list(jax.devices() if devices is None else devices)
    need = tensor_parallel_size * data_parallel_size
    if need > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} x data_parallel_size={data_parallel_size} "
                         f"needs {need} devices; {len(devices)} are visible")
    # NOTE: devices of one process are normally adjacent in jax.devices(), so the model axis (the chatty one: two
    # all-reduces a layer) stays within a host whenever tensor_parallel_size fits in one.
    grid = np.array(devices[:need], dtype=object).reshape(data_parallel_size, tensor_parallel_size)
    return Mesh(grid, MESH_AXES)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis → mesh axis (or axes, or None for replicated). One table for the whole model."""

    batch: MeshAxes = "data"  # a step's tokens T and rows R
    vocab: MeshAxes = "model"
    embed: MeshAxes = None
    heads: MeshAxes = "model"
    kv_heads: MeshAxes = "model"
    ffw: MeshAxes = "model"
    layers: MeshAxes = None
    pages: MeshAxes = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            for axis in _as_tuple(getattr(self, f.name)):
                if axis not in MESH_AXES:
                    raise ValueError(f"ShardingRules.{f.name}={getattr(self, f.name)!r}: {axis!r} is not a mesh "
                                     f"axis; mesh axes are {MESH_AXES}")

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        if not hasattr(self, logical):
            raise ValueError(f"unknown logical axis {logical!r}; ShardingRules has "
                             f"{[f.name for f in dataclasses.fields(self)]}")
        return _as_tuple(getattr(self, logical))

    def spec(self, axes: Sequence[str | None]) -> PartitionSpec:
        """The PartitionSpec of an array whose dimensions have these logical names.

        Raises ValueError when two dimensions would be split over the same mesh axis (a collision).
        """
        used: dict[str, str] = {}
        out = []
        for logical in axes:
            mesh_axes = self.mesh_axes(logical)
            for m in mesh_axes:
                if m in used:
                    raise ValueError(f"sharding collision: logical axes {used[m]!r} and {logical!r} of {tuple(axes)} "
                                     f"both map to mesh axis {m!r}")
                used[m] = logical
            out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
        return PartitionSpec(*out)


def _as_tuple(value: MeshAxes) -> tuple[str, ...]:
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """A mesh, the rules over it, and how many times each KV head is repeated (`kv_replicas`)."""

    mesh: Mesh
    rules: ShardingRules = ShardingRules()
    kv_replicas: int = 1

    @property
    def tensor_parallel_size(self) -> int:
        return self.mesh.shape["model"]

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def sharding(self, axes: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
        """The NamedSharding of an array with these logical axes. With `shape`, a dimension that its mesh axes
        do not divide is replicated instead (logged), so odd vocabularies still load."""
        spec = list(self.rules.spec(axes))
        if shape is not None:
            for i, (entry, size) in enumerate(zip(spec, shape)):
                ways = math.prod(self.mesh.shape[a] for a in _as_tuple(entry))
                if size % ways:
                    # KV heads are expected here: the checkpoint's are loaded whole, then repeated (repeat_kv_heads).
                    log = logger.debug if axes[i] == "kv_heads" else logger.warning
                    log("dimension %d (%s) of size %d does not split %d ways: replicated", i, axes[i], size, ways)
                    spec[i] = None
        return NamedSharding(self.mesh, PartitionSpec(*spec))

    def shardings(self, infos):
        """One NamedSharding per array of a description tree (`llama.weight_info`, quantized or not), from each
        array's logical axes and shape: the tree jit's in/out_shardings and orbax's restore take."""
        return jax.tree.map(lambda i: self.sharding(i.axes, i.shape), infos)

    def constrain(self, x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
        """`with_sharding_constraint` by logical axes: the only tensor-parallel line model code contains."""
        return jax.lax.with_sharding_constraint(x, self.sharding(axes, x.shape))


def kv_replicas_for(cfg: ModelConfig, tensor_parallel_size: int) -> int:
    """How many times each KV head is repeated at this TP size; ValueError (naming the valid sizes) if none works."""
    N, K, tp = cfg.num_heads, cfg.num_kv_heads, tensor_parallel_size
    k_served = math.lcm(K, tp)
    if N % tp or N % k_served:
        raise ValueError(f"tensor_parallel_size={tp} does not split this model's {N} query / {K} KV heads evenly; "
                         f"valid sizes are {valid_tensor_parallel_sizes(cfg)}")
    return k_served // K


def valid_tensor_parallel_sizes(cfg: ModelConfig) -> list[int]:
    """Every TP size that splits the query heads and, with KV heads repeated, the KV heads."""
    return [tp for tp in range(1, cfg.num_heads + 1)
            if cfg.num_heads % tp == 0 and cfg.num_heads % math.lcm(cfg.num_kv_heads, tp) == 0]


def plan_sharding(cfg: ModelConfig, tensor_parallel_size: int = 1, data_parallel_size: int = 1,
                  rules: ShardingRules = ShardingRules(),
                  devices: Sequence[jax.Device] | None = None) -> ShardingPlan:
    """Validates the sizes against the model and builds the mesh; the KV-head repeat is logged when needed."""
    r = kv_replicas_for(cfg, tensor_parallel_size)
    if r > 1:
        logger.info("tensor_parallel_size=%d exceeds what %d KV heads split into: each KV head is repeated %d "
                    "times (%d KV heads served, %d per device)", tensor_parallel_size, cfg.num_kv_heads, r,
                    r * cfg.num_kv_heads, r * cfg.num_kv_heads // tensor_parallel_size)
    return ShardingPlan(make_mesh(tensor_parallel_size, data_parallel_size, devices), rules, r)


def serving_config(cfg: ModelConfig, plan: ShardingPlan) -> ModelConfig:
    """The architecture the sharded model runs: the same, with `num_kv_heads` counting repeated heads."""
    return dataclasses.replace(cfg, num_kv_heads=cfg.num_kv_heads * plan.kv_replicas)


def place_weights(weights, infos, plan: ShardingPlan):
    """Every array of `weights` (dense or quantized) moved into its sharding by the logical axes of `infos`
    (their description as they are: `quantization.info_like`).

    NOTE: a jitted identity rather than `jax.device_put`, so it also works on arrays spanning processes; the
    input is donated, so arrays already in place are not copied.
    """
    return jax.jit(lambda w: w, out_shardings=plan.shardings(infos), donate_argnums=0)(weights)


# Logical axes of the KV cache [L, P, page_size, 2K, H]: split over KV heads (whole heads, K and V together);
# int8 pages' scales [L, P, page_size, 2K] (one per token and combined head) split the same way.
KV_CACHE_AXES = ("layers", "pages", None, "kv_heads", None)
KV_SCALE_AXES = KV_CACHE_AXES[:-1]


def kv_cache_sharding(plan: ShardingPlan, kv_dtype=None) -> NamedSharding | QuantizedKV:
    """The KV pages' sharding; for int8 pages a `QuantizedKV` holding the values' and the scales' shardings."""
    if kv_dtype is not None and np.dtype(kv_dtype) == np.int8:
        return QuantizedKV(plan.sharding(KV_CACHE_AXES), plan.sharding(KV_SCALE_AXES))
    return plan.sharding(KV_CACHE_AXES)


def shard_attention(attention, plan: ShardingPlan):
    """Runs an attention function per device on its own heads (`shard_map`), so kernels need no sharding rules.

    Each query head attends only to its own KV head, and both live on the same device (`kv_replicas_for`), so
    the per-device computation is exact and needs no collective. XLA cannot partition a Pallas kernel (a
    custom call) by itself; this is what lets `--attention-backend pallas` run under tensor parallelism.
    """
    if plan.rules.mesh_axes("heads") != plan.rules.mesh_axes("kv_heads"):
        raise ValueError(f"per-device attention needs query and KV heads on the same mesh axes; rules map heads to "
                         f"{plan.rules.heads!r} and kv_heads to {plan.rules.kv_heads!r}")
    if plan.mesh.size == 1:
        return attention
    heads = plan.rules.spec((None, "heads", None))  # q and the output: [T, N, H]

    def sharded(q, kv_pages, layer, step, *, scale):
        kv_specs = jax.tree.map(lambda s: s.spec, kv_cache_sharding(plan, kv_pages.dtype))
        in_specs = (heads, kv_specs, PartitionSpec(), PartitionSpec())  # q, kv_pages, layer, step
        per_device = functools.partial(attention, scale=scale)
        return jax.shard_map(per_device, mesh=plan.mesh, in_specs=in_specs, out_specs=heads,
                             check_vma=False)(q, kv_pages, layer, step)

    return sharded


def repeat_kv_heads(weights, infos, plan: ShardingPlan):
    """Repeats each KV head's projection (and bias) `plan.kv_replicas` times, into the served layout's shardings.

    Head k becomes heads k*r .. k*r + r - 1, so query head n (of KV head n // G) lands on served KV head
    n // (G / r): the same head, now on the query head's device. `infos` describes `weights` as they are
    (the checkpoint's config, quantized as stored); every array with a "kv_heads" axis is repeated along it:
    wk, wv [L, D, K, H] (quantized: values / packed [L, G, g, K, H], scales and mins [L, G, K, H]) and
    bk, bv [L, K, H] become [..., K*r, H].
    """
    r = plan.kv_replicas
    if r == 1:
        return weights

    # `infos` describes `weights` leaf for leaf, so their flattened leaves line up.
    infos_flat, (leaves, treedef) = jax.tree.leaves(infos), jax.tree.flatten(weights)
    picked = [n for n, info in enumerate(infos_flat) if "kv_heads" in info.axes]
    axes = [infos_flat[n].axes.index("kv_heads") for n in picked]

    def served(info: ArrayInfo, k: int) -> NamedSharding:  # the served shape: K*r heads on axis k
        return plan.sharding(info.axes, (*info.shape[:k], info.shape[k] * r, *info.shape[k + 1:]))

    out = jax.jit(lambda *a: [x.repeat(r, axis=k) for x, k in zip(a, axes)],
                  out_shardings=[served(infos_flat[n], k) for n, k in zip(picked, axes)])(*[leaves[n] for n in picked])
    for n, x in zip(picked, out):
        leaves[n] = x
    return jax.tree.unflatten(treedef, leaves)


def per_device_bytes(*trees) -> dict[str, int]:
    """Bytes held on each addressable device by the arrays of these pytrees (by device id, as strings)."""
    held: dict[str, int] = {}
    for leaf in jax.tree.leaves(trees):
        for shard in leaf.addressable_shards:
            key = str(shard.device.id)
            held[key] = held.get(key, 0) + shard.data.nbytes
    return held
