"""Tokenizers: one `Tokenizer` over a Hugging Face `tokenizers` or a SentencePiece backend (no JAX).

Sources, picked by `load_tokenizer(path)`:
  * a GGUF file: the vocabulary in its metadata, rebuilt in memory as a `tokenizers.Tokenizer` the way
    llama.cpp (the format's own implementation) tokenizes it;
  * a folder with `tokenizer.json` (+ `tokenizer_config.json`, `generation_config.json`), which is
    also what `Tokenizer.save` writes, so a converted checkpoint reloads to the same tokenizer;
  * a SentencePiece `tokenizer.model` (or a folder holding one and no `tokenizer.json`).

Special tokens are never added by the backend: `encode` adds BOS itself (see `Tokenizer.encode`), and
control tokens written in the text (`<|im_start|>`) are matched whole, as llama.cpp does with
`parse_special`. EOS is never appended; generation ends on any of `eog_ids`.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

# Texts of tokens that end a generation besides EOS; llama.cpp keeps the same list (llama-vocab.cpp).
EOG_TOKEN_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>",
    "<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
})
# NOTE: a BOS that opens a chat turn is never prepended, whatever add_bos_token says. SmolLM2's GGUF names
# `<|im_start|>` as BOS (a converter artefact: the HF tokenizer has no BOS and adds nothing; some conversions
# also set add_bos_token); prepending it to a plain prompt makes a malformed ChatML turn, and the chat
# template writes it itself where it belongs.
TURN_OPENER_BOS = frozenset({"<|im_start|>"})

_CONTROL, _USER_DEFINED, _UNKNOWN = 3, 4, 2  # GGUF token_type values (llama.cpp's llama_token_type)


class Tokenizer:
    """Text <-> token ids, plus the model's special ids and chat template.

    Attributes:
      bos_id, eos_id: ids or None. eog_ids: sorted ids that end a generation (EOS plus the EOG texts).
      add_bos: whether `encode(add_special_tokens=True)` prepends BOS. chat_template: jinja source or None.
    """

    def __init__(self, backend: "_HFBackend | _SPBackend", *, bos_id: int | None, eos_id: int | None,
                 eog_ids: Sequence[int] = (), add_bos: bool = False, chat_template: str | None = None,
                 unk_id: int | None = None):
        self._backend = backend
        self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
        self.chat_template = chat_template
        eog = set(eog_ids) | ({eos_id} if eos_id is not None else set())
        for text in EOG_TOKEN_TEXTS:
            token_id = backend.token_to_id(text)
            if token_id is not None:
                eog.add(token_id)
        self.eog_ids: tuple[int, ...] = tuple(sorted(eog))
        self.add_bos = bool(add_bos) and bos_id is not None and self.bos_token not in TURN_OPENER_BOS

    # ------------------------------------------------------------------ the interface

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self._backend.id_to_piece(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self._backend.id_to_piece(self.eos_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token texts in it become their single ids.

        With `add_special_tokens`, BOS is prepended when `add_bos` is set, but never twice: not when the
        text already starts with BOS (as a rendered chat template that writes `<s>` itself does).
        """
        ids = self._backend.encode(text)
        if add_special_tokens and self.add_bos and ids[:1] != [self.bos_id] and not text.startswith(self.bos_token):
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of one id, as the vocabulary spells it (`Ġhello`, `▁hello`, `<0x0A>`)."""
        return self._backend.id_to_piece(int(token_id))

    def token_to_id(self, piece: str) -> int | None:
        return self._backend.token_to_id(piece)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry in characters: no token covers more text than that (a piece spells at
        least what it covers: `Ġthe` is " the", `<0x0A>` one byte), so a text of C characters is at least
        C / max_token_chars tokens, a bound the server checks before tokenizing. First call: ~50 ms."""
        return max(len(self._backend.id_to_piece(i) or "") for i in range(self.vocab_size))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf_folder(cls, path: str | os.PathLike) -> "Tokenizer":
        """A Hugging Face tokenizer folder: `tokenizer.json`, else `tokenizer.model` (SentencePiece)."""
        path = Path(path)
        config = _read_json(path / "tokenizer_config.json")
        generation = _read_json(path / "generation_config.json")
        if (path / "tokenizer.json").exists():
            backend: _HFBackend | _SPBackend = _HFBackend(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
        elif (path / "tokenizer.model").exists():
            backend = _SPBackend(spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model")))
        else:
            raise ValueError(f"{path} holds neither tokenizer.json nor tokenizer.model")
        bos_id = _special_id(backend, config.get("bos_token"), backend.default_bos_id)
        eos_id = _special_id(backend, config.get("eos_token"), backend.default_eos_id)
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # the tokenizer.json post-processor decides, as in transformers
            add_bos = backend.adds_bos(bos_id)
        gen_eos = generation.get("eos_token_id")
        eog = list(config.get("eog_token_ids", [])) + ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []))
        template = config.get("chat_template")
        if (path / "chat_template.jinja").exists():  # where newer transformers save it
            template = (path / "chat_template.jinja").read_text()
        elif isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(backend, bos_id=bos_id, eos_id=eos_id, eog_ids=eog, add_bos=add_bos, chat_template=template,
                   unk_id=_special_id(backend, config.get("unk_token"), None))

    @classmethod
    def from_sentencepiece(cls, model_path: str | os.PathLike, *, add_bos: bool = True,
                           chat_template: str | None = None) -> "Tokenizer":
        """A SentencePiece model file. BOS is added by default, as llama.cpp and LlamaTokenizer do."""
        backend = _SPBackend(spm.SentencePieceProcessor(model_file=str(model_path)))
        return cls(backend, bos_id=backend.default_bos_id, eos_id=backend.default_eos_id, add_bos=add_bos,
                   chat_template=chat_template, unk_id=backend.default_unk_id)

    @classmethod
    def from_gguf(cls, path_or_reader: Any) -> "Tokenizer":
        """The vocabulary embedded in a GGUF file's metadata (a path, or a `gguf.GGUFReader`)."""
        meta = _gguf_metadata(path_or_reader)
        kind = meta.get("tokenizer.ggml.model")
        tokens = list(meta["tokenizer.ggml.tokens"])
        types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
        if kind == "gpt2":
            backend_tok = _byte_level_bpe(tokens, meta["tokenizer.ggml.merges"], meta.get("tokenizer.ggml.pre", ""))
            add_bos_default = meta.get("tokenizer.ggml.pre") in _LLAMA3_PRES  # llama.cpp's defaults per pre
        elif kind == "llama":
            scores = meta.get("tokenizer.ggml.scores", [0.0] * len(tokens))
            unk = meta.get("tokenizer.ggml.unknown_token_id")
            backend_tok = _sentencepiece_bpe(tokens, scores, types, unk,
                                             bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
            add_bos_default = True
        else:
            raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama')")
        _add_special_tokens(backend_tok, tokens, types)
        ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "unknown")}
        return cls(_HFBackend(backend_tok), bos_id=_opt_int(ids["bos"]), eos_id=_opt_int(ids["eos"]),
                   add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
                   chat_template=meta.get("tokenizer.chat_template"), unk_id=_opt_int(ids["unknown"]))

    def save(self, dest: str | os.PathLike) -> None:
        """Writes `tokenizer.json` (or `tokenizer.model`) and `tokenizer_config.json` for `from_hf_folder`."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        self._backend.save(dest)
        piece = lambda i: None if i is None else self._backend.id_to_piece(i)  # noqa: E731
        config = {
            "tokenizer_class": self._backend.hf_class,
            "bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id), "unk_token": piece(self.unk_id),
            "add_bos_token": self.add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "eog_token_ids": list(self.eog_ids), "chat_template": self.chat_template,
        }
        (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a `.gguf` file, a `.model` file, or a folder (tokenizer.json / tokenizer.model /
    a single `.gguf`)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return Tokenizer.from_gguf(path)
        if path.suffix == ".model":
            return Tokenizer.from_sentencepiece(path)
        raise ValueError(f"cannot tell what tokenizer {path} holds (expected .gguf or .model)")
    if (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists():
        return Tokenizer.from_hf_folder(path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return Tokenizer.from_gguf(ggufs[0])
    raise ValueError(f"{path} holds no tokenizer.json, tokenizer.model or single .gguf file")


# ---------------------------------------------------------------------- backends


class _HFBackend:
    hf_class = "PreTrainedTokenizerFast"

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.default_bos_id = self.default_eos_id = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)

    def token_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def adds_bos(self, bos_id: int | None) -> bool:
        with_special = self.tok.encode("a", add_special_tokens=True).ids
        return bos_id is not None and with_special[:1] == [bos_id] and self.encode("a")[:1] != [bos_id]

    def save(self, dest: Path) -> None:
        self.tok.save(str(dest / "tokenizer.json"))


class _SPBackend:
    hf_class = "LlamaTokenizer"

    def __init__(self, sp: spm.SentencePieceProcessor):
        self.sp = sp
        self.vocab_size = sp.get_piece_size()
        opt = lambda i: i if i >= 0 else None  # noqa: E731  (sentencepiece says -1 for "none")
        self.default_bos_id, self.default_eos_id = opt(sp.bos_id()), opt(sp.eos_id())
        self.default_unk_id = opt(sp.unk_id())
        # sentencepiece reads control and unknown pieces written in text as text; llama.cpp matches them whole.
        self._special = {i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        self._control = {sp.id_to_piece(i): i for i in self._special if sp.id_to_piece(i)}
        texts = sorted(self._control, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, texts)) + ")") if texts else None

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                ids.append(self._control[part])
            elif part:  # NOTE: each fragment gets the dummy-prefix space, as llama.cpp's SPM path does
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self._special])
        out, run = [], []
        for i in ids + [None]:
            if i is not None and i not in self._special:
                run.append(i)
                continue
            if run:  # after a control token the run's leading space is text, not the dummy prefix
                lead = " " if out and self.sp.id_to_piece(run[0]).startswith("\u2581") else ""
                out.append(lead + self.sp.decode(run))
                run = []
            if i is not None:
                out.append(self.sp.id_to_piece(i))
        return "".join(out)

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def token_to_id(self, piece: str) -> int | None:
        token_id = self.sp.piece_to_id(piece)
        return token_id if self.sp.id_to_piece(token_id) == piece else None  # unknown pieces map to unk

    def adds_bos(self, bos_id: int | None) -> bool:
        return bos_id is not None

    def save(self, dest: Path) -> None:
        (dest / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())


# ---------------------------------------------------------------------- GGUF vocabularies

_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2 = {"gpt2", "default", "", "mpt", "olmo", "jais", "trillion", "exaone4"}
_LLAMA3_PRES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx",
                "smaug-bpe"}
_QWEN2_PRES = {"qwen2", "stablelm2", "deepseek-r1-qwen", "hunyuan", "megrez"}
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The split llama.cpp applies for `tokenizer.ggml.pre` (llm_tokenizer_bpe), as HF pre-tokenizers."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:  # llama.cpp: "\p{N}" then the GPT-2 regex; HF SmolLM: Digits + ByteLevel
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    split = _LLAMA3_SPLIT if pre in _LLAMA3_PRES else _QWEN2_SPLIT if pre in _QWEN2_PRES else None
    if split is not None:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in _GPT2:
        warnings.warn(f"GGUF pre-tokenizer {pre!r} is not known here; splitting text with the GPT-2 regex",
                      stacklevel=2)
    return byte_level


def _byte_level_bpe(tokens: list[str], merges: Sequence[str], pre: str) -> tokenizers.Tokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    # llama.cpp splits a merge at the first space after position 0 (a token may itself be a space).
    pairs = [(m[:k], m[k + 1:]) for m in merges if (k := m.find(" ", 1)) > 0]
    tok = tokenizers.Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _LLAMA3_PRES))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(tokens: list[str], scores: Sequence[float], types: Sequence[int], unk_id: int | None,
                       add_space_prefix: bool) -> tokenizers.Tokenizer:
    """llama.cpp's SPM tokenizer as a BPE: repeatedly merging the adjacent pair whose concatenation is the
    best-scoring token is BPE with merges ranked by the score of what they make; unknown characters fall
    back to `<0xXX>` byte tokens."""
    vocab = {token: i for i, token in enumerate(tokens)}
    mergeable = [i for i, t in enumerate(types) if t in (1, 4)]  # normal and user-defined tokens merge
    ranked = []
    for i in mergeable:
        token = tokens[i]
        for k in range(1, len(token)):
            if token[:k] in vocab and token[k:] in vocab:
                ranked.append((-float(scores[i]), i, k))
    ranked.sort()
    pairs = [(tokens[i][:k], tokens[i][k:]) for _, i, k in ranked]
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = tokenizers.Tokenizer(models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # NOTE: llama.cpp prefixes a space to every text fragment that starts the text or follows a special
    # token; a normalizer runs once per fragment between added tokens, so Prepend does exactly that.
    steps = [normalizers.Prepend("\u2581")] if add_space_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if add_space_prefix else []
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()] + strip)
    return tok


def _add_special_tokens(tok: tokenizers.Tokenizer, tokens: list[str], types: Sequence[int]) -> None:
    """Control and unknown tokens become special added tokens, user-defined ones plain added tokens: both are
    then matched whole in text (llama.cpp's tokenizer_st_partition); only special ones are skipped on decode."""
    pairs = list(zip(tokens, types))
    special = [AddedToken(t, special=True, normalized=False) for t, k in pairs if k in (_CONTROL, _UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in pairs if k == _USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)


def _gguf_metadata(path_or_reader: Any) -> dict[str, Any]:
    """The `general.*` and `tokenizer.*` key/values of a GGUF file.

    NOTE: for a path we parse the header ourselves: `gguf.GGUFReader` builds a numpy view per array
    element (about 100k for a 49k vocabulary plus merges), which takes seconds; this reads only metadata.
    """
    if not isinstance(path_or_reader, (str, os.PathLike)):  # a gguf.GGUFReader
        return {k: f.contents() for k, f in path_or_reader.fields.items() if k.startswith(("general.", "tokenizer."))}
    with open(path_or_reader, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _GGUFHeader(buf).read()


class _GGUFHeader:
    _SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    _NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
              12: "<f8"}

    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def read(self) -> dict[str, Any]:
        magic, version, _n_tensors, n_kv = struct.unpack_from("<4sIQQ", self.buf, 0)
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a little-endian GGUF v2/v3 file (magic {magic!r}, version {version})")
        self.pos = 24
        meta = {}
        for _ in range(n_kv):
            key = self._string()
            meta[key] = self._value(self._scalar("<I"))
        return {k: v for k, v in meta.items() if k.startswith(("general.", "tokenizer."))}

    def _scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._scalar("<Q")
        self.pos += n
        return self.buf[self.pos - n:self.pos].decode("utf-8", errors="replace")

    def _value(self, vtype: int):
        if vtype == 8:
            return self._string()
        if vtype in self._SCALARS:
            return self._scalar(self._SCALARS[vtype])
        if vtype != 9:
            raise ValueError(f"unknown GGUF value type {vtype}")
        item_type, n = self._scalar("<I"), self._scalar("<Q")
        if item_type in self._NUMPY:
            arr = np.frombuffer(self.buf, dtype=self._NUMPY[item_type], count=n, offset=self.pos)
            self.pos += arr.nbytes
            return arr.tolist()
        return [self._value(item_type) for _ in range(n)]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _special_id(backend, token: Any, default: int | None) -> int | None:
    """The id of a tokenizer_config special token (a string or an AddedToken dict)."""
    if isinstance(token, dict):
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else default


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
