"""Benchmarking, offline batch and cost helpers behind `scripts/` (one concept per module).

  * `stats`: per-request timings (TTFT, TPOT, ITL, E2E) and their summaries; no JAX, no network.
  * `datasets`: prompts to send: a seeded synthetic generator and ShareGPT / JSONL loaders.
  * `client`: the load generator: streaming OpenAI requests with Poisson arrivals or fixed concurrency.
  * `report`: the printed tables and the latency-vs-throughput plot.
  * `roofline`: measured bandwidth and matmul rate, and the per-step floors of a Llama model.
  * `latency`: in-process engine TTFT / TPOT against the roofline.
  * `batch`: OpenAI batch-format JSONL in, results out, through the in-process engine.
  * `cost`: serving arithmetic (cost per 1M tokens, per month, break-even); the server's gauges use it.

Nothing is imported here, so `jaxserve.bench.cost` stays cheap for the server.
"""
