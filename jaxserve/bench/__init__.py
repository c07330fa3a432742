"""Benchmarking helpers behind `scripts/` (one concept per module).

  * `stats`: per-request timings (TTFT, TPOT, ITL, E2E) and their summaries; no JAX, no network.
  * `datasets`: prompts to send: a seeded synthetic generator and ShareGPT / JSONL loaders.
  * `client`: the load generator: streaming OpenAI requests with Poisson arrivals or fixed concurrency.
  * `report`: the printed tables and the latency-vs-throughput plot.
  * `roofline`: measured bandwidth and matmul rate, and the per-step floors of a Llama model.
  * `latency`: in-process engine TTFT / TPOT against the roofline.
  * `kernels`: the Pallas attention kernels and the quantized matmul timed against XLA.

The top of the stack: may import anything in `jaxserve`, `pallas_kernels` and `checkpoints_conv`; nothing
imports it but `scripts/`.
"""
