"""The host-side engine core: requests, sampling parameters, KV pages, the scheduler, request outputs.

Plain Python and numpy: no JAX, no aiohttp. Imports only `jaxserve.config` and itself, so its tests run in
milliseconds. Data flows one way: the scheduler reads requests and asks the KV cache manager for pages
(`kv_cache_manager` over `page_pool`), and emits a `SchedulerOutput` for the worker.
"""
