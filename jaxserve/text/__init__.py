"""Text in and out: tokenizers (HF / SentencePiece / GGUF vocab), chat templates, streaming detokenization and
stop strings (`output_processor`).

No JAX. May import `jaxserve.core` (sampling parameters, outputs) and `jaxserve.config`.
"""
