"""The model runner: owns the weights and the KV pages on the device, runs one jitted step per call.

It turns a `SchedulerOutput` (plain host data) into a bucketed `StepInputs` plus `SamplingMetadata`,
runs forward + sample as one compiled program with the KV pages donated (updated in place), and
returns a `ModelRunnerOutput` of host numpy arrays. Every bucket is compiled in `warmup()`.

Under tensor / data parallelism (`jaxserve.model.sharding`) the weights are restored straight into their
shardings, the KV pages are created sharded over KV heads, and the step is jitted with explicit in/out
shardings: host inputs in replicated, sampled tokens out replicated. With several processes
(`jaxserve.worker.distributed`) process 0 broadcasts each step's inputs and the others run the same step.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxserve.config import (
    ACCELERATOR_MEMORY_UTILIZATION,
    DEFAULT_KV_CACHE_MEMORY,
    EngineConfig,
    ModelConfig,
    kv_budget_bytes,
)
from jaxserve.model import attention_backends, llama, native_matmul, quantization, sharding
from jaxserve.model.checkpoint import load_checkpoint, read_config, stored_info
from jaxserve.model.rejection_sampler import RejectionOutput, rejection_sample
from jaxserve.model.sampler import (
    PromptLogprobInputs,
    RowSampling,
    SampleOutput,
    SamplingMetadata,
    _top_k,
    build_prompt_logprob_inputs,
    build_sampling_metadata,
    prompt_logprobs,
    sample,
)
from jaxserve.model.step_inputs import SeqChunk, StepBuckets, StepInputs, build_step_inputs
from jaxserve.worker import compilation_cache, distributed
from pallas_kernels import kv_cache

logger = logging.getLogger(__name__)


def _available_host_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), else 4 GiB where that file does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30

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
    host_seconds: float = 0.0  # of which preparing inputs on the host before dispatch
    # Speculative steps only: per sampled chunk, the emitted tokens (accepted proposals + one); token_ids,
    # logprobs and top_* then describe the first of them.
    emitted: list[list[int]] | None = None
    # Chunks that asked for prompt logprobs: request id -> (start_pos, logprobs [n], top_ids [n, NUM_LOGPROBS],
    # top_logprobs [n, NUM_LOGPROBS]) for each of the chunk's n tokens (entry i: the target after token i).
    prompt_logprobs: dict[str, tuple[int, np.ndarray, np.ndarray, np.ndarray]] | None = None


@dataclasses.dataclass
class PendingStep:
    """A dispatched step whose outputs may still be computing on the device."""

    request_ids: list[str]  # of the sampled chunks, in chunk order
    picked: list[int]  # their row indices
    out: SampleOutput  # device arrays, [R] / [R, NUM_LOGPROBS]
    start: float  # time.perf_counter() at dispatch
    host_seconds: float  # preparing the inputs
    prompt_slots: list[tuple[str, int, int, int]] | None = None  # (request id, start_pos, first flat token, tokens)


def resolve_dtype(name: str):
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


class ModelRunner:
    def __init__(self, config: EngineConfig, checkpoint_dir: str):
        self.config = config
        distributed.initialize(config)
        compilation_cache.enable(config.compilation_cache_dir)  # before the first compile below
        self.dtype = resolve_dtype(config.dtype)
        t0 = time.perf_counter()
        stored_cfg, meta = read_config(checkpoint_dir)
        self.plan = sharding.plan_sharding(stored_cfg, config.tensor_parallel_size, config.data_parallel_size)
        if config.quantized_matmul == "pallas" and jax.default_backend() == "tpu":
            raise ValueError("--quantized-matmul pallas is written for GPU (Triton) and runs on CPU in interpret "
                             "mode; it does not lower for TPU yet: use --quantized-matmul xla")
        if config.quantized_matmul == "pallas" and self.plan.mesh.size > 1:  # XLA does not partition a pallas_call
            raise ValueError("--quantized-matmul pallas runs on one device only (no shard_map yet)")
        # Every array straight into its sharding, in the weights tree; a quantized checkpoint's scales shard like
        # their values (their logical axes come from the one description, `llama.weight_info`).
        stored = stored_info(stored_cfg, meta, self.dtype)
        _, weights = load_checkpoint(checkpoint_dir, self.dtype, self.plan.shardings(stored))
        weights = sharding.repeat_kv_heads(weights, stored, self.plan)
        # NOTE: with KV heads repeated the model runs (and the cache is sized) as if it had that many.
        self.model_config = cfg = sharding.serving_config(stored_cfg, self.plan)
        dense = llama.weight_info(cfg, self.dtype)
        weights = quantization.engine_quantization(weights, dense, config.quantization, config.quantize_embeddings,
                                                   self.dtype)
        # NOTE: resolved once here: auto is the native CPU kernel where it builds (one device, some quantized
        # weight), else XLA; with native, an embedding that int8 blocks of 32 represent bit for bit becomes one.
        self.quantized_matmul, weights = native_matmul.prepare(config.quantized_matmul, self.plan.mesh.size,
                                                               weights, dense)
        if config.activation_quantization == "int8" and self.quantized_matmul == "xla":
            # W8A8 through XLA: int8 per-channel weights for its int8 dots (the native kernel reads int4 as stored)
            weights = quantization.w8a8_weights(weights, dense, self.dtype, config.quantize_embeddings)
        self.weight_info = quantization.info_like(dense, weights)  # each weight as it is now (scheme, group)
        # (De)quantizing leaves arrays where XLA put them: place each by its logical axes.
        self.weights = sharding.place_weights(weights, self.weight_info, self.plan)
        if self.quantized_matmul == "native":  # NOTE: one device; the kernel streams each tile's weights
            self.weights = native_matmul.tile_layers(self.weights)
        logger.info("loaded %s (%s, quantization %s: %.1f MiB of weights) in %.1fs", checkpoint_dir,
                    jnp.dtype(self.dtype).name, config.quantization, quantization.weight_bytes(self.weights) / 2**20,
                    time.perf_counter() - t0)
        self.max_model_len = config.resolve_max_model_len(cfg)
        self.page_size = config.block_size
        self.max_pages_per_seq = -(-self.max_model_len // self.page_size)
        self.kv_dtype = kv_cache.kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.num_pages = self._num_kv_pages(config, cfg)
        kv_sharding = sharding.kv_cache_sharding(self.plan, self.kv_dtype)
        kv_shape = llama.kv_cache_shape(cfg, self.num_pages, self.page_size)
        self.kv_pages = jax.jit(lambda: kv_cache.allocate_kv_pages(kv_shape, self.kv_dtype),
                                out_shardings=kv_sharding)()
        self.spec_tokens = config.spec_tokens  # K > 0: verify steps (execute_spec) are compiled too
        self.buckets = StepBuckets(config.max_num_seqs, config.max_num_batched_tokens, self.spec_tokens + 1)
        self.attention_backend, attention = attention_backends.select_attention(
            config.attention_backend, shape=attention_backends.ProbeShape.for_model(
                cfg, self.page_size, self.kv_dtype, self.plan.tensor_parallel_size))
        self.attention = sharding.shard_attention(attention, self.plan)
        weight_shardings = jax.tree.map(lambda a: a.sharding, self.weights)  # as placed (and tiled) above
        # NOTE: --quantized-matmul pallas / native route quantized projections to the Pallas kernel (interpreted on
        # CPU) / the native CPU kernel; dense weights take qdot either way.
        int8 = config.activation_quantization == "int8"
        self.matmul = {"pallas": quantization.qdot_pallas,
                       "native": native_matmul.qdot_native_q8 if int8 else native_matmul.qdot_native,
                       "xla": quantization.qdot_w8a8 if int8 else quantization.qdot}[self.quantized_matmul]
        self._step = BucketExecutables(jit_step(cfg, self.attention, self.plan, self.matmul, weight_shardings,
                                                kv_sharding))
        self._verify = BucketExecutables(jit_verify_step(cfg, self.attention, self.plan, self.matmul, kv_sharding))
        self.draft_probs_in_verify = config.spec_method == "draft"
        self._log_memory()
        self._channel = None
        if jax.process_count() > 1:
            if self.spec_tokens:
                raise ValueError("speculative decoding is not supported with --distributed yet")
            self._channel = distributed.StepChannel(self._placeholder_inputs(1, 1))
            if distributed.is_leader():
                atexit.register(self.close)

    def _num_kv_pages(self, config: EngineConfig, cfg: ModelConfig) -> int:
        """--num-pages, else --kv-cache-memory, else the share of free memory --gpu-memory-utilization leaves.

        NOTE: weights are already on the device, so `bytes_in_use` counts them. On CPU (no memory stats) the
        budget is the same share of the host's available RAM, capped at 1 GiB unless the flag was given.
        """
        bytes_per_page = llama.kv_bytes_per_page(cfg, self.page_size, self.kv_dtype)
        if config.num_pages or config.kv_cache_memory:
            return config.cache.resolve_num_pages(bytes_per_page)
        devices = self.plan.mesh.devices.flatten()
        stats = [d.memory_stats() or {} for d in devices]
        # Logits (f32) and a few activations of the largest step bucket, per device.
        activations = 4 * config.max_num_batched_tokens * (cfg.vocab_size + 4 * cfg.hidden_size
                                                           + 2 * cfg.intermediate_size)
        if all("bytes_limit" in s for s in stats):
            util = config.gpu_memory_utilization or ACCELERATOR_MEMORY_UTILIZATION
            per_device = min(kv_budget_bytes(total=s["bytes_limit"], in_use=s.get("bytes_in_use", 0),
                                             utilization=util, activation_bytes=activations) for s in stats)
            # A page's heads are split over the `model` axis (each KV head possibly repeated kv_replicas times).
            per_device_page = bytes_per_page * self.plan.kv_replicas / self.plan.tensor_parallel_size
            pages = int(per_device // per_device_page)
            logger.info("KV pool sized by --gpu-memory-utilization %.2f: %d pages (%.1f MiB per device)",
                        util, pages, pages * per_device_page / 2**20)
        else:
            available = _available_host_memory()
            util = config.gpu_memory_utilization or ACCELERATOR_MEMORY_UTILIZATION
            budget = kv_budget_bytes(total=available, in_use=0, utilization=util, activation_bytes=activations)
            if config.gpu_memory_utilization is None:
                budget = min(budget, DEFAULT_KV_CACHE_MEMORY)
            pages = budget // bytes_per_page
            logger.info("KV pool on the host: %d pages (%.1f MiB of %.1f MiB available)", pages,
                        pages * bytes_per_page / 2**20, available / 2**20)
        if pages < 2:
            raise ValueError(f"no memory left for the KV cache ({pages} page(s) of {bytes_per_page} bytes fit); "
                             f"raise --gpu-memory-utilization or give --kv-cache-memory")
        return pages

    def _log_memory(self) -> None:
        held = sharding.per_device_bytes(self.weights, self.kv_pages)
        mib = sorted({round(b / 2**20, 1) for b in held.values()})
        logger.info("mesh %s; per-device memory after load (weights + KV pages): %s MiB on %d device(s)%s",
                    dict(self.plan.mesh.shape), " / ".join(map(str, mib)), len(held),
                    f"; each KV head repeated {self.plan.kv_replicas}x" if self.plan.kv_replicas > 1 else "")
        for device in self.plan.mesh.devices.flat:
            stats = device.memory_stats() if device.process_index == jax.process_index() else None
            if stats and "bytes_in_use" in stats:
                logger.info("device %s: %.1f MiB in use", device, stats["bytes_in_use"] / 2**20)

    def _placeholder_inputs(self, num_tokens: int, num_rows: int):
        return placeholder_inputs(num_tokens, num_rows, page_size=self.page_size,
                                  max_pages_per_seq=self.max_pages_per_seq, vocab_size=self.vocab_size,
                                  max_model_len=self.max_model_len)

    def _run(self, step: StepInputs, md: SamplingMetadata, plp: PromptLogprobInputs):
        """Runs the jitted step on every process (the leader broadcasts the inputs first)."""
        if self._channel is not None:
            if distributed.is_leader():
                self._channel.send((step, md, plp))
            step, md, plp = distributed.to_global((step, md, plp), self.plan.replicated)
        out, self.kv_pages = self._step(self.weights, self.kv_pages, step, md, plp)
        return out

    def _compile(self, num_tokens: int, num_rows: int) -> None:
        """Compiles (or loads from the persistent compilation cache) one bucket's executables, without running."""
        if self.spec_tokens:  # verify steps; steps without proposals take the plain step
            self._verify.compile(self.weights, self.kv_pages, *self._verify_inputs([], [], None, num_tokens, num_rows))
        self._step.compile(self.weights, self.kv_pages, *self._placeholder_inputs(num_tokens, num_rows))

    def follow(self) -> None:
        """Followers of a multi-process run: run the leader's steps until it sends STOP."""
        if self._channel is None or distributed.is_leader():
            raise RuntimeError("follow() runs only on processes other than 0 of a multi-process run")
        while (inputs := self._channel.receive()) is not None:
            jax.block_until_ready(self._run(*inputs))

    def close(self) -> None:
        """Leader of a multi-process run: tells the followers to stop (idempotent; no-op otherwise)."""
        if self._channel is not None and distributed.is_leader():
            self._channel.send_stop()
            self._channel = None

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def step_hlo(self, num_tokens: int, num_rows: int) -> str:
        """The compiled HLO text of the step for one bucket (to inspect its collectives and fusions)."""
        inputs = self._placeholder_inputs(num_tokens, num_rows)
        return self._step.compile(self.weights, self.kv_pages, *inputs).as_text()

    def num_compiled(self) -> int:
        """Executables this runner has (compiled, or loaded from the persistent cache), verify steps included."""
        return len(self._step) + len(self._verify)

    def warmup(self) -> float:
        """Compiles every step shape once (ahead of time: nothing runs); returns the seconds it took.

        NOTE: compiling without running keeps a restart short: with the persistent compilation cache warm, each
        bucket only traces, lowers and loads its executable. Multi-process runs also run each bucket, so the
        followers (which compile as they receive steps) are warm too.
        """
        t0 = time.perf_counter()
        # NOTE: disable=None: no bar unless stderr is a terminal, so it never runs into log lines in a file.
        for num_tokens, num_rows in tqdm(self.buckets.shapes(), desc="warm-up: compiling step shapes", unit="shape",
                                         disable=None):
            self._compile(num_tokens, num_rows)
            if self._channel is not None:
                jax.block_until_ready(self._run(*self._placeholder_inputs(num_tokens, num_rows)))
        seconds = time.perf_counter() - t0
        logger.info("warm-up compiled %d step shapes in %.1fs", len(self.buckets.shapes()), seconds)
        return seconds

    def execute(self, chunks, rows: list[RowSampling | None],
                prompt_targets: list[list[int] | None] | None = None) -> ModelRunnerOutput:
        """Runs one step. `chunks` are `SeqChunk`-like; `rows[i]` is the sampling of chunk i or None."""
        return self.collect(self.dispatch(chunks, rows, prompt_targets))

    def dispatch(self, chunks, rows: list[RowSampling | None],
                 prompt_targets: list[list[int] | None] | None = None) -> PendingStep:
        """Builds the inputs and launches the step; returns at once (JAX dispatch is asynchronous), so the
        host can do other work while the device runs. `collect()` it before the next `dispatch()`.

        `prompt_targets[i]`, where not None, holds for each token of chunk i the token whose log-prob its logits
        should give (-1: none): the chunk's prompt logprobs come back in `ModelRunnerOutput.prompt_logprobs`.
        """
        t0 = time.perf_counter()
        lens = [len(c.token_ids) for c in chunks]
        num_tokens, num_rows = self.buckets.choose(sum(lens), len(chunks))
        step = build_step_inputs(chunks, num_tokens=num_tokens, num_rows=num_rows, page_size=self.page_size,
                                 max_pages_per_seq=self.max_pages_per_seq)
        md = build_sampling_metadata(rows, num_rows, self.vocab_size, self.max_model_len)
        prompt_targets = prompt_targets or [None] * len(chunks)
        plp = build_prompt_logprob_inputs(prompt_targets, lens, num_tokens)
        slots = [(c.request_id, c.start_pos, int(s), n)
                 for c, t, s, n in zip(chunks, prompt_targets, np.cumsum([0] + lens), lens) if t is not None]
        t1 = time.perf_counter()
        out = self._run(step, md, plp)
        picked = [i for i, r in enumerate(rows) if r is not None]
        return PendingStep([chunks[i].request_id for i in picked], picked, out, t0, t1 - t0, slots or None)

    def collect(self, pending: PendingStep) -> ModelRunnerOutput:
        """Waits for a dispatched step and copies its sampled tokens (and any prompt logprobs) to the host."""
        token_ids, logprobs, top_ids, top_logprobs = self._fetch(pending.out)
        picked = pending.picked
        prompt = None
        if pending.prompt_slots:
            p = jax.device_get(pending.out.prompt)
            prompt = {rid: (pos, p.logprobs[s:s + n], p.top_ids[s:s + n], p.top_logprobs[s:s + n])
                      for rid, pos, s, n in pending.prompt_slots}
        return ModelRunnerOutput(
            request_ids=pending.request_ids, token_ids=token_ids[picked], logprobs=logprobs[picked],
            top_ids=top_ids[picked], top_logprobs=top_logprobs[picked],
            step_seconds=time.perf_counter() - pending.start, host_seconds=pending.host_seconds,
            prompt_logprobs=prompt)

    def _fetch(self, out) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The one blocking device-to-host copy of a step's sampled outputs."""
        return jax.device_get((out.token_ids, out.logprobs, out.top_ids, out.top_logprobs))

    def execute_spec(self, chunks, rows: list[list[RowSampling] | None], draft_probs: jax.Array | None = None, *,
                     num_tokens: int | None = None, num_rows: int | None = None) -> ModelRunnerOutput:
        """Runs one verify step: chunks may end with `num_spec` proposals, checked by rejection sampling.

        Args:
          chunks: `SeqChunk`-like, with `num_spec`.
          rows: per chunk, its L = K + 1 sub-row samplings (sub-row j samples position num_tokens + j), or None.
          draft_probs: [len(chunks), K, V] device array of the draft's probabilities when the method is
            "draft" (rows without proposals: anything), else None.
          num_tokens, num_rows: force a bucket (warm-up).
        """
        t0 = time.perf_counter()
        if num_tokens is None:
            num_tokens, num_rows = self.buckets.choose(sum(len(c.token_ids) for c in chunks), len(chunks))
        inputs = self._verify_inputs(chunks, rows, draft_probs, num_tokens, num_rows)
        t1 = time.perf_counter()
        out, rej, self.kv_pages = self._verify(self.weights, self.kv_pages, *inputs)
        picked = [i for i, r in enumerate(rows) if r is not None]
        token_ids, logprobs, top_ids, top_logprobs, emitted, num_emitted = jax.device_get(
            (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs, rej.token_ids, rej.num_emitted))
        return ModelRunnerOutput(
            request_ids=[chunks[i].request_id for i in picked], token_ids=token_ids[picked],
            logprobs=logprobs[picked], top_ids=top_ids[picked], top_logprobs=top_logprobs[picked],
            step_seconds=time.perf_counter() - t0, host_seconds=t1 - t0,
            emitted=[emitted[i, :num_emitted[i]].tolist() for i in picked])

    def _verify_inputs(self, chunks, rows, draft_probs, num_tokens: int, num_rows: int) -> tuple:
        """The verify step's inputs after the weights and pages: (step, md, draft_ids, num_draft, draft_probs)."""
        K, L = self.spec_tokens, self.spec_tokens + 1
        step = build_step_inputs([SeqChunk(c.token_ids, c.start_pos, c.page_table, c.num_spec) for c in chunks],
                                 num_tokens=num_tokens, num_rows=num_rows, page_size=self.page_size,
                                 max_pages_per_seq=self.max_pages_per_seq, logits_per_row=L)
        sub_rows: list[RowSampling | None] = []
        draft_ids = np.zeros((num_rows, K), np.int32)
        num_draft = np.zeros(num_rows, np.int32)
        for r in range(num_rows):
            sub_rows.extend(rows[r] if r < len(rows) and rows[r] is not None else [None] * L)
            if r < len(chunks) and chunks[r].num_spec:
                k = chunks[r].num_spec
                draft_ids[r, :k] = chunks[r].token_ids[-k:]
                num_draft[r] = k
        md = build_sampling_metadata(sub_rows, num_rows * L, self.vocab_size, self.max_model_len)
        if self.draft_probs_in_verify:
            if draft_probs is None:
                draft_probs = jnp.zeros((num_rows, K, self.vocab_size), jnp.float32)
            elif draft_probs.shape[0] < num_rows:
                draft_probs = jnp.pad(draft_probs, ((0, num_rows - draft_probs.shape[0]), (0, 0), (0, 0)))
        else:
            draft_probs = None
        return step, md, draft_ids, num_draft, draft_probs


