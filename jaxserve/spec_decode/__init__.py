"""Speculative decoding: proposers (n-gram, draft model), the host-side `decoder` that turns proposals into
verify steps and accepted tokens, and `draft_init` (a draft model cut from the target).

Sits beside the worker: may import `jaxserve.core`, `jaxserve.model`, `jaxserve.worker` and `jaxserve.config`;
the rejection sampler itself is part of the jitted step (`jaxserve.model.rejection_sampler`).
"""
