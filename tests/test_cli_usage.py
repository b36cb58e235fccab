"""The CLI and Python API as a new user meets them (issue 13): no data loss, one-line errors instead of tracebacks,
checks before slow work, context limits, token-id checks, and the options llama.cpp users reach for. Each test
failed on the code before the issue's fixes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import TINY, default_sigint
from test_cli import assert_user_error, qtrt
from toolchain.decoder import Decoder, Sampling, StopStrings
from toolchain.errors import UserError

ENV = dict(os.environ, PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def tiny(synth_gguf):
    return synth_gguf(**TINY)


def _tree(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None) for p in path.rglob("*"))


# -- 1. export never deletes what it did not write ----------------------------------------------------------------

def test_export_refuses_a_directory_with_foreign_files(tiny, tmp_path):
    work = tmp_path / "mywork"
    (work / "src").mkdir(parents=True)
    (work / "important.txt").write_text("notes")
    (work / "src" / "main.py").write_text("print(1)")
    before = _tree(work)
    assert_user_error(qtrt("export", tiny, "-o", work, "--quiet"), str(work), "did not write")
    assert _tree(work) == before
    assert [p.name for p in tmp_path.iterdir()] == ["mywork"]  # no temporary directory left behind


def test_export_replaces_only_its_own_files(tiny, tmp_path):
    out = tmp_path / "onnx"
    qtrt("export", tiny, "-o", out, "--quiet", check_rc=0)
    manifest = json.loads((out / "qtrt-export.json").read_text())
    assert "model.onnx" in manifest["files"] and "weights.bin" in manifest["files"]
    (out / "my-notes.txt").write_text("keep me")
    (out / "stale.onnx").write_text("ours, from an older export")
    manifest["files"].append("stale.onnx")
    manifest["files"].append("../outside.txt")  # a manifest never reaches outside the directory
    (out / "qtrt-export.json").write_text(json.dumps(manifest))
    (tmp_path / "outside.txt").write_text("not ours")
    qtrt("export", tiny, "-o", out, "--quiet", check_rc=0)
    assert (out / "my-notes.txt").read_text() == "keep me"
    assert not (out / "stale.onnx").exists()
    assert (tmp_path / "outside.txt").read_text() == "not ours"
    assert (out / "model.onnx").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["onnx", "outside.txt"]


def test_export_into_an_empty_directory(tiny, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    qtrt("export", tiny, "-o", out, "--quiet", check_rc=0)
    assert (out / "model.onnx").is_file()


@pytest.mark.parametrize("target", ["/proc/qtrt-nope/out", "/dev/null/out"])
def test_export_to_an_unwritable_place_is_one_line(tiny, target):
    assert_user_error(qtrt("export", tiny, "-o", target, "--quiet"), target)


# -- 2. one line and exit 2 instead of tracebacks -----------------------------------------------------------------

def test_cuda_backend_without_a_gpu_is_one_line(tiny):
    from toolchain.cuda_runtime import gpu_problem

    if gpu_problem() is None:
        pytest.skip("a GPU is present")
    assert_user_error(qtrt("generate", "--model", tiny, "--backend", "cuda", "--prompt", "hi"), "--backend cuda")


def test_prompt_that_is_not_utf8(tiny, tmp_path):
    r = subprocess.run([sys.executable, "-m", "toolchain.cli", "generate", "--model", str(tiny), "--backend", "cpu",
                        "--prompt", b"caf\xe9 \xff"], capture_output=True, text=True)
    assert_user_error(r, "--prompt", "UTF-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    assert_user_error(qtrt("generate", "--model", tiny, "--file", bad), "UTF-8", str(bad))
    r = subprocess.run([sys.executable, "-m", "toolchain.cli", "generate", "--model", str(tiny), "--prompt", "-"],
                       input=b"\xff\xfe", capture_output=True)
    r.stderr = r.stderr.decode()
    assert_user_error(r, "standard input", "UTF-8")


def test_output_into_a_closed_pipe(tiny):
    p = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "generate", "--model", str(tiny), "--backend", "cpu",
                          "--prompt", "hello", "--max-new-tokens", "400", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert os.read(p.stdout.fileno(), 1)
    p.stdout.close()  # `| head -c 1`
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and "Exception" not in err, err
    assert p.returncode == 141


# -- 3. tensorrt without TensorRT: checked first, nothing written ----------------------------------------------------

def test_tensorrt_backend_without_tensorrt_writes_nothing(tiny, tmp_path):
    pytest.importorskip("toolchain.cuda_runtime")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed")
    except ImportError:
        pass
    model = tmp_path / "m.gguf"
    model.write_bytes(tiny.read_bytes())
    assert_user_error(qtrt("generate", "--model", model, "--backend", "tensorrt", "--prompt", "hi"),
                      "--backend tensorrt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


# -- 4. arguments checked before the model is read -----------------------------------------------------------------

@pytest.mark.parametrize("args,word", [(("--prompt", ""), "empty"), (("--prompt", "  "), "empty"),
                                       (("--prompt", "x", "--max-new-tokens", "0"), "--max-new-tokens"),
                                       (("--prompt", "x", "--backend", "gpu"), "--backend"),
                                       (("--prompt", "x", "--max-context", "0"), "--max-context"),
                                       (("--prompt", "x", "--top-p", "0"), "--top-p"),
                                       (("--prompt", "x", "--batch-size", "16"), "--batch-size"),
                                       ((), "--prompt"), (("--prompt", "x", "--file", "y"), "exactly one")])
def test_arguments_are_checked_before_the_model(args, word, tmp_path):
    """The model path does not exist: an argument error that names the argument was found first."""
    r = qtrt("generate", "--model", tmp_path / "absent.gguf", *args)
    assert_user_error(r, word)
    assert "absent.gguf" not in r.stderr


@pytest.mark.parametrize("args,word", [(("--batch-size", "9000"), "--batch-size"),
                                       (("--slots", "64", "--batch-size", "64"), "--slots 64")])
def test_serve_arguments_are_checked_before_the_model(args, word, tmp_path):
    r = qtrt("serve", "--model", tmp_path / "absent.gguf", "--port", "1", *args)
    assert_user_error(r, word)
    assert "absent.gguf" not in r.stderr


def test_backend_choices_list_auto():
    r = qtrt("generate", "--help", check_rc=0)
    assert "{auto,cpu,cuda,tensorrt}" in r.stdout and "default: 64" in r.stdout and "--stop STRING" in r.stdout


# -- 5. start-up shows what it is doing -----------------------------------------------------------------------------

def test_startup_progress_and_backend_line(tiny, tmp_path):
    env = dict(ENV, QTRT_PROGRESS="1")
    r = subprocess.run([sys.executable, "-m", "toolchain.cli", "generate", "--model", str(tiny), "--prompt", "hi",
                        "--max-new-tokens", "2", "--backend", "cpu"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for stage in ("reading", "tokenizer", "preparing layers", "qtrt: backend cpu (--backend cpu)"):
        assert stage in r.stderr, (stage, r.stderr)
    r = subprocess.run([sys.executable, "-m", "toolchain.cli", "export", str(tiny), "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "writing weights.bin" in r.stderr and "layer graphs" in r.stderr


# -- 6. the context's end stops generation (finish reason "length") ------------------------------------------------

def test_generation_stops_at_the_end_of_the_context(tiny):
    r = qtrt("generate", "--model", tiny, "--backend", "cpu", "--prompt", "hello world", "--max-new-tokens", "1000",
             "--max-context", "24", "--json", check_rc=0)
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "length" and out["context_full"]
    assert len(out["prompt_ids"]) + out["new_tokens"] == 24
    r = qtrt("generate", "--model", tiny, "--backend", "cpu", "--prompt", "hello world", "--max-new-tokens", "1000",
             "--max-context", "24", check_rc=0)
    assert "end of the context" in r.stderr


# -- 7. token ids are checked on every backend --------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_decoder(tiny):
    return Decoder.load(str(tiny), backend="cpu", max_context=64)


@pytest.mark.parametrize("ids", [[200000], [-1], [5, TINY["vocab"]], [1.5], [[1, 2]]])
def test_token_ids_outside_the_vocabulary(tiny_decoder, ids):
    with pytest.raises(UserError, match="vocabulary|integers"):
        tiny_decoder.generate(ids, max_new_tokens=2)
    with pytest.raises(UserError):
        tiny_decoder.backend.forward(ids)


# -- 8. smaller ones ------------------------------------------------------------------------------------------------

def test_error_prefix_once_and_fetch_message():
    r = qtrt("generate", "--max-new-tokens", "many")
    assert_user_error(r, "--max-new-tokens")
    assert r.stderr.count("qtrt") == 2 and "qtrt generate --help" in r.stderr  # "qtrt: error: ..." + the hint
    r = qtrt("fetch", "bogus")
    assert_user_error(r, "bogus")
    assert "--model" not in r.stderr


class _Scripted:
    """A backend whose logits pick the scripted tokens in turn (then the last one forever)."""
    name = "scripted"

    def __init__(self, vocab, script):
        self.vocab, self.script, self.pos, self.calls = vocab, list(script), 0, 0

    def reset(self, pos=0):
        self.pos, self.calls = pos, 0

    def forward(self, ids):
        self.pos += len(ids)
        logits = np.zeros(self.vocab, np.float32)
        logits[self.script[min(self.calls, len(self.script) - 1)]] = 1
        self.calls += 1
        return logits


def test_new_tokens_exclude_the_stop_token(tiny_decoder):
    eos = tiny_decoder.tokenizer.eos_token_id
    dec = Decoder(tiny_decoder.model, tiny_decoder.tokenizer, _Scripted(TINY["vocab"], [70, 71, eos]), 64)
    out = dec.generate("hi", max_new_tokens=10)
    assert out.ids == [70, 71] and out.finish_reason == "stop"


def test_interrupted_output_ends_its_line(synth_gguf):
    long = synth_gguf(**dict(TINY, context_length=8192))  # seconds of output: the interrupt lands mid-stream
    p = subprocess.Popen([sys.executable, "-m", "toolchain.cli", "generate", "--model", str(long), "--backend", "cpu",
                          "--prompt", "hello", "--max-new-tokens", "8000", "--max-context", "8192", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV, preexec_fn=default_sigint)
    first = os.read(p.stdout.fileno(), 1)  # unbuffered: communicate() reads the same fd
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.decode().strip() == "qtrt: interrupted", err
    assert (first + out).endswith(b"\n")


# -- the options llama.cpp users reach for ------------------------------------------------------------------------

def test_stop_strings(tiny):
    base = json.loads(qtrt("generate", "--model", tiny, "--backend", "cpu", "--prompt", "hello", "--max-new-tokens",
                           "30", "--json", check_rc=0).stdout)["text"]
    stop = base[len(base) // 2:len(base) // 2 + 3]
    assert len(stop) == 3, base
    cut = json.loads(qtrt("generate", "--model", tiny, "--backend", "cpu", "--prompt", "hello", "--max-new-tokens",
                          "30", "--json", "--stop", "NEVER-IN-TEXT", "--stop", stop, check_rc=0).stdout)
    assert cut["text"] == base[:base.index(stop)] and cut["finish_reason"] == "stop"


@pytest.mark.parametrize("stops,pieces", [(["END"], ["ab", "cE", "N", "Dxyz"]), (["a"], ["xa"]), ([], ["x", "y"]),
                                          (["<|x|>", "zz"], ["q<|", "x", "|", "zzz"])])
def test_stop_string_matcher(stops, pieces):
    """Whatever the split into pieces, the text shown is the whole text cut before the first stop string."""
    whole = "".join(pieces)
    first = min([whole.find(s) for s in stops if s in whole], default=len(whole))
    cut = StopStrings(stops)
    shown = "".join(cut.push(p) for p in pieces)
    if not cut.stopped:
        shown += cut.flush()
    assert shown == whole[:first] and cut.stopped == (first < len(whole))


def test_prompt_from_stdin_file_and_system(tiny, tmp_path):
    want = json.loads(qtrt("generate", "--model", tiny, "--backend", "cpu", "--prompt", "a b c", "--max-new-tokens",
                           "4", "--json", check_rc=0).stdout)
    r = subprocess.run([sys.executable, "-m", "toolchain.cli", "generate", "--model", str(tiny), "--backend", "cpu",
                        "--prompt", "-", "--max-new-tokens", "4", "--json"], input="a b c", capture_output=True,
                       text=True)
    assert json.loads(r.stdout)["ids"] == want["ids"]
    f = tmp_path / "prompt.txt"
    f.write_text("a b c")
    got = json.loads(qtrt("generate", "--model", tiny, "--backend", "cpu", "--file", f, "--max-new-tokens", "4",
                          "--json", check_rc=0).stdout)
    assert got["ids"] == want["ids"]
    sys_out = json.loads(qtrt("generate", "--model", tiny, "--backend", "cpu", "--prompt", "a b c", "--system",
                              "You are terse.", "--max-new-tokens", "4", "--json", check_rc=0).stdout)
    dec = Decoder.load(str(tiny), backend="cpu", max_context=64)
    assert sys_out["prompt_ids"] == dec.encode_prompt([{"role": "system", "content": "You are terse."},
                                                       {"role": "user", "content": "a b c"}])


def test_version_and_seed(tiny):
    import toolchain

    assert qtrt("--version", check_rc=0).stdout.strip() == f"qtrt {toolchain.__version__}"
    args = ("generate", "--model", tiny, "--backend", "cpu", "--prompt", "hi", "--max-new-tokens", "8",
            "--temperature", "1.5", "--json")
    first = json.loads(qtrt(*args, check_rc=0).stdout)
    assert isinstance(first["seed"], int)  # a fresh seed, reported so the run can be repeated
    again = json.loads(qtrt(*args, "--seed", first["seed"], check_rc=0).stdout)
    assert again["ids"] == first["ids"] and again["seed"] == first["seed"]


def test_prefix_reuse_gives_the_same_tokens(tiny):
    """A second prompt that extends the first reuses its cache and yields what a fresh decoder yields."""
    dec = Decoder.load(str(tiny), backend="cpu", max_context=128)
    fresh = Decoder.load(str(tiny), backend="cpu", max_context=128)
    s: dict = {}
    first = dec.generate("one two three", max_new_tokens=5)
    follow = first.prompt_ids + first.ids + dec.tokenizer.encode(" four five")
    got = list(dec.stream(follow, 6, Sampling(), stats=s, reuse_prefix=True))
    assert s["reused_tokens"] == len(first.prompt_ids) + len(first.ids) - 1
    assert got == list(fresh.stream(follow, 6, Sampling()))
