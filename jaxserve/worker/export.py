"""Ahead-of-time lowering of the serving step for a platform this machine does not have (`scripts/export_step.py`).

Every warm-up bucket of the step the `ModelRunner` compiles (`model_runner.jit_step`: forward with the Pallas
attention, sampling, KV pages donated, the tensor-parallel mesh) is lowered with `jax.export` for TPU or CUDA
from abstract weights (`jax.ShapeDtypeStruct`s: no checkpoint needed), then the lowered module is searched
for the Pallas kernels: Mosaic's `tpu_custom_call` on TPU; on CUDA the Triton custom call
`__gpu$xla.gpu.triton` (our kernels ask for Triton through `plgpu.CompilerParams`) or Mosaic GPU's
`mosaic_gpu*`. The mesh is made of fake CPU devices (the caller sets
`--xla_force_host_platform_device_count` before JAX starts).

NOTE: two things in the lowered step still follow the host, not the target platform: the sampler's
row chunking (`sampler.CPU_ROWS_PER_CHUNK`, chosen from `jax.default_backend()`), and, on TPU, the chip the
Mosaic lowering is told about (`tpu_chip`, since no TPU is attached to describe itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp

from jaxserve.config import EngineConfig, ModelConfig, RopeScaling
from jaxserve.model import attention_backends, llama, quantization, sharding, weight_info
from jaxserve.model.step_inputs import StepBuckets
from jaxserve.worker import model_runner
from pallas_kernels import kv_cache

# Llama-3-8B's shape (meta-llama/Meta-Llama-3.1-8B): for lowering with abstract weights only.
LLAMA3_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=131072,
                        rms_norm_eps=1e-5, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
BUILTIN_MODELS = {"llama3-8b": LLAMA3_8B}

# Custom-call targets of Pallas kernels, per platform.
PALLAS_TARGETS = {"tpu": ("tpu_custom_call",), "cuda": ("__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2")}
# NOTE: jax.export refuses custom calls without a compatibility guarantee; Triton's has none (Mosaic TPU's
# has), so a serialized CUDA step is only good for the jaxlib that lowered it.
UNSTABLE_TARGETS = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w$.]+)")
_KERNEL_NAME = re.compile(r"((?:tpu_)?ragged_paged_attention|paged_decode_attention)_M\d+_H\d+_[CS]\d+")


@dataclasses.dataclass
class BucketReport:
    num_tokens: int
    num_rows: int
    seconds: float
    devices: int = 0  # of the exported (sharded) program
    pallas_calls: int = 0  # custom-call sites of Pallas kernels (the layers are a lax.scan: one site serves all)
    kernels: list[str] = dataclasses.field(default_factory=list)  # the pallas_call names found
    error: str | None = None

    def line(self) -> str:
        head = f"bucket T={self.num_tokens:<5d} R={self.num_rows:<4d} {self.seconds:6.1f}s"
        if self.error:
            return f"{head}  FAILED: {self.error}"
        kernels = ", ".join(self.kernels) or "-"
        return f"{head}  devices: {self.devices}  pallas calls: {self.pallas_calls}  kernels: {kernels}"


@contextlib.contextmanager
def describe_tpu(platform: str, chip: str) -> Iterator[None]:
    """Tells the Mosaic lowering which TPU it lowers for: with no TPU attached it asks the CPU device."""
    if platform != "tpu":
        yield
        return
    from jax._src.pallas.mosaic import tpu_info  # private: there is no public way to name a target chip yet

    kind = jax.devices()[0].device_kind
    version = getattr(tpu_info.ChipVersion, f"TPU_{chip.upper()}")
    old = tpu_info.registry.get(kind)
    tpu_info.registry[kind] = lambda: tpu_info.get_tpu_info_for_chip(version, 1)
    try:
        yield
    finally:
        if old is None:
            tpu_info.registry.pop(kind, None)
        else:
            tpu_info.registry[kind] = old


def abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def export_step(config: EngineConfig, stored_cfg: ModelConfig, platform: str, *, tpu_chip: str = "v5e",
                max_buckets: int | None = None) -> list[BucketReport]:
    """Lowers every warm-up bucket of the serving step for `platform` ("tpu" or "cuda"); one report each.

    `config` gives the parallelism, buckets, page size and dtypes as for serving; weights are abstract.
    """
    if platform not in PALLAS_TARGETS:
        raise ValueError(f"platform must be one of {sorted(PALLAS_TARGETS)}; got {platform!r}")
    dtype = jnp.bfloat16 if config.dtype == "auto" else jnp.dtype(config.dtype)
    plan = sharding.plan_sharding(stored_cfg, config.tensor_parallel_size, config.data_parallel_size)
    cfg = sharding.serving_config(stored_cfg, plan)
    dense = llama.weight_info(cfg, dtype)
    weights = jax.eval_shape(lambda w: quantization.engine_quantization(
        w, dense, config.quantization, config.quantize_embeddings, dtype), weight_info.abstract(dense))
    weight_shardings = plan.shardings(quantization.info_like(dense, weights))

    max_model_len = config.resolve_max_model_len(cfg)
    page_size = config.block_size
    max_pages_per_seq = -(-max_model_len // page_size)
    kv_dtype = kv_cache.kv_cache_dtype(config.kv_cache_dtype, dtype)
    num_pages = config.num_pages or config.cache.resolve_num_pages(llama.kv_bytes_per_page(cfg, page_size, kv_dtype))
    kv_sharding = sharding.kv_cache_sharding(plan, kv_dtype)
    kv_pages = abstract(jax.eval_shape(lambda: kv_cache.allocate_kv_pages(
        llama.kv_cache_shape(cfg, num_pages, page_size), kv_dtype)), kv_sharding)

    name, attention = attention_backends.select_attention("pallas", platform)
    step_fn = model_runner.jit_step(cfg, sharding.shard_attention(attention, plan), plan, quantization.qdot,
                                    weight_shardings, kv_sharding)
    buckets = StepBuckets(config.max_num_seqs, config.max_num_batched_tokens).shapes()
    reports = []
    for num_tokens, num_rows in buckets[:max_buckets]:
        t0 = time.perf_counter()
        report = BucketReport(num_tokens, num_rows, 0.0)
        try:
            inputs = model_runner.placeholder_inputs(num_tokens, num_rows, page_size=page_size,
                                                     max_pages_per_seq=max_pages_per_seq,
                                                     vocab_size=cfg.vocab_size, max_model_len=max_model_len)
            inputs = abstract(inputs, jax.tree.map(lambda _: plan.replicated, inputs))
            with describe_tpu(platform, tpu_chip):
                exported = jax.export.export(step_fn, platforms=[platform], disabled_checks=UNSTABLE_TARGETS)(
                    abstract(weights, weight_shardings), kv_pages, *inputs)
            text = exported.mlir_module()
            report.devices = exported.nr_devices
            targets = _CUSTOM_CALL.findall(text)
            report.pallas_calls = sum(t in PALLAS_TARGETS[platform] or t.startswith("mosaic_gpu") for t in targets)
            report.kernels = sorted(set(m.group(0) for m in _KERNEL_NAME.finditer(text)))
            if not report.pallas_calls:
                report.error = f"lowered without a Pallas kernel (custom calls: {sorted(set(targets)) or 'none'})"
        except Exception as e:  # noqa: BLE001 - reported per bucket; the caller exits 1
            report.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        report.seconds = time.perf_counter() - t0
        reports.append(report)
    return reports
