"""Run a qtrt plan: fixed device buffers, the KV cache owned here and passed to the plan by address, decode steps
replayed as a CUDA graph.

`TensorRTRunner.infer(feed) -> outputs` is the low-level contract; `TensorRTBackend` adapts it to the decoder.
TensorRT API per the 11.4 bindings wheel; CUDA through toolchain.cuda_runtime (cuda-python's driver API, the
primary context that TensorRT's runtime-API calls share). See docs/tensorrt.md.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from . import import_tensorrt
from .shape_rules import CACHE_PREFIXES, KV_ADDR_PREFIX, TOKEN_INPUTS
from ..errors import UserError, check_step, check_token_ids


def device_ptr(x) -> int | None:
    """The device address of a device-buffer-like object (`.ptr`, `.data_ptr`, `__cuda_array_interface__`), or
    None for host data."""
    if isinstance(x, np.ndarray):
        return None
    for attr in ("ptr", "data_ptr"):
        v = getattr(x, attr, None)
        if v is not None:
            return int(v() if callable(v) else v)
    cai = getattr(x, "__cuda_array_interface__", None)
    return int(cai["data"][0]) if cai else None


def plan_cache_shape(plan, config=None) -> tuple[int, int, int, int] | None:
    """The KV-cache shape (n_slots, n_kv_heads, max_context, head_dim) a plan was built for, which the runner must
    allocate exactly (the attention plugins take the caches by address with the plan's n_slots and max_seq_len baked
    in, so caches of another shape would be written out of bounds): build_engine's summary beside the plan
    (engine.plan_info_path) when it describes this file (same size), else the plan's name as the tensorrt backend
    gives it (decoder.plan_name: model-ctx<C>[-s<N>].plan) with `config`'s n_kv_heads and head_dim; None when
    neither says."""
    from .engine import plan_info_path

    plan, info = Path(plan), plan_info_path(plan)
    try:
        s = json.loads(info.read_text())
        if s.get("cache_shape") and plan.is_file() and s.get("plan_bytes") == plan.stat().st_size:
            return tuple(int(d) for d in s["cache_shape"])
    except (OSError, ValueError):
        pass
    from ..decoder import parse_plan_name

    named = parse_plan_name(plan.name)
    if named and config is not None:
        return named[1], int(config.n_kv_heads), named[0], int(config.head_dim)
    return None


class _NoCapture(Exception):
    pass


class TensorRTRunner:
    """One plan, one stream, one execution context per optimization profile, one device buffer per I/O tensor.

    infer(feed): numpy arrays are copied into the runner's buffers; device buffers are bound by address. Decode
    steps (m = 1) run through a CUDA graph captured after one plain execute_async_v3; inputs change only in the
    contents of fixed buffers.

    The KV cache is the runner's, not the plan's I/O (issue 16, risk 2): for each kv_addr.{i} input (int64 [2]) the
    runner allocates k_cache.{i} and v_cache.{i} (float16 `cache_shape` = (n_slots, n_kv_heads, max_context,
    head_dim); default: plan_cache_shape(plan)) and writes their two device addresses into kv_addr.{i} once; the
    attention plugin reads them there and updates the caches in place. The names k_cache.{i} / v_cache.{i} work as
    before for `read`, `zero_caches` and as feed keys.
    """

    def __init__(self, plan_path, use_graph: bool = True, cache_shape=None):
        trt = self.trt = import_tensorrt()
        from .. import cuda_runtime as cr

        self.cr = cr
        plan_path = Path(plan_path)
        if not plan_path.is_file():
            raise UserError(f"{plan_path}: no such plan; build one with `qtrt engine`")
        self.stream = cr.Stream()  # non-blocking: capturable; makes the primary context current for TensorRT
        self._stream_int = int(self.stream.handle)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        # AOT plugins carry their PTX inside the plan: nothing to register before deserializing.
        self.engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise UserError(f"{plan_path}: not a plan this TensorRT ({trt.__version__}) and GPU can load; rebuild it "
                            "with `qtrt engine` here")
        e = self.engine
        self.names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        self.inputs = [n for n in self.names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.dtype = {n: np.dtype(trt.nptype(e.get_tensor_dtype(n))) for n in self.names}
        if any(n.startswith(CACHE_PREFIXES) for n in self.names):
            raise UserError(f"{plan_path}: this plan takes the KV cache as network input/output (built before the "
                            "cache went by address, issue 16); rebuild it with `qtrt engine`")
        self.layers = sorted(int(n[len(KV_ADDR_PREFIX):]) for n in self.inputs if n.startswith(KV_ADDR_PREFIX))
        cache_shape = cache_shape or plan_cache_shape(plan_path)
        if self.layers and cache_shape is None:
            raise UserError(f"{plan_path}: the plan takes its KV caches by address, and their shape is unknown (no "
                            f"{plan_path.name}.json from `qtrt engine` beside it, no cache_shape given): rebuild it "
                            "with `qtrt engine`")
        self._dynamic = [n for n in self.inputs if -1 in tuple(e.get_tensor_shape(n))]

        # Profiles: the decode one has max m == 1, the prefill one the largest max m.
        n_prof = max(e.num_optimization_profiles, 1)
        tok = next((n for n in TOKEN_INPUTS if n in self.inputs), self.inputs[0])
        self.max_m = [self._profile(tok, p)[2][0] for p in range(n_prof)]
        self.prefill = int(np.argmax(self.max_m))
        self.decode = self.max_m.index(1) if 1 in self.max_m else self.prefill
        self.max_batch_tokens = self.max_m[self.prefill]
        self.contexts = []
        for p in range(n_prof):
            ctx = e.create_execution_context()
            if e.num_optimization_profiles > 1:
                ctx.set_optimization_profile_async(p, self._stream_int)
            self.contexts.append(ctx)

        # Buffers at the largest shapes any profile allows, and the caches (no plan tensors) at cache_shape.
        ctx = self.contexts[self.prefill]
        self.shape = {}
        for n in self.inputs:
            self.shape[n] = tuple(self._profile(n, self.prefill)[2])
            if n in self._dynamic:
                ctx.set_input_shape(n, self.shape[n])
        for n in self.outputs:
            self.shape[n] = tuple(ctx.get_tensor_shape(n))
        bad = [n for n in self.inputs if n.startswith(KV_ADDR_PREFIX)
               and (self.shape[n] != (2,) or self.dtype[n] != np.int64)]
        if bad:
            raise UserError(f"{plan_path}: inputs {', '.join(bad)} are not int64 [2] (a k and a v cache address)")
        if self.layers and len(cache_shape) != 4:
            raise ValueError(f"cache_shape {cache_shape}: want (n_slots, n_kv_heads, max_context, head_dim)")
        self.caches = [f"{kind}_cache.{i}" for i in self.layers for kind in "kv"]
        for n in self.caches:
            self.shape[n], self.dtype[n] = tuple(int(d) for d in cache_shape), np.dtype(np.float16)
        self.buf = {n: cr.DeviceBuffer(int(np.prod(self.shape[n])) * self.dtype[n].itemsize, self.shape[n],
                                       self.dtype[n]) for n in (*self.names, *self.caches)}
        self._owned = list(self.buf.values())
        for c in self.contexts:
            for n in self.names:
                c.set_tensor_address(n, self.buf[n].ptr)
            for n in self._dynamic:
                if n not in TOKEN_INPUTS:  # inputs of one fixed shape; token inputs: set per step
                    c.set_input_shape(n, self.shape[n])
        for i in self.layers:
            self._write_addresses(i)
        self.max_context = int(cache_shape[2]) if self.layers else None
        self.n_slots = int(cache_shape[0]) if self.layers else 1
        self.use_graph = use_graph
        self.graph = None
        self._cur_m = [None] * n_prof
        self.zero_caches()

    def _profile(self, name, p):
        e = self.engine
        if e.num_optimization_profiles == 0 or name not in self._dynamic:
            s = tuple(e.get_tensor_shape(name))
            return s, s, s
        return [tuple(d) for d in e.get_tensor_profile_shape(name, p)]

    # --- state -------------------------------------------------------------------------------------------------

    def zero_caches(self):
        for n in self.caches:
            self.buf[n].fill_u8(0, self.stream)
        self.stream.synchronize()

    def _write_addresses(self, layer: int):
        """kv_addr.{layer} <- the device addresses of k_cache.{layer} and v_cache.{layer} (the kernel's
        `cache_addr`: two 64-bit words, k then v). Ordered on the runner's stream, so a step already enqueued still
        sees the old addresses and every later one the new."""
        words = np.array([self.buf[f"k_cache.{layer}"].ptr, self.buf[f"v_cache.{layer}"].ptr], np.uint64)
        self.buf[f"{KV_ADDR_PREFIX}{layer}"].upload(words.view(np.int64), self.stream)

    def read(self, name: str, rows: int | None = None) -> np.ndarray:
        """Copy a tensor's buffer (its first `rows` along axis 0, default all) to the host."""
        return self.buf[name].download(shape=self.shape[name], dtype=self.dtype[name], rows=rows, stream=self.stream)

    def _bind(self, name: str, value):
        """Bind a caller's device buffer (anything with a device address) to input `name`.

        A cache (k_cache.{i} / v_cache.{i}) is no tensor of the plan: binding one rewrites the two address words in
        kv_addr.{i}, and the captured CUDA graph stays valid, because the attention kernel reads the cache's address
        from that device memory at run time, not from the graph's recorded kernel parameters (those hold only
        kv_addr.{i}'s own, unchanged, address). Any other input changes a tensor address recorded in the graph: the
        graph is dropped and captured again at the next decode step."""
        ptr = device_ptr(value)
        nbytes = int(np.prod(self.shape[name])) * self.dtype[name].itemsize
        if int(getattr(value, "nbytes", nbytes)) < nbytes:  # a kernel would write past its end
            raise ValueError(f"{name}: a device buffer of {value.nbytes} bytes; the plan uses {nbytes}")
        self.buf[name] = _Bound(ptr, value, nbytes)
        if name in self.caches:
            self._write_addresses(int(name.split(".", 1)[1]))
            return
        for c in self.contexts:
            c.set_tensor_address(name, ptr)
        self.graph = None

    # --- execution -----------------------------------------------------------------------------------------------

    def infer(self, feed: dict, outputs=None) -> dict:
        """Run one step. feed: name -> numpy array (copied in) or device buffer (bound); token_ids/positions/slots
        are required, caches (k_cache.{i} / v_cache.{i}) optional (the runner's own otherwise). Returns name -> numpy
        array for `outputs` (default: all outputs), cut to the step's m rows."""
        tok = next(n for n in TOKEN_INPUTS if n in self.inputs)
        if tok not in feed:
            raise KeyError(f"feed needs {', '.join(n for n in TOKEN_INPUTS if n in self.inputs)}")
        m = int(feed[tok].shape[0]) if hasattr(feed[tok], "shape") else len(feed[tok])
        if not 1 <= m <= self.max_batch_tokens:
            raise ValueError(f"{m} tokens in one step: the plan takes 1..{self.max_batch_tokens}")
        p = self.decode if m == 1 else self.prefill
        ctx = self.contexts[p]
        for name, value in feed.items():
            if name not in self.inputs and name not in self.caches:
                raise KeyError(f"{name}: not an input of this plan ({', '.join(self.inputs + self.caches)})")
            ptr = device_ptr(value)
            if ptr is not None:
                if ptr != self.buf[name].ptr:
                    self._bind(name, value)
                continue
            arr = np.ascontiguousarray(value, dtype=self.dtype[name])
            if arr.nbytes > int(np.prod(self.shape[name])) * self.dtype[name].itemsize:
                raise ValueError(f"{name}: {arr.shape} does not fit the plan's {self.shape[name]}")
            self.buf[name].upload(arr, self.stream)
        if self._cur_m[p] != m:
            for n in TOKEN_INPUTS:
                if n in self._dynamic:
                    ctx.set_input_shape(n, (m,))
            self._cur_m[p] = m
            if p == self.decode:  # one profile for both: a graph captured at another m must not be replayed
                self.graph = None
        if p == self.decode and self.use_graph:
            self._run_graph(ctx)
        elif not ctx.execute_async_v3(self._stream_int):
            raise RuntimeError("TensorRT execute_async_v3 failed; its log above says why")
        return {name: self.buf[name].download(shape=tuple(ctx.get_tensor_shape(name)), dtype=self.dtype[name],
                                              stream=self.stream)
                for name in outputs or self.outputs}

    def _run_graph(self, ctx):
        if self.graph is not None:
            self.graph.launch(self.stream)
            return
        # The first decode step runs plainly (TensorRT may allocate or set up state lazily), then the same enqueue
        # is captured (recorded, not executed) for replay from the next step on.
        if not ctx.execute_async_v3(self._stream_int):
            raise RuntimeError("TensorRT execute_async_v3 failed; its log above says why")
        self._advance()
        self.stream.synchronize()
        try:
            with self.stream.capture() as graph:
                if not ctx.execute_async_v3(self._stream_int):
                    raise _NoCapture("execute_async_v3 returned False under capture")
                self._advance()
        except (_NoCapture, RuntimeError) as e:  # e.g. the enqueue invalidated the capture (cuStreamEndCapture)
            # Nothing of the capture ran (it only records), and this step already ran plainly above: go on without
            # graphs, saying why once.
            print(f"qtrt: the TensorRT decode step cannot be captured into a CUDA graph ({e}); running it without "
                  "graphs", file=sys.stderr)
            self.use_graph = False
            return
        self.graph = graph

    def _advance(self):
        """Our decode_advance kernel after the engine: token_ids <- next_token, positions += 1, so a replayed graph
        is a self-advancing decode step exactly as in the cuda backend (toolchain/cuda_backend.py)."""
        if not {"next_token", "token_ids", "positions"} <= set(self.names):
            return
        if getattr(self, "_advance_kernel", None) is None:
            from ..kernels import launch_config

            self._advance_kernel = (self.cr.load_op("decode_advance"), launch_config("decode_advance", {"m": 1}))
        kernel, cfg = self._advance_kernel
        # the buffers' addresses as they are now: _bind() may have replaced any of them since the last step
        kernel.launch(cfg, [self.buf["next_token"].ptr, *cfg.scalars, self.buf["token_ids"].ptr,
                            self.buf["positions"].ptr], self.stream)

    def replay_decode(self) -> int:
        """One more decode step from the device-resident token and position (after a decode `infer`): replays
        the captured graph and returns the new greedy token."""
        ctx = self.contexts[self.decode]
        if self.use_graph and self.graph is not None:
            self.graph.launch(self.stream)
        else:
            if not ctx.execute_async_v3(self._stream_int):
                raise RuntimeError("TensorRT execute_async_v3 failed; its log above says why")
            self._advance()
        return int(self.read("next_token", rows=1).reshape(-1)[0])

    def close(self):
        self.graph = None
        for b in getattr(self, "_owned", []):
            b.free()
        self._owned = []
        self.contexts = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class _Bound:
    """A caller's device buffer bound to a tensor: the address, the object (kept alive while bound) and the size the
    plan uses; copies go through the driver like DeviceBuffer's."""

    def __init__(self, ptr: int, owner, nbytes: int):
        self.ptr, self.owner, self.nbytes = ptr, owner, nbytes

    def upload(self, a, stream):
        from .. import cuda_runtime as cr

        cr.check(cr.driver().cuMemcpyHtoDAsync(self.ptr, a.ctypes.data, a.nbytes, stream.handle), "cuMemcpyHtoD")
        stream.synchronize()

    def download(self, shape, dtype, stream, rows=None):
        from .. import cuda_runtime as cr

        out = np.empty(shape if rows is None else (rows, *shape[1:]), dtype)
        cr.check(cr.driver().cuMemcpyDtoHAsync(out.ctypes.data, self.ptr, out.nbytes, stream.handle), "cuMemcpyDtoH")
        stream.synchronize()
        return out

    def fill_u8(self, value, stream):
        from .. import cuda_runtime as cr

        cr.check(cr.driver().cuMemsetD8Async(self.ptr, value & 0xFF, self.nbytes, stream.handle), "cuMemsetD8")


