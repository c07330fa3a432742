"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, all prompts batched by the engine."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from tqdm import tqdm

from jaxserve.config import EngineConfig, speculative_fields
from jaxserve.core.outputs import CompletionOutput, RequestOutput, ScoreOutput
from jaxserve.core.sampling_params import SamplingParams
from jaxserve.core.structured_outputs import StructuredOutputsParams
from jaxserve.engine import LLMEngine
from jaxserve.text.chat_template import load_chat_template, render_chat
from jaxserve.text.tool_calls import CLOSE, ToolCallParser, call_schema, render_messages

CASCADE_KEYS = {"small", "threshold", "signal", "small_options"}


class LLM:
    """`model` is the default name, a converted checkpoint folder, a Hugging Face folder or a GGUF path.

    Keyword arguments are the engine's options, named like the server's flags
    (`max_num_seqs`, `tensor_parallel_size`, `attention_backend`, `dtype`, ...).

    `cascade={"small": PATH, "threshold": -0.5, "signal": "mean_logprob"}` makes `model` the large model of a
    cascade (jaxserve/cascade.py): the small one answers each prompt, and the large one takes over the prompts
    it was unsure of; `small_options` (a dict) overrides engine options for the small model. Each output's
    `answered_by` is "small" or "large".
    """

    def __init__(self, model: str = EngineConfig.model, *, cascade: dict | None = None, **engine_options):
        warmup = engine_options.pop("warmup", True)
        speculative = engine_options.pop("speculative_config", None)  # vLLM's dict form of the speculative options
        if speculative is not None:
            engine_options.update(speculative_fields(speculative))
        if cascade is not None and ("small" not in cascade or set(cascade) - CASCADE_KEYS):
            raise ValueError(f"cascade takes {sorted(CASCADE_KEYS)} ('small' required), got {sorted(cascade)}")
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options), warmup=warmup)
        if cascade is not None:
            self.engine = _cascade(self.engine, cascade, engine_options, warmup)
        self.tokenizer = self.engine.tokenizer

    def get_tokenizer(self):
        """The model's tokenizer (`encode`, `decode`, `chat_template`, ...)."""
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation-config defaults (`generation_config="vllm"`: ours)."""
        return SamplingParams(**self.engine.default_sampling)

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt, outputs in prompt order. A prompt is text, a list of token ids, or vLLM's
        `{"prompt": text}` / `{"prompt_token_ids": [...]}`."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [_prompt_of(p) for p in prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or self.get_default_sampling_params()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        results, streams = [], []
        for prompt, params in zip(prompts, sampling_params):
            try:
                stream = self.engine.add_request(prompt, params)
            except Exception:
                for earlier in streams:  # NOTE: all or nothing: the prompts before a refused one never run
                    self.engine.abort(earlier.request_id)
                raise
            streams.append(stream)
            results.append(RequestOutput(stream.request_id, prompt if isinstance(prompt, str) else None,
                                         stream.prompt_token_ids, [CompletionOutput(i) for i in range(params.n)],
                                         arrival_time=stream.arrival_time))
        by_id = {r.request_id: r for r in results}
        with tqdm(total=len(results), desc="generating", unit="req", disable=None if use_tqdm else True) as bar:
            while not all(r.finished for r in results):
                self.engine.step()
                for stream in streams:
                    for delta in stream.ready():
                        result = by_id[delta.request_id]
                        result.add(delta)
                        if result.finished:
                            bar.update(1)
        for result, stream in zip(results, streams):
            result.answered_by = getattr(stream, "answered_by", None)
        return results

    def score(self, prompts, continuations: Sequence[str] | None = None, *,
              use_tqdm: bool = True) -> list[ScoreOutput]:
        """Teacher-forced log-probs of every prompt's tokens after the first, through the engine's own path
        (prompt logprobs; the prefix cache is bypassed, one token is sampled and dropped).

        With `continuations`, each prompt is a context and only its continuation's tokens are scored, split as
        lm-evaluation-harness does: trailing spaces of the context move to the continuation, the pair is encoded
        whole (no special tokens) and the continuation is what follows the context's own encoding.
        Prompts and continuations must leave one token of room in the context (max_model_len - 1 tokens).
        """
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = [_prompt_of(p) for p in prompts]
        starts = [1] * len(prompts)
        if continuations is not None:
            if len(continuations) != len(prompts):
                raise ValueError(f"got {len(continuations)} continuations for {len(prompts)} prompts")
            pairs = [self._encode_pair(c, x) for c, x in zip(prompts, continuations)]
            prompts, starts = [ids for ids, _ in pairs], [max(1, start) for _, start in pairs]
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
        outs = self.generate(prompts, params, use_tqdm=use_tqdm)
        return [ScoreOutput(out.prompt_token_ids, [e.logprob for e in out.prompt_logprobs[start:]], start)
                for out, start in zip(outs, starts)]

    def _encode_pair(self, context, continuation: str) -> tuple[list[int], int]:
        """lm-evaluation-harness's split of (context, continuation) into token ids and the continuation's start."""
        if not isinstance(context, str):
            return list(context) + self.tokenizer.encode(continuation, add_special_tokens=False), len(context)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation, add_special_tokens=False)
        return whole, len(self.tokenizer.encode(context, add_special_tokens=False))

    def chat(self, conversations, sampling_params: SamplingParams | None = None, *, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             tools: Sequence[dict[str, Any]] | None = None, tool_choice: str | dict = "auto",
             parallel_tool_calls: bool = True) -> list[RequestOutput]:
        """Renders each conversation (a list of {"role", "content"} messages) with `chat_template` (a file or
        an inline template; default: the model's) and generates.

        With `tools` (OpenAI's [{"type": "function", "function": {"name", "description", "parameters"}}]),
        `tool_choice` and `parallel_tool_calls` work as on the server (docs/tools.md): each output's
        `tool_calls` holds the calls read out of its text ([] when none), and under "required" or a named
        function ({"type": "function", "function": {"name": ...}} or just the name) the text is constrained
        to the call(s), so the arguments always validate against the function's parameters.
        """
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        template = load_chat_template(chat_template) if chat_template is not None else None
        choice, named = _tool_choice(tool_choice, tools)
        offered = tools if tools and choice != "none" else None
        prompts = [self.render_chat(messages, chat_template=template, add_generation_prompt=add_generation_prompt,
                                    tools=offered) for messages in conversations]
        params = sampling_params or self.get_default_sampling_params()
        if offered and choice != "auto":
            chosen = [t for t in offered if named is None or t["function"]["name"] == named]
            schema = call_schema(chosen, parallel=parallel_tool_calls and named is None)
            params = dataclasses.replace(params, structured_outputs=StructuredOutputsParams(json=schema))
        elif offered and not parallel_tool_calls:
            params = dataclasses.replace(params, stop=params.stop + (CLOSE,))
        outputs = self.generate(prompts, params, use_tqdm=use_tqdm)
        if offered:
            names = [t["function"]["name"] for t in offered]
            for out in (o for r in outputs for o in r.outputs):
                parser = ToolCallParser(names, constrained=choice != "auto")
                out.tool_calls = parser.feed(out.text)[1] + parser.finish()[1]
        return outputs

    def render_chat(self, messages, *, chat_template: str | None = None, add_generation_prompt: bool = True,
                    tools: Sequence[dict[str, Any]] | None = None) -> str:
        template = chat_template or self.tokenizer.chat_template
        messages, extra = render_messages([{"content": "", **m} for m in messages], tools, template)
        return render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token, **extra)


def _tool_choice(choice: str | dict, tools) -> tuple[str, str | None]:
    """("none" | "auto" | "required" | "named", the named function)."""
    names = [t["function"]["name"] for t in tools or ()]
    if isinstance(choice, dict):
        choice = choice.get("function", {}).get("name")
    if choice in ("none", "auto", "required"):
        if choice == "required" and not names:
            raise ValueError('tool_choice "required" needs tools')
        return choice, None
    if choice not in names:
        raise ValueError(f"tool_choice must be none, auto, required or one of the tools' names {names}, "
                         f"got {choice!r}")
    return "named", choice


def _cascade(large: LLMEngine, spec: dict, engine_options: dict, warmup: bool):
    from jaxserve.cascade import CascadeEngine, CascadePolicy

    options = {**engine_options, **spec.get("small_options", {})}
    small = LLMEngine(EngineConfig(model=spec["small"], **options), warmup=warmup)
    policy = CascadePolicy(**{k: spec[k] for k in ("threshold", "signal") if k in spec})
    return CascadeEngine(small, large, policy)


def _prompt_of(prompt):
    """Text or token ids from any of the prompt forms `generate` takes."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return [int(t) for t in prompt["prompt_token_ids"]]
        if "prompt" in prompt:
            return prompt["prompt"]
        raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
    return prompt