class BucketExecutables:
    """One jitted step's executables, compiled ahead of time, one per bucket.

    A call runs the executable of its arguments' shapes, compiling it first only if warm-up did not (LLM(...,
    warmup=False)); `len()` counts them, so "nothing compiled after warm-up" is a plain count.
    """

    def __init__(self, jitted):
        self.jitted = jitted
        self._by_shape: dict[tuple, jax.stages.Compiled] = {}

    @staticmethod
    def _key(args) -> tuple:
        leaves, treedef = jax.tree.flatten(args[2:])  # the per-step inputs; weights and pages never change shape
        return treedef, tuple(np.shape(x) for x in leaves)

    def compile(self, *args) -> jax.stages.Compiled:
        key = self._key(args)
        exe = self._by_shape.get(key)
        if exe is None:
            exe = self._by_shape[key] = self.jitted.lower(*args).compile()
        return exe

    def __call__(self, *args):
        return self.compile(*args)(*args)

    def __len__(self) -> int:
        return len(self._by_shape)


def placeholder_inputs(num_tokens: int, num_rows: int, *, page_size: int, max_pages_per_seq: int, vocab_size: int,
                       max_model_len: int) -> tuple[StepInputs, SamplingMetadata, PromptLogprobInputs]:
    """All-padding inputs of one bucket (warm-up, AOT export): K/V writes land in the null page 0 and outputs
    are discarded."""
    step = build_step_inputs([], num_tokens=num_tokens, num_rows=num_rows, page_size=page_size,
                             max_pages_per_seq=max_pages_per_seq)
    return (step, build_sampling_metadata([None] * num_rows, num_rows, vocab_size, max_model_len),
            build_prompt_logprob_inputs([], [], num_tokens))