class TensorRTBackend:
    """The decoder's backend interfaces over a TensorRTRunner: one sequence (reset / forward(ids) -> last logits /
    greedy) and the engine's steps of tokens from any slots (step), as the cpu backend's.

    The plan: `plan`, else $QTRT_PLAN, else <gguf dir>/<stem>.trt/model-ctx<max_context>[-s<n_slots>].plan, exported
    and built on first use (minutes) and reused while newer than the GGUF.
    """

    name = "tensorrt"

    def __init__(self, model, max_context: int, plan=None, max_batch_tokens: int = 512, n_slots: int = 1):
        plan = plan or os.environ.get("QTRT_PLAN") or self._build(model, max_context, max_batch_tokens, n_slots)
        # the caches are the runner's, in the plan's geometry (its summary or its name), not the one asked for here:
        # the checks below compare the two
        self.runner = TensorRTRunner(plan, cache_shape=plan_cache_shape(plan, model.config))
        if self.runner.max_context is not None and self.runner.max_context < max_context:
            raise UserError(f"{plan}: built for a context of {self.runner.max_context}, below --max-context "
                            f"{max_context}; rebuild with `qtrt engine --max-context {max_context}`")
        if self.runner.n_slots < n_slots:
            raise UserError(f"{plan}: built with {self.runner.n_slots} KV-cache slot(s), below --slots {n_slots}; "
                            f"rebuild with `qtrt engine --slots {n_slots}`")
        self.max_context = max_context
        self.n_slots = self.runner.n_slots
        self.max_tokens = self.runner.max_batch_tokens  # the engine's rows per step (step() cuts larger ones)
        self.vocab = model.config.vocab
        self.reset()

    @staticmethod
    def _build(model, max_context, max_batch_tokens, n_slots=1) -> str:
        from ..export import export_model
        from .engine import build_engine

        from ..decoder import plan_name, trt_cache_dir

        gguf = Path(model.path)
        root = trt_cache_dir(gguf)
        plan = root / plan_name(max_context, n_slots)
        if not plan.is_file() or plan.stat().st_mtime < gguf.stat().st_mtime:
            made = not root.exists()
            try:
                export_model(str(gguf), str(root / "onnx"))
                build_engine(root / "onnx", plan, max_context, max_batch_tokens, timing_cache=root / "timing.cache",
                             n_slots=n_slots)
            except BaseException:
                if made:  # a failed build leaves nothing behind (only what this call created is removed)
                    import shutil

                    shutil.rmtree(root, ignore_errors=True)
                raise
        return str(plan)

    def reset(self, pos: int = 0):
        self.pos = pos

    def forward(self, ids) -> np.ndarray:
        """Logits of the last of `ids`, appended at the current position (slot 0), in steps of the plan's size."""
        ids = np.asarray(check_token_ids(ids, self.vocab), np.int32).reshape(-1)
        logits = None
        for s in range(0, len(ids), self.runner.max_batch_tokens):
            chunk = ids[s:s + self.runner.max_batch_tokens]
            pos = np.arange(self.pos, self.pos + len(chunk), dtype=np.int32)
            out = self.runner.infer({"token_ids": chunk, "positions": pos, "slots": np.zeros_like(pos)},
                                    outputs=["logits"])
            logits = out["logits"][-1]
            self.pos += len(chunk)
        return logits

    def step(self, ids, positions, slots, rows=None) -> np.ndarray:
        """One step of tokens from any slots (toolchain/engine.py; CpuBackend.step's contract): each token at its own
        slot and position, in plan-sized pieces. Returns the logits of `rows` (default all), [len(rows), vocab].
        Ids, slots and positions are checked here: no kernel gets one outside its tensors."""
        positions = np.asarray([int(p) for p in positions], np.int32)
        slots = np.asarray([int(s) for s in slots], np.int32)
        ids = np.asarray(check_step(ids, positions, slots, self.vocab, self.max_context, self.n_slots), np.int32)
        order = list(range(len(ids))) if rows is None else [int(r) for r in rows]
        out = np.zeros((len(order), self.vocab), np.float32)
        where = {r: k for k, r in enumerate(order)}
        step = self.runner.max_batch_tokens
        for s in range(0, len(ids), step):
            got = self.runner.infer({"token_ids": ids[s:s + step], "positions": positions[s:s + step],
                                     "slots": slots[s:s + step]}, outputs=["logits"])["logits"]
            for j in range(len(got)):
                if s + j in where:
                    out[where[s + j]] = got[j]
        return out

    def greedy(self, first_token: int, n: int):
        """Yield n greedy tokens after `first_token`; after the first step the captured graph advances token and
        position on the device, and the host only reads the new token."""
        if n <= 0:
            return
        out = self.runner.infer({"token_ids": np.array([first_token], np.int32),
                                 "positions": np.array([self.pos], np.int32), "slots": np.zeros(1, np.int32)},
                                outputs=["next_token"])
        self.pos += 1
        yield int(out["next_token"].reshape(-1)[0])
        for _ in range(n - 1):
            tok = self.runner.replay_decode()
            self.pos += 1
            yield tok
