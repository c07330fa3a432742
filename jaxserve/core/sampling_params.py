"""SamplingParams: what a request asks of the sampler and the stop logic (plain Python, no JAX)."""

from __future__ import annotations

import dataclasses

from jaxserve.core.structured_outputs import StructuredOutputsParams


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling and stopping parameters (vLLM / OpenAI semantics).

    temperature 0 means greedy. top_k 0 (or -1) means off. Penalties follow vLLM: repetition_penalty
    divides positive logits and multiplies negative ones of tokens seen in the prompt or output;
    presence/frequency penalties subtract from tokens seen in the output only. `seed` makes the sample
    depend only on the seed, the prompt and the position, never on the rest of the batch.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # top-n alternatives to return with each sampled token (0: only the chosen)
    # top-n alternatives to return with each prompt token after the first (0: only the prompt token's own logprob)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True  # leave special tokens out of the text
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text
    bad_words: tuple[str, ...] = ()  # never generate these words (their last token is banned after the rest)
    allowed_token_ids: tuple[int, ...] | None = None  # sample only these ids (a bitmask, like structured outputs)
    truncate_prompt_tokens: int | None = None  # keep only the prompt's last k tokens
    structured_outputs: StructuredOutputsParams | None = None  # constrain the output (JSON schema, regex, ...)

    MAX_LOGPROBS = 20
    # NOTE: the sampler packs logit_bias and (before min_tokens) stop_token_ids plus EOS into one fixed-width
    # table compiled at warm-up (model/sampler.py BIAS_WIDTH), so both are bounded; 300 is OpenAI's limit.
    MAX_LOGIT_BIAS = 300
    MAX_STOP_TOKEN_IDS = 128

    def __post_init__(self):
        # Accept lists from JSON and normalise to tuples so the object stays hashable and frozen.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "bad_words", tuple(self.bad_words or ()))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(int(t) for t in self.allowed_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            (self.n >= 1, "n", f"must be at least 1, got {self.n}"),
            (self.temperature >= 0, "temperature", f"must be non-negative, got {self.temperature}"),
            (self.top_k >= 0, "top_k", f"must be -1, 0 (off) or positive, got {self.top_k}"),
            (0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, "repetition_penalty", f"must be positive, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty",
             f"must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
             f"must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0 and (self.max_tokens is None or self.min_tokens <= self.max_tokens), "min_tokens",
             f"must be in [0, max_tokens], got {self.min_tokens}"),
            (self.logprobs is None or 0 <= self.logprobs <= self.MAX_LOGPROBS, "logprobs",
             f"must be in [0, {self.MAX_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= self.MAX_LOGPROBS, "prompt_logprobs",
             f"must be in [0, {self.MAX_LOGPROBS}], got {self.prompt_logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings"),
            (len(self.logit_bias or ()) <= self.MAX_LOGIT_BIAS, "logit_bias",
             f"may hold at most {self.MAX_LOGIT_BIAS} entries, got {len(self.logit_bias or ())}"),
            (len(self.stop_token_ids) <= self.MAX_STOP_TOKEN_IDS, "stop_token_ids",
             f"may hold at most {self.MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}"),
            (all(isinstance(w, str) and w.strip() for w in self.bad_words), "bad_words",
             "bad words must be non-empty strings"),
            (self.truncate_prompt_tokens is None or self.truncate_prompt_tokens >= 1, "truncate_prompt_tokens",
             f"must be at least 1, got {self.truncate_prompt_tokens}"),
            (self.structured_outputs is None or len(self.structured_outputs.kinds()) == 1, "structured_outputs",
             "must set exactly one of json, json_object, regex, choice, grammar; "
             f"got {self.structured_outputs and self.structured_outputs.kinds()}"),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids",
             "must hold at least one token id"),
        ]
        for ok, field, message in checks:
            if not ok:
                raise SamplingParamsError(field, f"{field} {message}")
        for token, bias in (self.logit_bias or {}).items():
            if not -100 <= bias <= 100:
                raise SamplingParamsError("logit_bias", f"logit_bias for token {token} must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SamplingParamsError(ValueError):
    """A bad sampling field; `field` names it (the server reports it as the OpenAI error's `param`)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
