#!/usr/bin/env python3
"""Write tests/golden/<key>.json and <key>_logits.npz from Hugging Face transformers + torch (CPU).

The golden files let CI check our tokenizer, chat template and (later) logits without torch.
Run in its own venv, git-ignored (the CPU wheel of torch; a plain `torch` pulls a multi-GB CUDA build):

    python3 -m venv .venv-golden && .venv-golden/bin/pip install torch==2.13.0 transformers gguf numpy tokenizers sentencepiece accelerate
    .venv-golden/bin/python scripts/make_golden.py            # both models; or: ... make_golden.py 0.5b

The 1.5B model dequantizes to ~6 GB of fp32; on 2 cores both models take a few minutes.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import hashlib
import inspect
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
GOLDEN = ROOT / "tests" / "golden"
FILES = {
    "1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}
NEW_TOKENS = 32

TOKENIZER_CASES = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "class Foo:\n    def __init__(self):\n        self.x = [1, 2, 3]  # list\n\n\tpass\n",
    '#include <iostream>\nint main() {\n    std::cout << "hi" << std::endl;\n    return 0;\n}\n',
    "for (int i = 0; i < 10; ++i) { sum += a[i] * 2; }",
    "    leading spaces and trailing spaces    ",
    "tabs\t\tand\t\t\ttabs",
    "\n\n\nnewlines\n\n\n\n",
    "mixed \r\n line endings \r\n",
    "        \n    \n",
    "1234567890 3.14159 -42 1e-9 0xFF",
    "你好，世界！这是中文测试。",
    "日本語のテキストと한국어 텍스트",
    "emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "Café naïve résumé façade Ångström ñandú",
    "עברית وعربية mixed RTL text",
    "Ελληνικά и русский текст",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "text<|im_end|>more<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "I'm sure they'll say it's fine, we've done it, you'd see",
    "ALL CAPS WORDS AND MiXeD cAsE",
    "spaces before punctuation , . ! ? 's n't 're -- would change under clean_up_tokenization_spaces",
    "a" * 50 + " " + "=" * 40,
    "\u200b zero\u00a0width and nbsp \ufeff",
]

CHAT_CASES = {
    "system_user": [
        {"role": "system", "content": "You are a careful C++ reviewer."},
        {"role": "user", "content": "Is `int x = 1 << 31;` undefined?"},
    ],
    "user_only": [{"role": "user", "content": "Write a Python function that reverses a string."}],
    "multi_turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Say 你好 in one word."},
    ],
}
CHAT_TOOLS = {  # the "tools" case: exercises tojson (non-ASCII kept as is)
    "messages": [{"role": "user", "content": "Weather in Zürich?"}],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather for a city (°C).",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ],
}

CHAT_PROMPT = [{"role": "user", "content": "Write a Python function that reverses a string."}]
GENERATION_CASES = {
    "capital": "The capital of France is",
    "fibonacci": "def fibonacci(n):",
    "cpp_vector": "// Sum the elements of a std::vector<int>\n#include <vector>\n\nint sum(const std::vector<int>& v) {\n",
    "explain": "Binary search is an algorithm that",
    # "chat_reverse" is added from the chat template in main()
}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


@torch.no_grad()
def greedy(model, prompt_ids: list[int]):
    """Greedy decode with the KV cache: generated ids, top1-top2 margin per step, first-step logits."""
    # transformers 5.x renamed `past_key_values` to `cache`; use whichever this version's forward takes.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past, ids, margins, generated, first = None, torch.tensor([prompt_ids]), [], [], None
    for _ in range(NEW_TOKENS):
        out = model(input_ids=ids, use_cache=True, **{name: past})
        past, logits = out[name], out.logits[0, -1].float()
        if first is None:
            first = logits.numpy().copy()
        top = torch.topk(logits, 2)
        margins.append(float(top.values[0] - top.values[1]))
        generated.append(int(top.indices[0]))
        ids = top.indices[:1].view(1, 1)
    return generated, margins, first


def make(key: str) -> None:
    fname = FILES[key]
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(MODELS, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(MODELS, gguf_file=fname, dtype=torch.float32).eval()
    print(f"[{key}] loaded in {time.time() - t0:.0f}s", flush=True)

    tokenizer = []
    for s in TOKENIZER_CASES:
        ids = tok.encode(s, add_special_tokens=False)
        tokenizer.append({"text": s, "ids": ids, "decoded": tok.decode(ids)})
    chat = {
        name: {"messages": msgs, "text": tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)}
        for name, msgs in CHAT_CASES.items()
    }
    chat["tools"] = dict(CHAT_TOOLS, text=tok.apply_chat_template(
        CHAT_TOOLS["messages"], tools=CHAT_TOOLS["tools"], tokenize=False, add_generation_prompt=True))

    prompts = dict(GENERATION_CASES)
    prompts["chat_reverse"] = tok.apply_chat_template(CHAT_PROMPT, tokenize=False, add_generation_prompt=True)
    generation, logits = [], {}
    for name, prompt in prompts.items():
        t1 = time.time()
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        gen, margins, first = greedy(model, prompt_ids)
        logits[name] = first
        generation.append(
            {
                "name": name,
                "prompt": prompt,
                "prompt_ids": prompt_ids,
                "generated_ids": gen,
                "generated_text": tok.decode(gen),
                "margins": [round(m, 5) for m in margins],
            }
        )
        print(f"[{key}] {name}: {time.time() - t1:.1f}s {tok.decode(gen)!r}", flush=True)

    doc = {
        "model": fname,
        "gguf_sha256": sha256(MODELS / fname),
        "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        "new_tokens": NEW_TOKENS,
        "logits_file": f"{key}_logits.npz",
        "tokenizer": tokenizer,
        "chat_template": chat,
        "generation": generation,
    }
    GOLDEN.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, ensure_ascii=False, indent=1)
    text = re.sub(r"\[\n[-\d.e,\s]*\]", lambda m: json.dumps(json.loads(m.group())), text)  # number lists on one line
    (GOLDEN / f"{key}.json").write_text(text + "\n", encoding="utf-8")
    np.savez_compressed(GOLDEN / f"{key}_logits.npz", **logits)
    print(f"[{key}] done in {time.time() - t0:.0f}s", flush=True)


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    for key in sys.argv[1:] or list(FILES):
        make(key)


if __name__ == "__main__":
    main()
