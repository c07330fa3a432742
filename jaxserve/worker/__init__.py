"""The worker: owns the weights and KV pages on the devices and runs the jitted, donated step.

`model_runner` (bucketed step, warm-up), `distributed` (multi-host start-up and the step channel from the
leader to the followers). May import `jaxserve.model`, `jaxserve.core`, `jaxserve.config` and `pallas_kernels`.
"""
