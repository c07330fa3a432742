"""The model runner: owns the weights and the KV pages on the device, runs one jitted step per call.

It turns a `SchedulerOutput` (plain host data) into a bucketed `StepInputs` plus `SamplingMetadata`,
runs forward + sample as one compiled program with the KV pages donated (updated in place), and
returns a `ModelRunnerOutput` of host numpy arrays. Every bucket is compiled in `warmup()`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxserve import llama, quantization
from jaxserve.attention import ATTENTION_BACKENDS
from jaxserve.checkpoint import load_checkpoint
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.sampler import RowSampling, SamplingMetadata, build_sampling_metadata, sample
from jaxserve.step_inputs import SeqChunk, StepBuckets, StepInputs, build_step_inputs

logger = logging.getLogger(__name__)

NUM_LOGPROBS = 20  # top-n alternatives computed for every row; rows that asked for fewer are cut on the host


@dataclasses.dataclass
class ModelRunnerOutput:
    """Per scheduled chunk with `sample=True`, in chunk order (host numpy arrays)."""

    request_ids: list[str]
    token_ids: np.ndarray  # [n] int32
    logprobs: np.ndarray  # [n] float32, log-prob of the chosen token under the raw distribution
    top_ids: np.ndarray  # [n, NUM_LOGPROBS]
    top_logprobs: np.ndarray  # [n, NUM_LOGPROBS]
    step_seconds: float = 0.0
    host_seconds: float = 0.0  # time spent preparing inputs on the host before dispatch


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def resolve_attention(name: str):
    if name == "auto":
        name = "pallas" if jax.default_backend() != "cpu" and "pallas" in ATTENTION_BACKENDS else "xla"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not available here; have {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]


class ModelRunner:
    def __init__(self, config: EngineConfig, checkpoint_dir: str):
        self.config = config
        self.dtype = resolve_dtype(config.dtype)
        t0 = time.perf_counter()
        self.model_config, self.weights = load_checkpoint(checkpoint_dir, self.dtype)
        cfg = self.model_config
        self.weights = llama.weights_from_flat(quantization.engine_quantization(
            llama.weights_to_flat(self.weights), llama.param_table(cfg), config.quantization,
            config.quantize_embeddings, self.dtype))
        logger.info("loaded %s (%s, quantization %s: %.1f MiB of weights) in %.1fs", checkpoint_dir,
                    jnp.dtype(self.dtype).name, config.quantization, quantization.weight_bytes(self.weights) / 2**20,
                    time.perf_counter() - t0)
        self.max_model_len = config.resolve_max_model_len(cfg)
        self.page_size = config.block_size
        self.max_pages_per_seq = -(-self.max_model_len // self.page_size)
        self.num_pages = config.cache.resolve_num_pages(llama.kv_bytes_per_page(cfg, self.page_size, self.dtype))
        self.kv_pages = jnp.zeros(llama.kv_cache_shape(cfg, self.num_pages, self.page_size), self.dtype)
        self.buckets = StepBuckets(config.max_num_seqs, config.max_num_batched_tokens)
        self.attention = resolve_attention(config.attention_backend)
        self._step = jax.jit(functools.partial(_step, cfg=cfg, attention=self.attention), donate_argnums=(1,))

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def num_compiled(self) -> int:
        return self._step._cache_size()

    def warmup(self) -> float:
        """Compiles every step shape once; returns the seconds it took."""
        t0 = time.perf_counter()
        for num_tokens, num_rows in tqdm(self.buckets.shapes(), desc="warm-up: compiling step shapes", unit="shape"):
            # All-padding inputs: K/V writes land in the null page 0 and outputs are discarded.
            step = build_step_inputs([], num_tokens=num_tokens, num_rows=num_rows, page_size=self.page_size,
                                     max_pages_per_seq=self.max_pages_per_seq)
            md = build_sampling_metadata([None] * num_rows, num_rows, self.vocab_size, self.max_model_len)
            out, self.kv_pages = self._step(self.weights, self.kv_pages, step, md)
            jax.block_until_ready(out)
        seconds = time.perf_counter() - t0
        logger.info("warm-up compiled %d step shapes in %.1fs", len(self.buckets.shapes()), seconds)
        return seconds

    def execute(self, chunks, rows: list[RowSampling | None]) -> ModelRunnerOutput:
        """Runs one step. `chunks` are `SeqChunk`-like; `rows[i]` is the sampling of chunk i or None."""
        t0 = time.perf_counter()
        num_tokens, num_rows = self.buckets.choose(sum(len(c.token_ids) for c in chunks), len(chunks))
        step = build_step_inputs([SeqChunk(c.token_ids, c.start_pos, c.block_table) for c in chunks],
                                 num_tokens=num_tokens, num_rows=num_rows, page_size=self.page_size,
                                 max_pages_per_seq=self.max_pages_per_seq)
        md = build_sampling_metadata(list(rows) + [None] * (num_rows - len(rows)), num_rows, self.vocab_size,
                                     self.max_model_len)
        t1 = time.perf_counter()
        out, self.kv_pages = self._step(self.weights, self.kv_pages, step, md)
        picked = [i for i, r in enumerate(rows) if r is not None]
        token_ids, logprobs, top_ids, top_logprobs = jax.device_get(
            (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs))
        return ModelRunnerOutput(
            request_ids=[chunks[i].request_id for i in picked], token_ids=token_ids[picked],
            logprobs=logprobs[picked], top_ids=top_ids[picked], top_logprobs=top_logprobs[picked],
            step_seconds=time.perf_counter() - t0, host_seconds=t1 - t0)


def _step(weights: llama.LlamaWeights, kv_pages: jax.Array, step: StepInputs, md: SamplingMetadata, *,
          cfg: ModelConfig, attention):
    logits, kv_pages = llama.forward(weights, kv_pages, step, cfg, attention)
    return sample(logits, md, num_logprobs=NUM_LOGPROBS), kv_pages
