"""The on-disk checkpoint format, and loading it straight into the target dtype and shardings.

A checkpoint is a folder:

    config.json     {"model": ModelConfig.to_dict(), "source": {...}, "format_version": 1}
    params/         an orbax checkpoint of a flat dict: each array under its path in `llama.weight_info`'s
                    tree ("embed", "layers.wq", ...; `weight_info.named`), float32 or bfloat16 as converted;
                    a quantized weight is stored as its arrays ("layers.wq.values", "layers.wq.scales", ...;
                    `quantization.quantize_info`), and config.json then holds
                    {"quantization": QuantSpec.to_dict()}
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
from jaxserve.model.llama import LlamaWeights, weight_info
from jaxserve.model.quantization import QuantSpec, is_quantized, quantize_info
from jaxserve.model.weight_info import abstract, from_named, named

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


def stored_info(cfg: ModelConfig, meta: Mapping[str, Any], dtype=jnp.float32) -> LlamaWeights:
    """The description of a checkpoint's weights as `load_checkpoint` returns them: dense ones in `dtype`,
    quantized ones as stored (`meta` is the checkpoint's config.json)."""
    return quantize_info(weight_info(cfg, dtype), QuantSpec.from_dict(meta.get("quantization")))


def save_checkpoint(dest: str | Path, cfg: ModelConfig, weights: LlamaWeights, *,
                    source: dict[str, Any] | None = None, quantization: QuantSpec | None = None) -> None:
    """Writes `config.json` and `params/` into the folder `dest` (created if needed; `params/` must not exist).

    Args:
      dest: the checkpoint folder.
      cfg: the model's architecture.
      weights: every weight of `llama.weight_info(cfg)`, numpy or jax arrays of exactly those shapes, the dense
        ones all float32 or all bfloat16 (the stored dtype; `load_checkpoint` casts on restore).
      source: where the weights came from (format, path, ...), recorded in config.json.
      quantization: which weights are quantized (`Int8Weight` / `Int4Weight` values) and how.
    """
    import orbax.checkpoint as ocp

    dest = Path(dest).absolute()
    spec = quantization or QuantSpec()
    dense = weight_info(cfg)
    want, got = named(dense), named(weights, is_leaf=is_quantized)  # one name per weight
    if set(got) != set(want):
        raise ValueError(f"weights do not match the model config: missing {sorted(set(want) - set(got))}, "
                         f"unexpected {sorted(set(got) - set(want))}")
    quantized = {n for n, i in want.items() if spec.scheme_for(i) != "none"}
    if {n for n, w in got.items() if is_quantized(w)} != quantized:
        raise ValueError(f"quantized weights {sorted(n for n, w in got.items() if is_quantized(w))} do not "
                         f"match the quantization spec's {sorted(quantized)}")
    dtypes = {jnp.dtype(w.dtype).name for n, w in got.items() if n not in quantized}
    if len(dtypes) != 1 or not dtypes <= set(STORED_DTYPES):
        raise ValueError(f"checkpoint weights must all be one of {STORED_DTYPES}; got {sorted(dtypes)}")
    arrays = named(weights)  # the names on disk: "layers.wq", or "layers.wq.values", "layers.wq.scales", ...
    for name, info in named(quantize_info(dense, spec)).items():
        a = arrays[name]
        if name not in want:  # an array of a quantized weight ("layers.wq.values"): its dtype is the layout's
            if tuple(a.shape) != info.shape or jnp.dtype(a.dtype) != info.dtype:
                raise ValueError(f"weight {name} is {jnp.dtype(a.dtype).name}{list(a.shape)}, expected "
                                 f"{info.dtype.name}{list(info.shape)}")
        elif tuple(a.shape) != info.shape:
            raise ValueError(f"weight {name} has shape {tuple(a.shape)}, expected {info.shape}")
    dest.mkdir(parents=True, exist_ok=True)
    # NOTE: numpy weights are written as they are: no deep copy (orbax's default, which doubles peak memory)
    # and no compression (whole-tensor chunks would need a compressed copy each, and loading is faster).
    # The layout on disk is the one StandardRestore reads.
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(dest / PARAMS_DIR, args=ocp.args.PyTreeSave(arrays))
    meta = {"model": cfg.to_dict(), "source": {**(source or {}), "dtype": dtypes.pop()},
            "format_version": FORMAT_VERSION}
    if spec.active:
        meta["quantization"] = spec.to_dict()
    (dest / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(path: str | Path, dtype=jnp.float32,
                    shardings: LlamaWeights | Mapping[str, jax.sharding.Sharding] | None = None,
                    ) -> tuple[ModelConfig, LlamaWeights]:
    """Restores a checkpoint straight into `dtype`, the given shardings and the weights pytree.

    Each device reads only its own shard of each weight, cast to `dtype` on the way (orbax's restore against
    an abstract target), so no full host copy of the model is made: what makes tensor parallelism load.
    Quantized weights come back quantized, in their stored dtypes (`read_quantization` says which).

    Args:
      path: a checkpoint folder (see the module docstring).
      dtype: the dtype of every returned dense weight, whatever dtype was stored.
      shardings: a tree of `jax.sharding.Sharding`s like `stored_info(...)` (e.g. `plan.shardings(...)` of it),
        or a dict naming some arrays ("layers.wq", "layers.wq.scales", ...); arrays left out (or all, when
        None) go to a `SingleDeviceSharding` on the first device.
    Returns:
      (the model config, the weights pytree).
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    cfg, meta = read_config(path)
    infos = stored_info(cfg, meta, dtype)
    if shardings is None or isinstance(shardings, Mapping):
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        by_name = dict(shardings or {})
        unknown = set(by_name) - set(named(infos))
        if unknown:
            raise ValueError(f"shardings name weights the model does not have: {sorted(unknown)}")
        shardings = from_named(infos, {name: by_name.get(name, default) for name in named(infos)})
    target = named(abstract(infos, shardings))  # the checkpoint's own flat names
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(path / PARAMS_DIR, args=ocp.args.StandardRestore(target))
    return cfg, from_named(infos, restored)


def read_quantization(path: str | Path) -> QuantSpec:
    """How a checkpoint's weights are quantized (`QuantSpec()`, all "none", for a float checkpoint)."""
    return QuantSpec.from_dict(read_config(path)[1].get("quantization"))
