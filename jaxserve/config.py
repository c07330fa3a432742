"""Frozen configuration dataclasses, one per concern.

Shape alphabet used across jaxserve (declared once, see STYLE.md habit 10):
  B batch, T query tokens, S KV tokens, N query heads, K KV heads, G group (N // K),
  H head_dim, D model, F FFN, V vocab, P pages, L layers, R request rows.

This module imports no JAX: host-side code reads configs too.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "none", "linear" or "llama3"."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("none", "linear", "llama3"):
            raise ValueError(f"unsupported rope scaling type {self.kind!r}; expected none, linear or llama3")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")

    @classmethod
    def from_hf(cls, d: dict[str, Any] | None) -> RopeScaling:
        if not d:
            return cls()
        kind = d.get("rope_type", d.get("type", "none"))
        if kind == "default":
            return cls()
        return cls(
            kind=kind,
            factor=float(d.get("factor", 1.0)),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, SmolLM, Mistral without sliding window, Qwen2)."""

    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2-style biases on q, k and v projections
    max_position_embeddings: int = 4096

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def group_size(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Builds the config from a Hugging Face `config.json` dict (LlamaForCausalLM, Qwen2ForCausalLM, ...)."""
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type", "")
        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rope_scaling=RopeScaling.from_hf(hf.get("rope_scaling")),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2" or "Qwen2ForCausalLM" in archs)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], *, vocab_size: int, has_output_weight: bool,
                           has_qkv_bias: bool) -> ModelConfig:
        """Builds the config from GGUF key/values (`{arch}.block_count`, ...), already decoded to Python values."""
        arch = meta["general.architecture"]
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"unsupported GGUF architecture {arch!r}; jaxserve serves llama and qwen2")

        def get(key, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF file lacks required key {arch}.{key}")
            return value

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        head_dim = int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
                       or hidden // heads)
        scaling = RopeScaling()
        scaling_type = meta.get(f"{arch}.rope.scaling.type")
        if scaling_type == "linear":
            scaling = RopeScaling(kind="linear", factor=float(get("rope.scaling.factor")))
        return cls(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
            head_dim=head_dim,
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            tie_word_embeddings=not has_output_weight,
            attention_bias=has_qkv_bias,
            max_position_embeddings=int(get("context_length")),
        )


DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache: `num_pages` pages of `page_size` tokens each. Page 0 is the null page."""

    page_size: int = 16
    num_pages: int = 0  # 0: derive from kv_cache_memory
    kv_cache_memory: int = 256 * 2**20  # bytes, used when num_pages is 0
    enable_prefix_caching: bool = True

    def __post_init__(self):
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a positive power of two, got {self.page_size}")
        if self.num_pages < 0 or self.kv_cache_memory <= 0:
            raise ValueError("num_pages must be >= 0 and kv_cache_memory positive")

    def resolve_num_pages(self, bytes_per_page: int) -> int:
        """The number of pages, including the null page 0."""
        pages = self.num_pages or self.kv_cache_memory // bytes_per_page
        if pages < 2:
            raise ValueError(f"KV cache too small: {pages} page(s) of {bytes_per_page} bytes; raise --kv-cache-memory")
        return pages


def pages_for(num_tokens: int, page_size: int) -> int:
    return math.ceil(num_tokens / page_size)


ATTENTION_BACKENDS = ("auto", "xla", "pallas", "native")  # the names; the registry is jaxserve.model.attention_backends
QUANTIZATIONS = ("auto", "none", "int8", "int4")
KV_CACHE_DTYPES = ("auto", "bf16", "fp32", "int8")
QUANTIZED_MATMULS = ("auto", "xla", "pallas", "native")
ACTIVATION_QUANTIZATIONS = ("none", "int8")
SPECULATIVE_METHODS = ("none", "ngram", "draft")


DEFAULT_KV_CACHE_MEMORY = 2**30  # CPU's cap when neither --kv-cache-memory nor --gpu-memory-utilization is given
ACCELERATOR_MEMORY_UTILIZATION = 0.9  # vLLM's default


def kv_budget_bytes(*, total: int, in_use: int, utilization: float, activation_bytes: int) -> int:
    """KV bytes per device under `--gpu-memory-utilization` (vLLM's meaning: the share of the device this engine
    may hold in all): utilization * total, less what the weights already hold, less a reserve for activations."""
    return max(0, int(utilization * total) - in_use - activation_bytes)


def speculative_fields(spec: dict[str, Any]) -> dict[str, Any]:
    """vLLM's `--speculative-config` JSON (or `LLM(speculative_config=...)`) → our split EngineConfig fields."""
    known = {"method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
             "disable_by_batch_size"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ValueError(f"speculative_config keys {unknown} are not supported; jaxserve reads {sorted(known)}")
    method = spec.get("method") or ("draft" if spec.get("model") else "ngram")
    method = {"draft_model": "draft"}.get(method, method)
    if method not in ("ngram", "draft"):
        raise ValueError(f"speculative_config method {method!r} is not supported; use 'ngram' or 'draft_model'")
    out: dict[str, Any] = {"speculative_method": method}
    if spec.get("model"):
        out["speculative_model"] = spec["model"]
    for src, dst in (("num_speculative_tokens", "num_speculative_tokens"),
                     ("prompt_lookup_max", "ngram_prompt_lookup_max"),
                     ("prompt_lookup_min", "ngram_prompt_lookup_min"),
                     ("disable_by_batch_size", "speculative_disable_by_batch_size")):
        if spec.get(src) is not None:
            out[dst] = int(spec[src])
    return out


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Everything the engine is built from. Field names match the server's flags (`--max-num-seqs` ...)."""

    model: str = "SmolLM2-135M-Instruct"  # a registered name, a converted checkpoint, a HF folder or a GGUF file
    dtype: str = "auto"  # auto: float32 on CPU (XLA's CPU bf16 matmuls are slow), bfloat16 on accelerators
    attention_backend: str = "auto"  # auto (Pallas on GPU/TPU if the probe passes; native on CPU), xla, pallas, native
    max_num_seqs: int = 16  # the most sequences in one step (the decode batch buckets go up to it)
    max_num_batched_tokens: int = 512  # the most tokens (prompt chunks + decodes) in one step
    max_model_len: int | None = None  # None: min(the model's context, 4096)
    block_size: int = 16  # tokens per KV page (vLLM's flag name)
    num_pages: int = 0  # KV pages (null page included); 0: sized from kv_cache_memory or gpu_memory_utilization
    kv_cache_memory: int | None = None  # KV pool bytes (e.g. 4GiB); None: sized by gpu_memory_utilization
    gpu_memory_utilization: float | None = None  # share of device memory in all; None: 0.9 (CPU: KV <= 1 GiB)
    enable_prefix_caching: bool = True  # reuse the KV pages of shared prompt prefixes (hash-chained full pages)
    tensor_parallel_size: int = 1  # devices each model replica is split over (the mesh's `model` axis)
    data_parallel_size: int = 1  # replicas of the weights (the mesh's `data` axis), each taking part of every step
    distributed: bool = False  # multi-host: initialise jax.distributed; process 0 serves, the others follow
    coordinator_address: str | None = None  # host:port of process 0 (None: $JAX_COORDINATOR_ADDRESS or auto-detect)
    num_processes: int | None = None  # None: $JAX_NUM_PROCESSES or auto-detect (TPU VMs, SLURM, ...)
    process_id: int | None = None  # None: $JAX_PROCESS_ID or auto-detect
    seed: int = 0  # the engine's base random seed (a request's `seed` overrides it for that request)
    max_logprobs: int = 20  # the most `logprobs` / `top_logprobs` a request may ask for (at most 20)
    chat_template: str | None = None  # a jinja file or an inline template; None: the model's own
    generation_config: str = "auto"  # sampling defaults: auto (the model's generation_config.json), vllm, a folder
    kv_cache_dtype: str = "auto"  # KV pages: auto (the model dtype), bf16, fp32, or int8 with per-token-head scales
    quantization: str = "auto"  # weights: auto (as stored; a Q4_x / Q8_0 GGUF in its own blocks), none, int8, int4
    quantize_embeddings: bool = False  # with --quantization int8/int4, quantize embed and lm_head too
    quantized_matmul: str = "auto"  # quantized weights' matmul: auto (native on CPU, else xla), native, xla, pallas
    activation_quantization: str = "none"  # int8: int8 activations too (native: blocks of 32; xla: W8A8 per token)
    # Speculative decoding (server-wide; see docs/speculative.md).
    speculative_method: str = "none"  # none, ngram, or draft (implied by --speculative-model)
    speculative_model: str | None = None  # draft checkpoint (same tokenizer as the model)
    num_speculative_tokens: int = 4  # K: proposals verified per request and step
    ngram_prompt_lookup_max: int = 4  # longest n-gram the ngram proposer matches
    ngram_prompt_lookup_min: int = 1  # shortest n-gram the ngram proposer matches
    speculative_min_accepted: float = 0.5  # pause proposing for requests averaging fewer accepted per verify (0: never)
    speculative_disable_by_batch_size: int = 0  # no proposals while more requests than this run (0: never; vLLM's)
    # Persistent XLA compilation cache, so a restart loads every step shape instead of compiling it again.
    compilation_cache_dir: str = "auto"  # compiled executables: auto ($JAXSERVE_CACHE/xla), a folder, or none (off)

    def __post_init__(self):
        if self.dtype not in ("auto",) + DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}; got {self.attention_backend!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least "
                             f"max_num_seqs={self.max_num_seqs} (every running sequence decodes one token a step)")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}; got {self.kv_cache_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}; got {self.quantization!r}")
        if self.activation_quantization not in ACTIVATION_QUANTIZATIONS:
            raise ValueError(f"activation_quantization must be one of {ACTIVATION_QUANTIZATIONS}; "
                             f"got {self.activation_quantization!r}")
        if self.activation_quantization != "none" and self.quantized_matmul == "pallas":
            raise ValueError("activation_quantization int8 runs the native kernel's or XLA's int8 dots; it does not "
                             "combine with quantized_matmul pallas")
        if self.quantized_matmul not in QUANTIZED_MATMULS:
            raise ValueError(f"quantized_matmul must be one of {QUANTIZED_MATMULS}; got {self.quantized_matmul!r}")
        if self.tensor_parallel_size < 1 or self.data_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size and data_parallel_size must be positive, got "
                             f"{self.tensor_parallel_size} and {self.data_parallel_size}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be positive, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < (self.num_processes or self.process_id + 1):
            raise ValueError(f"process_id={self.process_id} must be in [0, num_processes={self.num_processes})")
        if not self.compilation_cache_dir.strip():
            raise ValueError("compilation_cache_dir must be auto, none or a folder; got an empty string")
        CacheConfig(page_size=self.block_size, num_pages=self.num_pages, kv_cache_memory=self.kv_cache_memory or 1)
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError(f"max_logprobs must be in [0, 20] (the sampler's top-n is compiled for 20), "
                             f"got {self.max_logprobs}")
        if self.speculative_method not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative_method must be one of {SPECULATIVE_METHODS}; "
                             f"got {self.speculative_method!r}")
        if self.speculative_method == "draft" and not self.speculative_model:
            raise ValueError("speculative_method 'draft' needs speculative_model (the draft checkpoint)")
        if self.speculative_model and self.speculative_method == "ngram":
            raise ValueError("speculative_model is set but speculative_method is 'ngram'; pick one")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if self.speculative_disable_by_batch_size < 0:
            raise ValueError(f"speculative_disable_by_batch_size must be >= 0 (0: never), got "
                             f"{self.speculative_disable_by_batch_size}")
        if not 0 <= self.speculative_min_accepted <= self.num_speculative_tokens:
            raise ValueError(f"speculative_min_accepted must be in [0, num_speculative_tokens], got "
                             f"{self.speculative_min_accepted}")
        if not 1 <= self.ngram_prompt_lookup_min <= self.ngram_prompt_lookup_max:
            raise ValueError(f"need 1 <= ngram_prompt_lookup_min ({self.ngram_prompt_lookup_min}) <= "
                             f"ngram_prompt_lookup_max ({self.ngram_prompt_lookup_max})")

    @property
    def spec_method(self) -> str:
        """The speculative method in effect: none, ngram or draft."""
        return "draft" if self.speculative_model else self.speculative_method

    @property
    def spec_tokens(self) -> int:
        """K when speculation is on, else 0."""
        return 0 if self.spec_method == "none" else self.num_speculative_tokens

    @property
    def cache(self) -> CacheConfig:
        """The cache config with `kv_cache_memory` as given, else 1 GiB (the runner sizes it by memory instead)."""
        return CacheConfig(page_size=self.block_size, num_pages=self.num_pages,
                           kv_cache_memory=self.kv_cache_memory or DEFAULT_KV_CACHE_MEMORY,
                           enable_prefix_caching=self.enable_prefix_caching)

    def resolve_max_model_len(self, model: ModelConfig) -> int:
        if self.max_model_len is None:
            return min(model.max_position_embeddings, 4096)
        if self.max_model_len > model.max_position_embeddings:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's context of "
                             f"{model.max_position_embeddings} tokens")
        return self.max_model_len


def cache_dir() -> Path:
    """jaxserve's cache root: `$JAXSERVE_CACHE`, else `$XDG_CACHE_HOME/jaxserve`, else `~/.cache/jaxserve`.

    Converted checkpoints live under `checkpoints/`, compiled executables under `xla/`. NOTE: defined here, the
    one module every layer may import, because both the model registry and the worker need it.
    """
    if os.environ.get("JAXSERVE_CACHE"):
        return Path(os.environ["JAXSERVE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "jaxserve"
    return Path.home() / ".cache" / "jaxserve"
