"""The OpenAI-compatible HTTP server: `python -m jaxserve.server` (see `__main__`), app in `app.create_app`.

Modules, one concept each: `app` (routes, state, threads), `serving` (one generation request end to end),
`protocol` (OpenAI shapes and validation), `streaming` (engine→asyncio bridge, SSE), `errors`, `metrics`,
`guardrails`, `limits` (rate limits), `openapi`. The engine core never imports this package.
"""
