"""An independent spec of the checkpoint source formats, for tests: tiny random Llamas written as HF
safetensors folders and as GGUF files the way llama.cpp's converter writes them.

`to_hf`, `from_hf`, `llamacpp_permute` and `GGUF_NAMES` are written from HF's modeling code and llama.cpp's
convert_hf_to_gguf.py, sharing no code with `checkpoints_conv`.
"""

import json

import gguf
import jax
import numpy as np
from safetensors.numpy import save_file

from jaxserve.config import ModelConfig
from jaxserve.model import llama
from jaxserve.model.weight_info import named

Q = gguf.GGMLQuantizationType
TOKENS = [3, 17, 99, 42, 5, 64, 127, 0, 88, 13, 21]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4,
                head_dim=8, rope_theta=10000.0, rms_norm_eps=2.0**-17, max_position_embeddings=256)
    # NOTE: GGUF stores floats as float32, so eps is a power of two to survive the trip exactly.
    return ModelConfig(**{**base, **overrides})


def random_flat(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in named(llama.init_weights(cfg, jax.random.key(seed))).items()}


# ------------------------------------------------------------------------------- the source formats

LAYER_KEYS = {  # HF suffix → (our name, GGUF suffix)
    "input_layernorm.weight": ("attn_norm", "attn_norm.weight"),
    "self_attn.q_proj.weight": ("wq", "attn_q.weight"),
    "self_attn.k_proj.weight": ("wk", "attn_k.weight"),
    "self_attn.v_proj.weight": ("wv", "attn_v.weight"),
    "self_attn.o_proj.weight": ("wo", "attn_output.weight"),
    "self_attn.q_proj.bias": ("bq", "attn_q.bias"),
    "self_attn.k_proj.bias": ("bk", "attn_k.bias"),
    "self_attn.v_proj.bias": ("bv", "attn_v.bias"),
    "post_attention_layernorm.weight": ("mlp_norm", "ffn_norm.weight"),
    "mlp.gate_proj.weight": ("w_gate", "ffn_gate.weight"),
    "mlp.up_proj.weight": ("w_up", "ffn_up.weight"),
    "mlp.down_proj.weight": ("w_down", "ffn_down.weight"),
}
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_NAMES.update({f"model.layers.{i}.{hf}": f"blk.{i}.{g}" for i in range(2) for hf, (_, g) in LAYER_KEYS.items()})


def to_hf(cfg: ModelConfig, flat: dict) -> dict[str, np.ndarray]:
    """Our layout → HF's: torch Linear weights are [out, in], biases flat."""
    D = cfg.hidden_size
    hf = {"model.embed_tokens.weight": flat["embed"], "model.norm.weight": flat["final_norm"]}
    if "lm_head" in flat:
        hf["lm_head.weight"] = np.ascontiguousarray(flat["lm_head"].T)  # NOTE: safetensors writes raw memory
    for i in range(cfg.num_layers):
        for suffix, (ours, _) in LAYER_KEYS.items():
            if f"layers.{ours}" not in flat:
                continue
            w = flat[f"layers.{ours}"][i]
            if ours in ("wq", "wk", "wv"):
                w = w.reshape(D, -1).T  # [D, N, H] → [N*H, D]
            elif ours == "wo":
                w = w.reshape(-1, D).T  # [N, H, D] → [D, N*H]
            elif ours.startswith("w_"):
                w = w.T
            elif ours.startswith("b"):
                w = w.reshape(-1)
            hf[f"model.layers.{i}.{suffix}"] = np.ascontiguousarray(w)
    return hf


def from_hf(cfg: ModelConfig, hf: dict) -> dict[str, np.ndarray]:
    """HF's layout → ours (the inverse of `to_hf`)."""
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    heads = {"wq": N, "wk": K, "wv": K, "bq": N, "bk": K, "bv": K}
    flat = {"embed": hf["model.embed_tokens.weight"], "final_norm": hf["model.norm.weight"]}
    if "lm_head.weight" in hf:
        flat["lm_head"] = hf["lm_head.weight"].T
    for suffix, (ours, _) in LAYER_KEYS.items():
        per_layer = [hf.get(f"model.layers.{i}.{suffix}") for i in range(cfg.num_layers)]
        if per_layer[0] is None:
            continue
        if ours in ("wq", "wk", "wv"):
            per_layer = [w.T.reshape(D, heads[ours], H) for w in per_layer]
        elif ours == "wo":
            per_layer = [w.T.reshape(N, H, D) for w in per_layer]
        elif ours.startswith("w_"):
            per_layer = [w.T for w in per_layer]
        elif ours.startswith("b"):
            per_layer = [w.reshape(heads[ours], H) for w in per_layer]
        flat[f"layers.{ours}"] = np.stack(per_layer)
    return flat


def write_hf_tokenizer(folder) -> None:
    import tokenizers

    vocab = {t: i for i, t in enumerate(tiny_vocab()[0])}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [tuple(m.split(" ")) for m in tiny_vocab()[1]]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def write_hf(folder, cfg: ModelConfig, hf: dict, *, dtype=np.float32, shards: int = 1, model_type="llama") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
        "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "max_position_embeddings": cfg.max_position_embeddings}))
    keys = sorted(hf)
    weight_map = {}
    for s in range(shards):
        name = "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: hf[k].astype(dtype) for k in keys[s::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    write_hf_tokenizer(folder)


def llamacpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab() -> tuple[list[str], list[str], list[int]]:
    """128 byte-level BPE tokens: 3 control tokens, 95 single characters and 30 merges (gpt2 style)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(33, 127)] + ["\u0120"]  # "Ġ" is the byte-level space
    merges = ("h e", "l l", "t h", "Ġ t", "e r", "i n", "o n", "a n", "r e", "e s", "Ġ a", "Ġ s", "Ġ w", "o r",
              "a t", "e n", "i s", "o u", "Ġ h", "Ġ o", "l o", "n d", "e d", "i t", "a r", "s t", "Ġ c", "Ġ b",
              "Ġ f", "Ġ m")
    tokens = specials + chars + [m.replace(" ", "") for m in merges]
    assert len(set(tokens)) == 128, len(set(tokens))
    return tokens, list(merges), [3] * 3 + [1] * 125


def write_gguf(path, cfg: ModelConfig, flat: dict, *, arch="llama", qtypes: dict | None = None,
               skip_key: str | None = None) -> dict[str, np.ndarray]:
    """Writes `flat` as llama.cpp's converter would; returns the weights the file holds, in our layout."""
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), arch)
    kv = {"block_count": cfg.num_layers, "context_length": cfg.max_position_embeddings,
          "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
          "head_count": cfg.num_heads, "head_count_kv": cfg.num_kv_heads}
    kv.pop(skip_key, None)
    for key, value in kv.items():
        getattr(w, f"add_{key}")(value)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens, merges, types = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)
    held = {}
    for key, x in to_hf(cfg, flat).items():
        name = GGUF_NAMES[key]
        qtype = qtypes.get(name.split(".", 2)[-1] if name.startswith("blk.") else name, Q.F32)
        if x.ndim == 1:
            qtype = Q.F32  # llama.cpp keeps norms and biases in F32
        stored = x
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            stored = llamacpp_permute(x, cfg.num_heads, cfg.num_heads)
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            stored = llamacpp_permute(x, cfg.num_heads, cfg.num_kv_heads)
        w.add_tensor(name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        # NOTE: quantization works on blocks within a row and the permutation moves whole rows, so the
        # unpermuted dequantized file tensor is dequantize(quantize(x)): no inverse permutation needed here.
        held[key] = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(x.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return from_hf(cfg, held)
