"""The jitted model: pure jnp functions the serving step calls.

`step_inputs` (bucketed per-step inputs), `attention` (the XLA paged attention) and `attention_backends`
(which implementation serves a bucket), `llama` (the decoder over a params pytree), `weight_info` (each
weight described once: `ArrayInfo`), `sampler` and `rejection_sampler`, `quantization` (int8 / int4
weights), `sharding` (logical axes -> mesh), `checkpoint` (orbax save / restore of the weights), `scoring`
(teacher-forced log-likelihoods).

May import `jaxserve.config`, `jaxserve.core` (plain request data such as sampling parameters) and
`pallas_kernels`; never the engine, the worker, the spec decoder or the server.
"""
