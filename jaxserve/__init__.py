"""jaxserve: an LLM inference and serving engine on JAX/XLA.

The public API: `LLM` (offline generation), `SamplingParams`, `EngineConfig`, `LLMEngine`.
Imports are lazy so `import jaxserve.config` and friends stay cheap for host-side code.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams"]


def __getattr__(name):
    if name == "LLM":
        from jaxserve.llm import LLM
        return LLM
    if name == "LLMEngine":
        from jaxserve.engine import LLMEngine
        return LLMEngine
    if name == "EngineConfig":
        from jaxserve.config import EngineConfig
        return EngineConfig
    if name == "SamplingParams":
        from jaxserve.core.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'jaxserve' has no attribute {name!r}")
