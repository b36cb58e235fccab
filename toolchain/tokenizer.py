"""The model's tokenizer and chat template, rebuilt from GGUF metadata (no torch, no transformers).

Byte-level BPE (`tokenizer.ggml.model` == "gpt2") as Hugging Face builds it from a GGUF: the vocabulary
and merges from the file, the pre-tokenizer's split regex picked by `tokenizer.ggml.pre`, CONTROL tokens
as special added tokens and USER_DEFINED ones as plain added tokens (both always matched whole). The chat
template renders in a jinja2 sandbox set up like transformers' `apply_chat_template`.
"""
from __future__ import annotations

import codecs
import json
from datetime import datetime
from functools import lru_cache

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer


from .errors import UserError

# GGUF token types (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_REGEX = {
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
}


@lru_cache(maxsize=None)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that spells it in the vocabulary."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _field(reader, key: str, default=None):
    """A metadata value from a gguf.GGUFReader: str, number, bool, or a list of them."""
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):  # toolchain.gguf_file, gguf-py >= 0.11
        return field.contents()
    from gguf import GGUFValueType  # older gguf-py readers

    values = [field.parts[i] for i in field.data]
    values = [bytes(v).decode("utf-8") if field.types[-1] == GGUFValueType.STRING else v.tolist()[0] for v in values]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


class Tokenizer:
    def __init__(self, backend: _HFTokenizer, tokens: list[str], chat_template: str | None,
                 eos_token_id: int, bos_token_id: int | None, add_bos_token: bool):
        self._tok = backend
        self._tokens = tokens
        self.vocab_size = len(tokens)
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.add_bos_token = add_bos_token and bos_token_id is not None
        ids = {eos_token_id} | {backend.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")}
        self.stop_token_ids = frozenset(i for i in ids if i is not None)
        self.chat_template = chat_template
        self._template = None

    @classmethod
    def from_gguf(cls, reader) -> "Tokenizer":
        model = _field(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise UserError(f"tokenizer {model!r} is not supported: only byte-level BPE ('gpt2') GGUFs are")
        pre = _field(reader, "tokenizer.ggml.pre")
        if pre not in SPLIT_REGEX:
            raise UserError(f"pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(SPLIT_REGEX))})")
        tokens = _field(reader, "tokenizer.ggml.tokens")
        merges = _field(reader, "tokenizer.ggml.merges")
        types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

        alphabet = set(_bytes_to_unicode().values())
        spell = _bytes_to_unicode()
        vocab = {}
        for i, t in enumerate(tokens):
            if not alphabet.issuperset(t):  # not spelled in the byte alphabet: respell its UTF-8 bytes
                t = "".join(spell[b] for b in t.encode("utf-8"))
            vocab[t] = i
        bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                         continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        backend = _HFTokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t, k in zip(tokens, types) if k == CONTROL and alphabet.issuperset(t)])
        backend.add_tokens([AddedToken(t, normalized=False, special=False)
                            for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])

        eos = _field(reader, "tokenizer.ggml.eos_token_id")
        bos = _field(reader, "tokenizer.ggml.bos_token_id")
        return cls(backend, tokens, _field(reader, "tokenizer.chat_template"), int(eos),
                   None if bos is None else int(bos), bool(_field(reader, "tokenizer.ggml.add_bos_token", False)))

    def encode(self, text: str) -> list[int]:
        """Token ids of text; special tokens written in it are matched whole. BOS only if the GGUF asks (Qwen2: no)."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_token_id] + ids if self.add_bos_token else ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for, as the ByteLevel decoder reads it (so added tokens too)."""
        t, table = self._tokens[token_id], _unicode_to_bytes()
        if not table.keys() >= set(t):  # not spelled in the byte alphabet: its own text
            return t.encode("utf-8")
        return bytes(table[c] for c in t)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if not self.chat_template:
            raise UserError("this GGUF has no tokenizer.chat_template")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            bos_token=None if self.bos_token_id is None else self._tokens[self.bos_token_id],
            eos_token=self._tokens[self.eos_token_id],
        )


@lru_cache(maxsize=None)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in _bytes_to_unicode().items()}


def _compile_template(source: str):
    """The template in a sandbox set up like transformers' chat templates."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class StreamDecoder:
    """Incremental detokenization: push(id) returns the text that became complete with that token.

    Bytes of a UTF-8 character split across tokens are held back until the character is whole, so the
    pushed pieces joined (plus flush()) equal Tokenizer.decode() of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(int(token_id)))

    def flush(self) -> str:
        """Text held back at the end (an incomplete character becomes U+FFFD); resets the decoder."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