def jit_step(cfg: ModelConfig, attention, plan: sharding.ShardingPlan, matmul, weight_shardings, kv_sharding):
    """The serving step (forward + sample, KV pages donated) jitted with the mesh's shardings: what the runner
    runs and `scripts/export_step.py` lowers. Host inputs come in replicated; sampled tokens go out replicated.

    `attention` is the backend's function already wrapped by `sharding.shard_attention`.
    """
    rep = plan.replicated
    return jax.jit(functools.partial(_step, cfg=cfg, attention=attention, plan=plan, matmul=matmul),
                   in_shardings=(weight_shardings, kv_sharding, rep, rep, rep),
                   out_shardings=(rep, kv_sharding), donate_argnums=(1,))


def jit_verify_step(cfg: ModelConfig, attention, plan: sharding.ShardingPlan, matmul, kv_sharding):
    """The speculative verify step (forward + rejection sampling, KV pages donated), jitted."""
    rep = plan.replicated
    return jax.jit(functools.partial(_verify_step, cfg=cfg, attention=attention, plan=plan, matmul=matmul),
                   out_shardings=(rep, rep, kv_sharding), donate_argnums=(1,))


def _verify_step(weights: llama.LlamaWeights, kv_pages: jax.Array, step: StepInputs, md: SamplingMetadata,
                 draft_ids: jax.Array, num_draft: jax.Array, draft_probs: jax.Array | None, *, cfg: ModelConfig,
                 attention, plan: sharding.ShardingPlan,
                 matmul=quantization.qdot) -> tuple[SampleOutput, RejectionOutput, jax.Array]:
    logits, kv_pages = llama.forward(weights, kv_pages, step, cfg, attention, plan, matmul)  # [R * L, V]
    logits = plan.constrain(logits, (None, None))
    num_rows, k = draft_ids.shape
    logits = logits.reshape(num_rows, k + 1, -1)  # [R, L, V]
    rej = rejection_sample(logits, draft_ids, num_draft, md, draft_probs)
    # Log-probs of the first emitted token (rows with logprobs get no proposals: see docs/speculative.md).
    raw = logits[:, 0]  # [R, V]
    lse = jax.nn.logsumexp(raw, axis=-1)
    top_vals, top_ids = _top_k(raw, NUM_LOGPROBS)
    first = rej.token_ids[:, 0]
    chosen = jnp.take_along_axis(raw, first[:, None], axis=-1)[:, 0] - lse
    return SampleOutput(first, chosen, top_ids, top_vals - lse[:, None]), rej, kv_pages


