"""The on-disk checkpoint format, and loading it straight into the target dtype and shardings.

A checkpoint is a folder:

    config.json     {"model": ModelConfig.to_dict(), "source": {...}, "format_version": 1}
    params/         an orbax checkpoint of the flat weight dict ("embed", "layers.wq", ...; `llama.param_table`),
                    float32 or bfloat16 as converted; a quantized weight is stored as its arrays
                    ("layers.wq.values", "layers.wq.scales", ...; `jaxserve.model.quantization`), and config.json
                    then holds {"quantization": QuantSpec.to_dict()}
    tokenizer.json, tokenizer_config.json, ...   the tokenizer and its chat template

`python -m checkpoints_conv` writes these from Hugging Face safetensors or GGUF files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.model.llama import LlamaWeights, abstract_weights, param_table, weights_from_flat, weights_to_flat
from jaxserve.model.quantization import QuantSpec, component_table, from_components, is_quantized, to_components

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
STORED_DTYPES = ("float32", "bfloat16")


def is_checkpoint(path: str | Path) -> bool:
    """True when `path` is a folder written by `save_checkpoint` (a converted checkpoint)."""
    path = Path(path)
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format_version" in meta and (path / PARAMS_DIR).is_dir()


def read_config(path: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and the whole `config.json` dict of a checkpoint folder."""
    path = Path(path)
    if not is_checkpoint(path):
        raise ValueError(f"{path} is not a jaxserve checkpoint (no {CONFIG_FILE} with a format_version and "
                         f"{PARAMS_DIR}/); convert it with `python -m checkpoints_conv SRC DEST`")
    meta = json.loads((path / CONFIG_FILE).read_text())
    if meta["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {meta['format_version']} is not supported "
                         f"(this jaxserve reads {FORMAT_VERSION}); convert the model again")
    return ModelConfig.from_dict(meta["model"]), meta


def save_checkpoint(dest: str | Path, cfg: ModelConfig, flat_weights: Mapping[str, Any], *,
                    source: dict[str, Any] | None = None, quantization: QuantSpec | None = None) -> None:
    """Writes `config.json` and `params/` into the folder `dest` (created if needed; `params/` must not exist).

    Args:
      dest: the checkpoint folder.
      cfg: the model's architecture.
      flat_weights: every name of `llama.param_table(cfg)`, numpy or jax arrays of exactly those shapes, all
        float32 or all bfloat16 (the stored dtype; `load_checkpoint` casts on restore).
      source: where the weights came from (format, path, ...), recorded in config.json.
      quantization: which weights of `flat_weights` are quantized (`Int8Weight` / `Int4Weight` values) and how.
    """
    import orbax.checkpoint as ocp

    dest = Path(dest).absolute()
    table = param_table(cfg)
    if set(flat_weights) != set(table):
        raise ValueError(f"weights do not match the model config: missing {sorted(set(table) - set(flat_weights))}, "
                         f"unexpected {sorted(set(flat_weights) - set(table))}")
    spec = quantization or QuantSpec()
    quantized = component_table(table, spec)
    if {n for n, w in flat_weights.items() if is_quantized(w)} != set(quantized):
        raise ValueError(f"quantized weights {sorted(n for n, w in flat_weights.items() if is_quantized(w))} do not "
                         f"match the quantization spec's {sorted(quantized)}")
    dtypes = {jnp.dtype(w.dtype).name for n, w in flat_weights.items() if n not in quantized}
    if len(dtypes) != 1 or not dtypes <= set(STORED_DTYPES):
        raise ValueError(f"checkpoint weights must all be one of {STORED_DTYPES}; got {sorted(dtypes)}")
    for name, info in table.items():
        if name in quantized:
            for c, ci in quantized[name].items():
                a = getattr(flat_weights[name], c)
                if tuple(a.shape) != ci.shape or jnp.dtype(a.dtype) != jnp.dtype(ci.dtype):
                    raise ValueError(f"weight {name}.{c} is {jnp.dtype(a.dtype).name}{list(a.shape)}, expected "
                                     f"{ci.dtype}{list(ci.shape)}")
        elif tuple(flat_weights[name].shape) != info.shape:
            raise ValueError(f"weight {name} has shape {tuple(flat_weights[name].shape)}, expected {info.shape}")
    dest.mkdir(parents=True, exist_ok=True)
    # NOTE: numpy weights are written as they are: no deep copy (orbax's default, which doubles peak memory)
    # and no compression (whole-tensor chunks would need a compressed copy each, and loading is faster).
    # The layout on disk is the one StandardRestore reads.
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(dest / PARAMS_DIR, args=ocp.args.PyTreeSave(to_components(dict(flat_weights))))
    meta = {"model": cfg.to_dict(), "source": {**(source or {}), "dtype": dtypes.pop()},
            "format_version": FORMAT_VERSION}
    if spec.active:
        meta["quantization"] = spec.to_dict()
    (dest / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(path: str | Path, dtype=jnp.float32,
                    shardings: Mapping[str, jax.sharding.Sharding] | None = None) -> tuple[ModelConfig, LlamaWeights]:
    """Restores a checkpoint straight into `dtype` and the given shardings.

    Each device reads only its own shard of each weight, cast to `dtype` on the way (orbax's restore against
    an abstract target), so no full host copy of the model is made: what makes tensor parallelism load.
    Quantized weights come back quantized, in their stored dtypes (`read_quantization` says which).

    Args:
      path: a checkpoint folder (see the module docstring).
      dtype: the dtype of every returned weight, whatever dtype was stored.
      shardings: flat weight name → `jax.sharding.Sharding`; names left out (or all, when None) go to a
        `SingleDeviceSharding` on the first device. A quantized weight's arrays are named "layers.wq.values",
        "layers.wq.scales", ... (their logical axes: `quantization.component_table`).
    Returns:
      (the model config, the weights pytree).
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    cfg, meta = read_config(path)
    spec = QuantSpec.from_dict(meta.get("quantization"))
    table = param_table(cfg)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = dict(shardings or {})
    target = weights_to_flat(abstract_weights(cfg, jnp.dtype(dtype),
                                              {name: shardings.get(name, default) for name in table}))
    for name, comps in component_table(table, spec).items():
        del target[name]
        target.update({f"{name}.{c}": jax.ShapeDtypeStruct(ci.shape, jnp.dtype(ci.dtype),
                                                           sharding=shardings.get(f"{name}.{c}", default))
                       for c, ci in comps.items()})
    unknown = set(shardings) - set(target)
    if unknown:
        raise ValueError(f"shardings name weights the model does not have: {sorted(unknown)}")
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        flat = checkpointer.restore(path / PARAMS_DIR, args=ocp.args.StandardRestore(target))
    return cfg, weights_from_flat(from_components(flat, table, spec))


def read_quantization(path: str | Path) -> QuantSpec:
    """How a checkpoint's weights are quantized (`QuantSpec()`, all "none", for a float checkpoint)."""
    return QuantSpec.from_dict(read_config(path)[1].get("quantization"))
