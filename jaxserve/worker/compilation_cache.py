"""The persistent XLA compilation cache: a restart loads each step shape's executable instead of compiling it.

`enable(setting)` runs once per process before the first compile (`ModelRunner.__init__`, right after
`jax.distributed` starts). `setting` is `EngineConfig.compilation_cache_dir`:
  * "auto": `cache_dir()/xla` (`$JAXSERVE_CACHE/xla`, beside the converted checkpoints);
  * a folder: used as the root instead;
  * "none": off; nothing is read or written (even if $JAX_COMPILATION_CACHE_DIR is set).

Each JAX / jaxlib version and backend gets a folder of its own under the root
(`jax-0.10.2-jaxlib-0.10.2-cpu`), so an upgrade starts empty instead of sifting old entries. Inside it JAX
keys every executable on a hash of the lowered module (shapes, dtypes, shardings, the constants baked in
from the config), the compile options, the jaxlib version, the platform and its version, $XLA_FLAGS and the
device topology: a changed config or device compiles afresh and never loads a stale executable.

Counting: `stats()` tells how many compile requests of this process consulted the cache and how many it
served (JAX's monitoring events), which the engine logs after warm-up.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import jax
import jaxlib

from jaxserve.config import cache_dir

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_counts = {"requests": 0, "hits": 0}  # compile requests that consulted the cache, and those it served
_listening = False


def resolve_dir(setting: str) -> Path | None:
    """The folder the executables go into for a `compilation_cache_dir` setting; None when it is "none"."""
    if setting.strip().lower() == "none":
        return None
    root = cache_dir() / "xla" if setting.strip().lower() == "auto" else Path(setting).expanduser()
    return root.absolute() / f"jax-{jax.__version__}-jaxlib-{jaxlib.__version__}-{jax.default_backend()}"


def enable(setting: str) -> Path | None:
    """Points JAX's persistent compilation cache at `resolve_dir(setting)`, or turns it off; returns the folder.

    NOTE: the cache is trusted (a planted entry is code that runs), so a folder we create is private (0700).
    """
    from jax.experimental.compilation_cache import compilation_cache

    path = resolve_dir(setting)
    wanted = (path is not None, str(path) if path else None)
    if (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir) == wanted:
        return path
    # JAX opens the folder at its first compile and keeps it; reset so this process's next compile reopens it.
    compilation_cache.reset_cache()
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        jax.config.update("jax_compilation_cache_dir", None)
        logger.info("compilation cache off")
        return None
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # NOTE: JAX caches only executables that took over 1 s to compile by default; our small buckets compile
    # faster than that on an accelerator and every one of them counts at start-up. -1: no size floor either.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _listen()
    logger.info("compilation cache at %s (%d executables stored)", path, num_entries(path))
    return path


def num_entries(path: Path) -> int:
    """Executables stored in a cache folder (JAX writes one `<module>-<hash>-cache` file per executable)."""
    return sum(1 for f in path.glob("*-cache")) if path.is_dir() else 0


def stats() -> dict[str, int]:
    """Compile requests in this process that consulted the cache (`requests`) and were served by it (`hits`)."""
    with _lock:
        return dict(_counts)


def _listen() -> None:
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True

    def on_event(event: str, **_) -> None:
        key = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
               "/jax/compilation_cache/cache_hits": "hits"}.get(event)
        if key:
            with _lock:
                _counts[key] += 1

    jax.monitoring.register_event_listener(on_event)