def _step(weights: llama.LlamaWeights, kv_pages: jax.Array, step: StepInputs, md: SamplingMetadata,
          plp: PromptLogprobInputs, *, cfg: ModelConfig, attention, plan: sharding.ShardingPlan,
          matmul=quantization.qdot):
    logits, kv_pages, x = llama.forward(weights, kv_pages, step, cfg, attention, plan, matmul, return_hidden=True)
    logits = plan.constrain(logits, (None, None))  # [R, V] gathered over the vocabulary: sampling needs it whole
    out = sample(logits, md, num_logprobs=NUM_LOGPROBS)

    def head(x_blk):  # [S, D] -> [S, V], gathered like the sampled rows' logits
        # NOTE: computed over each device's vocabulary shard first, then gathered: left to itself XLA may
        # all-gather the whole LM head instead (measured at TP=8 on the tiny model).
        logits = plan.constrain(llama.lm_head(weights, x_blk, cfg, matmul), (None, "vocab"))
        return plan.constrain(logits, (None, None))

    # NOTE: prompt logprobs are part of every bucket's one program (skipped by a cond when no slot asks), so a
    # request that asks for them compiles nothing after warm-up.
    return dataclasses.replace(out, prompt=prompt_logprobs(x, plp, head, num_logprobs=NUM_LOGPROBS)), kv_pages
