"""Converts a Hugging Face folder or a GGUF file into a jaxserve checkpoint (see `jaxserve.model.checkpoint`).

Tensors stream one at a time from the source (memory-mapped), through the source's conversion table, into
stacked [L, ...] arrays preallocated in the output dtype, so peak memory is about the output plus one
tensor. The checkpoint is written into a hidden temporary folder next to DEST and renamed into place at the
end: an interrupted conversion never leaves a half-written checkpoint at DEST.
"""

from __future__ import annotations

import dataclasses
import os
import re
import resource
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Iterable

import jax
import numpy as np

from checkpoints_conv import gguf as gguf_source
from checkpoints_conv import gguf_quant, hf_safetensors
from checkpoints_conv.hf_safetensors import Loader, Table, Transform, linear
from jaxserve.config import ModelConfig
from jaxserve.model import quantization as qz
from jaxserve.model.checkpoint import STORED_DTYPES, save_checkpoint
from jaxserve.model.llama import LlamaWeights, weight_info
from jaxserve.model.weight_info import ArrayInfo, named

SOURCES: dict[str, ModuleType] = {"hf_safetensors": hf_safetensors, "gguf": gguf_source}

# Copied verbatim from a Hugging Face folder, when present.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                      "generation_config.json")


@dataclasses.dataclass(frozen=True)
class ConversionStats:
    seconds: float
    peak_rss_bytes: int  # of this process, over its whole life so far
    checkpoint_bytes: int


def detect_source(src: Path) -> str:
    """"hf_safetensors" or "gguf", or a ValueError saying what SRC should be."""
    for name, module in SOURCES.items():
        if module.is_source(src):
            return name
    raise ValueError(f"{src} is neither a Hugging Face folder (config.json + *.safetensors) nor a .gguf file")


def lookup(table: Table, key: str) -> tuple[str | None, int | None, Transform | None]:
    """(flat param name or None when dropped, layer index or None, transform) for a source key."""
    for pattern, param, transform in table:
        m = re.fullmatch(pattern, key)
        if m:
            return param, (int(m.group(1)) if m.groups() else None), transform
    raise ValueError(f"unknown tensor {key!r}: no conversion rule matches it")


def quantize_tensor(info: ArrayInfo, load: Loader, transform: Transform, target: tuple[int, ...],
                    key: str, spec: qz.QuantSpec) -> dict[str, np.ndarray]:
    """One source tensor (one layer's slice) → the arrays of its quantized weight.

    GGUF Q8_0 / Q4_0 / Q4_1 tensors whose blocks fit the scheme are repacked byte for byte
    (`gguf_quant.repack`); anything else is loaded as float32, transformed and quantized.
    """
    scheme = spec.scheme_for(info)
    group = spec.group_size(scheme)
    n_in = info.contract
    t = getattr(load, "gguf_tensor", None)
    if t is not None and gguf_quant.can_repack(t.tensor_type.name, scheme, group, spec.scale_dtype):
        if info.transpose:  # token_embd is [V, D] = [out, in] like any GGUF matrix; ours is the head [D, V]
            transform, target = linear(1), tuple(reversed(target))
        parts = gguf_quant.repack(np.asarray(t.data), t.tensor_type.name, transform, target, n_in, key)
    else:
        w = transform(load(), target, key)
        w = qz.quantize(w.T if info.transpose else w, scheme, n_in, group_size=group,
                        scale_dtype=spec.scale_dtype)
        parts = {c: getattr(w, c) for c in qz.COMPONENTS[type(w)]}
    return {c: np.asarray(a) for c, a in parts.items()}


