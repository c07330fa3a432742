"""Each weight described once: an `ArrayInfo` (shape, dtype, logical axes, how it initialises and
quantizes), in a pytree of the model's own weights dataclass (`llama.weight_info`).

Everything else is a function over that tree, in the manner of jax-llm-examples' `ArrayInfo`:

    init (`init_arrays`)                  random arrays of those shapes, for tests
    abstract shapes (`abstract`)          ShapeDtypeStructs for orbax restore and AOT lowering
    shardings (`ShardingPlan.shardings`)  one NamedSharding per array, from its logical axes
    quantized variants                    `quantization.quantize_info`: a quantized weight is an
                                          `Int8Weight` / `Int4Weight` whose arrays are `ArrayInfo`s too

A checkpoint stores each array under its path in the tree ("layers.wq", "layers.wq.values"): `named` gives
those names and `from_named` builds the tree back from them, the one place names and trees meet.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """One array: its shape, dtype and the logical name of each axis (`sharding.ShardingRules` maps those).

    NOTE: not a registered pytree, so it is a leaf: `jax.tree.map(f, info_tree)` calls f once per array.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    dtype: Any = jnp.dtype(jnp.float32)
    norm: bool = False  # an RMSNorm scale: initialises near one and is never quantized
    contract: int = 0  # the `in` axes a matmul contracts (after "layers", if stacked); > 0: quantizable
    transpose: bool = False  # quantized as its transpose: the embedding [V, D] as the tied head [D, V]
    embedding: bool = False  # quantized by `QuantSpec.embeddings` rather than `.weights`

    def __post_init__(self):
        if len(self.shape) != len(self.axes):
            raise ValueError(f"ArrayInfo: shape {self.shape} and axes {self.axes} differ in length")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))  # jnp: knows bfloat16

    @property
    def lead(self) -> int:
        """How many leading axes are stacked layers (0 or 1)."""
        return 1 if self.axes and self.axes[0] == "layers" else 0


def abstract(infos, shardings=None):
    """The tree of `jax.ShapeDtypeStruct`s (with the matching tree of shardings, if given)."""
    if shardings is None:
        return jax.tree.map(lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype), infos)
    return jax.tree.map(lambda i, s: jax.ShapeDtypeStruct(i.shape, i.dtype, sharding=s), infos, shardings)


def init_arrays(infos, key: jax.Array, scale: float = 0.05):
    """Random arrays for unit tests (tiny configs); norms start at one, perturbed so they matter."""
    names = named(infos)
    # NOTE: one key per array in sorted-name order, as before the tree existed, so seeds keep their weights.
    keys = dict(zip(sorted(names), jax.random.split(key, len(names))))

    def one(name: str, info: ArrayInfo) -> jax.Array:
        noise = jax.random.normal(keys[name], info.shape, jnp.float32)
        return (1.0 + 0.1 * noise if info.norm else scale * noise).astype(info.dtype)

    return from_named(infos, {name: one(name, info) for name, info in names.items()})


# ------------------------------------------------------------------------------ checkpoint names


def _key_name(k) -> str:
    return str(getattr(k, "name", getattr(k, "key", k)))


def named(tree, is_leaf=None) -> dict[str, Any]:
    """Leaf name ("embed", "layers.wq", "layers.wq.values", ...) → leaf, in tree order (absent weights,
    None, have no leaves and no names). `is_leaf` as in `jax.tree.map` (`is_quantized`: one name per weight)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return {".".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def from_named(structure, leaves: Mapping[str, Any]):
    """The tree shaped like `structure` (e.g. an info tree) with the leaves of `leaves` by name; the inverse
    of `named`. Raises ValueError naming what is missing."""
    names = list(named(structure))
    missing = [n for n in names if n not in leaves]
    if missing:
        raise ValueError(f"no arrays named {missing}")
    return jax.tree.unflatten(jax.tree.structure(structure), [leaves[n] for n in names])
