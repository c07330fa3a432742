"""vLLM's `vllm serve` command line on our server: what we accept, what we map, what we refuse and why.

Three kinds of vLLM flag besides the ones we share by name (`--max-model-len`, `--tensor-parallel-size` ...):
  * `ACCEPTED`: flags that describe what jaxserve always does (chunked prefill, no request logging, no remote
    code); they are parsed and change nothing.
  * `UNSUPPORTED`: features we do not have; the command fails naming the flag and what to use instead.
  * Spellings: `--flag_name` is `--flag-name`, `-tp` is `--tensor-parallel-size` (`normalize_argv`).

No JAX here (the server package imports none).
"""

from __future__ import annotations

import argparse

# flag -> (takes a value, help). Each is parsed and has no effect: it names what jaxserve always does.
ACCEPTED: dict[str, tuple[bool, str]] = {
    "--enable-chunked-prefill": (False, "always on: long prompts are prefilled in chunks under "
                                        "--max-num-batched-tokens"),
    "--disable-log-requests": (False, "request contents are never logged (the access log has no prompt text)"),
    "--enable-log-requests": (False, "accepted; the access log (--access-log) records every request without text"),
    "--disable-log-stats": (False, "no periodic stats log exists; /metrics has them"),
    "--trust-remote-code": (False, "no model code is ever downloaded or run"),
    "--disable-custom-all-reduce": (False, "XLA inserts the collectives; there is no custom all-reduce"),
    "--disable-frontend-multiprocessing": (False, "the HTTP server and the engine share one process already"),
    "--tokenizer-mode": (True, "the tokenizer ships with the checkpoint; only 'auto' behaviour exists"),
    "--load-format": (True, "checkpoints load in the formats jaxserve detects (safetensors, GGUF, converted)"),
    "--max-log-len": (True, "prompts are never logged, so there is nothing to truncate"),
    "--response-role": (True, "the assistant role is always 'assistant'"),
    "--enable-server-load-tracking": (False, "the load is always in /metrics (num_requests_running/waiting)"),
    "--enable-auto-tool-choice": (False, "tool_choice \"auto\" is always served (docs/tools.md)"),
    "--tool-call-parser": (True, "only 'hermes': <tool_call> JSON blocks, the default tool format (docs/tools.md)"),
}
# accepted flags whose value is checked: any other value fails, naming the flag
ACCEPTED_VALUES: dict[str, tuple[str, ...]] = {"--tool-call-parser": ("hermes",)}

# flag -> what to use instead. Each makes the command fail with this advice.
UNSUPPORTED: dict[str, str] = {
    "--pipeline-parallel-size": "pipeline parallelism is not implemented; use --tensor-parallel-size and "
                                "--data-parallel-size",
    "-pp": "pipeline parallelism is not implemented; use --tensor-parallel-size and --data-parallel-size",
    "--enable-lora": "LoRA adapters are not supported; merge the adapter into the weights and serve that checkpoint",
    "--lora-modules": "LoRA adapters are not supported; merge the adapter into the weights and serve that checkpoint",
    "--max-loras": "LoRA adapters are not supported",
    "--max-lora-rank": "LoRA adapters are not supported",
    "--reasoning-parser": "reasoning parsers are not supported; the reasoning text stays in the content",
    "--enforce-eager": "jaxserve always runs compiled step shapes; use --compilation-cache-dir to keep them",
    "--compilation-config": "XLA compiles every bucket at start-up; use --compilation-cache-dir to keep them",
    "--swap-space": "preempted requests are recomputed, never swapped; drop the flag",
    "--cpu-offload-gb": "weights stay on the device; use --quantization int8/int4 to fit a larger model",
    "--tokenizer": "the tokenizer is the checkpoint's own; convert the model with the tokenizer you want",
    "--revision": "pin a revision when downloading; jaxserve serves local folders, GGUF files and registered names",
    "--download-dir": "set $JAXSERVE_CACHE (converted checkpoints live under it)",
    "--limit-mm-per-prompt": "multimodal inputs are not supported",
    "--task": "only text generation is served",
    "--num-scheduler-steps": "the engine overlaps host and device work already; drop the flag",
    "--ssl-keyfile": "terminate TLS in front of the server (ingress, proxy)",
    "--ssl-certfile": "terminate TLS in front of the server (ingress, proxy)",
    "--root-path": "mount the server behind a proxy that strips the prefix",
    "--distributed-executor-backend": "multi-host runs use --distributed (jax.distributed)",
    "--headless": "multi-host runs use --distributed; processes other than 0 follow without serving",
    "--enable-expert-parallel": "mixture-of-experts models are not supported",
    "--rope-scaling": "RoPE scaling is read from the checkpoint's config",
    "--hf-overrides": "edit the checkpoint's config.json instead",
    "--guided-decoding-backend": "structured outputs always use llguidance (docs/structured-output.md)",
    "--no-enable-chunked-prefill": "chunked prefill is always on; lower --max-num-batched-tokens to shorten chunks",
}

SHORT_FLAGS = {"-tp": "--tensor-parallel-size", "-dp": "--data-parallel-size", "-q": "--quantization"}

# vLLM's --dtype values -> ours (half / float16 have no counterpart: bfloat16 is the accelerator dtype here)
DTYPE_ALIASES = {"float": "float32", "bf16": "bfloat16", "fp32": "float32"}
# vLLM's --kv-cache-dtype values -> ours
KV_DTYPE_ALIASES = {"bfloat16": "bf16", "float32": "fp32"}


def normalize_argv(argv: list[str]) -> list[str]:
    """`--gpu_memory_utilization=0.8` → `--gpu-memory-utilization=0.8`; `-tp 2` → `--tensor-parallel-size 2`."""
    out = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg.partition("=")
            arg = name.replace("_", "-") + eq + value
        elif arg in SHORT_FLAGS:
            arg = SHORT_FLAGS[arg]
        out.append(arg)
    return out


class _Accepted(argparse.Action):
    """A boolean vLLM flag we always honour: `--flag`, `--flag true`; `--flag=false` asks for what we cannot do."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values is not None and str(values).lower() not in ("true", "1", "yes"):
            parser.error(f"{option_string}={values} is not supported by jaxserve: it always behaves as "
                         f"{option_string} ({self.help})")
        setattr(namespace, self.dest, True)


class _Unsupported(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not supported by jaxserve: {UNSUPPORTED[self.dest_flag]}")


def add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    """The accepted no-op flags (in --help, with what they mean here) and the refused ones (hidden)."""
    group = parser.add_argument_group("vLLM flags that describe what jaxserve always does (accepted, no effect)")
    for flag, (takes_value, help_) in ACCEPTED.items():
        dest = "vllm_" + flag.lstrip("-").replace("-", "_")
        if takes_value:
            group.add_argument(flag, dest=dest, default=None, choices=ACCEPTED_VALUES.get(flag),
                               metavar=None if flag in ACCEPTED_VALUES else "VALUE", help=help_)
        else:
            group.add_argument(flag, dest=dest, nargs="?", action=_Accepted, default=None, metavar="BOOL", help=help_)
    for flag in UNSUPPORTED:
        action = type("Unsupported", (_Unsupported,), {"dest_flag": flag})
        parser.add_argument(flag, dest="vllm_unsupported_" + flag.lstrip("-").replace("-", "_"), nargs="?",
                            action=action, help=argparse.SUPPRESS)