def fill_weights(cfg: ModelConfig, table: Table, tensors: Iterable[tuple[str, Loader]],
                 dtype: str, spec: qz.QuantSpec | None = None) -> LlamaWeights:
    """Runs every source tensor through `table` into preallocated stacked arrays of `dtype`.

    With a `spec` that quantizes, those weights come back as `Int8Weight` / `Int4Weight` of numpy arrays.
    Raises ValueError on an unknown key, a tensor of the wrong shape, a duplicate, or a weight never filled.
    """
    spec = spec or qz.QuantSpec()
    dense = weight_info(cfg, dtype)
    # The output tree, allocated from its description; `arrays` names its (mutable) arrays as on disk.
    out = jax.tree.map(lambda i: np.empty(i.shape, i.dtype), qz.quantize_info(dense, spec))
    arrays = named(out)
    params = named(dense)  # the source table's names ("layers.wq", ...) → their description
    # NOTE: one flag per layer of a stacked weight, so a missing or doubled layer is caught.
    filled = {name: np.zeros(info.shape[0] if info.lead else 1, bool) for name, info in params.items()}
    for key, load in tensors:
        param, layer, transform = lookup(table, key)
        if param is None:
            continue
        if param not in params:
            if param == "lm_head" and cfg.tie_word_embeddings:
                continue  # NOTE: some tied checkpoints store a copy of the embeddings as the head; ours is tied
            raise ValueError(f"tensor {key} maps to {param}, which this model config has no place for")
        info = params[param]
        stacked = bool(info.lead)
        if stacked and not 0 <= layer < cfg.num_layers:
            raise ValueError(f"tensor {key}: layer {layer} is out of range for {cfg.num_layers} layers")
        slot = layer if stacked else 0
        if filled[param][slot]:
            raise ValueError(f"tensor {key} fills {param}[{slot}] a second time")
        target = info.shape[1:] if stacked else info.shape
        if spec.scheme_for(info) != "none":
            parts = {f"{param}.{c}": a for c, a in
                     quantize_tensor(info, load, transform, target, key, spec).items()}
        else:
            parts = {param: transform(load(), target, key)}
        for dest, w in parts.items():
            if stacked:
                arrays[dest][layer] = w
            else:
                arrays[dest][...] = w
        filled[param][slot] = True
    missing = [f"{name}" + (f" (layers {np.flatnonzero(~done).tolist()})" if params[name].lead else "")
               for name, done in filled.items() if not done.all()]
    if missing:
        raise ValueError(f"lacks weights the config needs: {', '.join(missing)}")
    return out


def write_tokenizer(kind: str, src: Path, dest: Path) -> None:
    """The tokenizer files and chat template: copied from a HF folder, or rebuilt from GGUF metadata."""
    if kind == "hf_safetensors":
        present = [name for name in HF_TOKENIZER_FILES if (src / name).is_file()]
        if not {"tokenizer.json", "tokenizer.model"} & set(present):
            raise ValueError(f"{src} has no tokenizer.json or tokenizer.model to copy")
        for name in present:
            shutil.copy2(src / name, dest / name)
    else:
        from jaxserve.text.tokenizer import Tokenizer

        Tokenizer.from_gguf(src).save(dest)


def source_quant_spec(kind: str, quantize: str, quantize_embeddings: str = "none",
                      group_size: int | None = None) -> qz.QuantSpec:
    """The spec `--quantize` means for a source: GGUF files default to their own 32-wide blocks with float16
    scales (so Q8_0 / Q4_0 / Q4_1 tensors repack exactly), other sources to int8 per channel / int4 g=128."""
    if kind == "gguf":
        group = group_size or gguf_quant.BLOCK
        return qz.QuantSpec(quantize, quantize_embeddings, int8_group_size=group, int4_group_size=group,
                            scale_dtype="float16")
    return qz.QuantSpec(quantize, quantize_embeddings, int8_group_size=group_size or 0,
                        int4_group_size=group_size or qz.INT4_GROUP)


def convert(src: str | Path, dest: str | Path, *, dtype: str = "float32", force: bool = False,
            progress: bool = True, quantize: str = "none", quantize_embeddings: str = "none",
            group_size: int | None = None) -> ConversionStats:
    """Converts SRC (a Hugging Face folder or a .gguf file) into the checkpoint folder DEST.

    Args:
      dtype: the stored dtype, "float32" or "bfloat16" (of the weights left in float).
      quantize: "none", "int8" or "int4" for the projections (q/k/v/o, gate/up/down).
      quantize_embeddings: the same for embed and lm_head.
      group_size: quantization group along the input dimension (None: see `source_quant_spec`).
      force: replace an existing DEST (otherwise FileExistsError).
      progress: show a tqdm progress bar.
    Returns:
      the time taken, peak RSS and checkpoint size.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    src, dest = Path(src).expanduser().absolute(), Path(dest).expanduser().absolute()
    if dtype not in STORED_DTYPES:
        raise ValueError(f"dtype must be one of {STORED_DTYPES}, got {dtype!r}")
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} already exists; pass --force to overwrite it")
    kind = detect_source(src)
    spec = source_quant_spec(kind, quantize, quantize_embeddings, group_size)
    cfg, table, tensors = SOURCES[kind].read_source(src)
    bar = tqdm(tensors, desc=f"converting {src.name}", unit="tensor", disable=not progress)
    try:
        weights = fill_weights(cfg, table, bar, dtype, spec)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from e

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(tmp, cfg, weights, source={"format": kind, "path": str(src)}, quantization=spec)
        del weights
        write_tokenizer(kind, src, tmp)
        if dest.exists():  # --force: swap, then drop the old one
            old = dest.parent / f".{dest.name}.old-{os.getpid()}"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old)
        else:
            tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    return ConversionStats(seconds=time.perf_counter() - t0,
                           peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                           checkpoint_bytes=size)
