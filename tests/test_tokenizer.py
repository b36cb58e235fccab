"""Our GGUF tokenizer and chat template against Hugging Face's (tests/golden, made by scripts/make_golden.py)."""
import json
from pathlib import Path

import pytest

from toolchain.tokenizer import StreamDecoder, Tokenizer, _bytes_to_unicode

ROOT = Path(__file__).resolve().parent.parent
MODELS = {
    "1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    "0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    """(our Tokenizer, golden dict) for one model; skipped when the GGUF or its golden file is absent."""
    gguf_path = ROOT / "models" / MODELS[request.param]
    golden_path = ROOT / "tests" / "golden" / f"{request.param}.json"
    if not gguf_path.exists():
        pytest.skip(f"{gguf_path.name} not under models/ (make model)")
    if not golden_path.exists():
        pytest.skip(f"{golden_path.name} missing (scripts/make_golden.py)")
    import gguf

    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(gguf_path))
    return tokenizer, json.loads(golden_path.read_text(encoding="utf-8"))


def test_encode_decode_match_hf(model):
    tok, golden = model
    for case in golden["tokenizer"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["decoded"], case["text"]


def test_generation_prompts_and_outputs_match_hf(model):
    tok, golden = model
    for case in golden["generation"]:
        assert tok.encode(case["prompt"]) == case["prompt_ids"], case["name"]
        assert tok.decode(case["generated_ids"]) == case["generated_text"], case["name"]


def test_chat_template_matches_hf(model):
    tok, golden = model
    for name, case in golden["chat_template"].items():
        assert tok.apply_chat_template(case["messages"], tools=case.get("tools")) == case["text"], name


def test_stream_decoder_reproduces_decode(model):
    tok, golden = model
    sequences = [c["ids"] for c in golden["tokenizer"]] + [c["prompt_ids"] + c["generated_ids"] for c in golden["generation"]]
    for ids in sequences:
        stream = StreamDecoder(tok)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == tok.decode(ids)
        assert not any("\ufffd" in p for p in pieces)  # split characters are held back, never mangled


def test_stream_decoder_holds_back_split_character(model):
    tok, _ = model
    spell = _bytes_to_unicode()
    ids = [tok.token_to_id(spell[b]) for b in "€".encode()]  # three bytes, as three single-byte tokens
    stream = StreamDecoder(tok)
    assert [stream.push(i) for i in ids] == ["", "", "€"]
    assert stream.push(ids[0]) == "" and stream.flush() == "\ufffd" == tok.decode(ids[:1])


def test_special_ids(model):
    tok, _ = model
    assert tok.vocab_size == 151936
    assert tok.eos_token_id == 151645
    assert {151643, 151645} <= tok.stop_token_ids
    assert not tok.add_bos_token
    assert tok.encode("<|im_end|>") == [151645]
