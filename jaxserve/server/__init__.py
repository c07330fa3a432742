"""The OpenAI-compatible HTTP server: `python -m jaxserve.server` (see `__main__`), app in `app.create_app`.

Modules, one concept each: `app` (routes, state, threads), `serving` (one generation request end to end),
`protocol` (OpenAI shapes and validation), `streaming` (engine→asyncio bridge, SSE), `errors`, `metrics`,
`guardrails`, `limits` (rate limits), `openapi`, `batch` (the OpenAI Batch-file front end), `cost` (serving
arithmetic behind the cost gauges).

No JAX at import: it talks to the engine through `jaxserve.engine_client.EngineClient` and may import
`jaxserve.core`, `jaxserve.text` and `jaxserve.config`. `__main__` builds the engine (lazily, off the event
loop). The engine core never imports this package.
"""
