"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, all prompts batched by the engine."""

from __future__ import annotations

from typing import Sequence

from tqdm import tqdm

from jaxserve.config import EngineConfig
from jaxserve.core.outputs import CompletionOutput, RequestOutput
from jaxserve.core.sampling_params import SamplingParams
from jaxserve.engine import LLMEngine
from jaxserve.text.chat_template import render_chat


class LLM:
    """`model` is the default name, a converted checkpoint folder, a Hugging Face folder or a GGUF path.

    Keyword arguments are the engine's options, named like the server's flags
    (`max_num_seqs`, `tensor_parallel_size`, `attention_backend`, `dtype`, ...).
    """

    def __init__(self, model: str = EngineConfig.model, **engine_options):
        warmup = engine_options.pop("warmup", True)
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options), warmup=warmup)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt (text, or a list of token ids); outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        results, streams = [], []
        for prompt, params in zip(prompts, sampling_params):
            stream = self.engine.add_request(prompt, params)
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
        return results

    def chat(self, conversations, sampling_params: SamplingParams | None = None, *,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Renders each conversation (a list of {"role", "content"} messages) with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.render_chat(messages) for messages in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def render_chat(self, messages) -> str:
        return render_chat(self.tokenizer.chat_template, messages, add_generation_prompt=True,
                           bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token)
