"""Build a TensorRT plan from an exported ONNX directory (`qtrt engine`).

TensorRT API per the 11.4 bindings wheel (`strings tensorrt_bindings/tensorrt.so`); see docs/tensorrt.md.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from . import import_tensorrt
from .shape_rules import (ATTENTION_ADDR_OP, ATTENTION_OP, CACHE_PREFIXES, CUSTOM_OPS, KV_ADDR_PREFIX, NAMESPACE,
                          kv_addr_name, profile_shapes)
from ..errors import UserError


def plan_info_path(plan) -> Path:
    """<plan>.json: build_engine's summary beside the plan. The runner reads the KV-cache shape from it
    (runtime.plan_cache_shape): the plan's attention plugins take the caches by address, so their shape is nowhere
    in the plan's I/O, and caches of another shape would be written out of bounds."""
    return Path(f"{plan}.json")


def _is_plan_info(path: Path) -> bool:
    """Whether `path` is a summary build_engine wrote (a JSON object naming its plan and cache shape)."""
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(s, dict) and {"plan", "cache_shape"} <= s.keys()


def _atomic_write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def prepare_onnx(model_path: Path, plugin_weights: str = "int8", n_slots: int = 1, max_context: int | None = None):
    """The ModelProto to hand to TensorRT's parser (external data stays on disk) plus facts for the summary.

    TensorRT's ONNX parser converts every UINT8 initializer that feeds a non-Q/DQ node to INT32, value by value
    (onnx-tensorrt ModelImporter.cpp, parseNode: "UINT8 weights that are not Q/DQ inputs will be converted to
    INT32"): our raw GGUF blocks would become four times larger and unreadable as bytes. With plugin_weights="int8"
    the UINT8 initializers feeding qtrt plugins are retyped INT8 — the same bytes, only the element type changes —
    and the kernels read them through a byte pointer as before. "uint8" leaves them untouched.

    The KV cache goes by address (issue 16, risk 2; `_caches_by_address`): each rope_kv_attention node becomes a
    rope_kv_attention_addr node reading int64 kv_addr.{layer} [2], and the caches leave the network's inputs and
    outputs. max_context (the caches' length; default the export's max_seq_len) and n_slots become attributes.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    g = model.graph
    unknown = sorted({n.op_type for n in g.node if n.domain not in ("", "ai.onnx") and n.op_type not in CUSTOM_OPS})
    if unknown:
        raise UserError(f"{model_path}: ops {', '.join(unknown)} have no TensorRT plugin; build the engine from "
                        "the unfused `qtrt export` output")
    custom = [n for n in g.node if n.op_type in CUSTOM_OPS]
    plugin_inputs = {i for n in custom for i in n.input}
    standard_inputs = {i for n in g.node if n.op_type not in CUSTOM_OPS for i in n.input}
    shared = sorted(t.name for t in g.initializer if t.data_type == onnx.TensorProto.UINT8
                    and t.name in plugin_inputs and t.name in standard_inputs)
    if plugin_weights == "int8" and shared:  # INT8 would change what the standard op reads
        raise UserError(f"{model_path}: UINT8 initializers {', '.join(shared[:3])} feed both a qtrt plugin and a "
                        "standard op; export each use its own initializer")
    retyped = 0
    weight_bytes = 0
    for t in g.initializer:
        ext = {e.key: e.value for e in t.external_data}
        weight_bytes += int(ext.get("length", 0)) if ext else len(t.raw_data)
        if plugin_weights == "int8" and t.data_type == onnx.TensorProto.UINT8 and t.name in plugin_inputs:
            t.data_type = onnx.TensorProto.INT8
            if len(t.int32_data):  # non-raw storage keeps one value per int32: map 128..255 to -128..-1
                vals = [v - 256 if v > 127 else v for v in t.int32_data]
                del t.int32_data[:]
                t.int32_data.extend(vals)
            retyped += 1
    missing = sorted({n.op_type for n in custom
                      if not any(a.name == "plugin_namespace" and a.s == NAMESPACE.encode() for a in n.attribute)})
    if missing:
        raise UserError(f"{model_path}: nodes {', '.join(missing)} lack plugin_namespace=\"{NAMESPACE}\"; "
                        "re-export with this version of qtrt")
    cache_shape = _caches_by_address(model_path, g, n_slots, max_context)
    return model, {"plugins": dict(sorted(Counter(n.op_type for n in g.node if n.op_type in CUSTOM_OPS).items())),
                   "weights_bytes": weight_bytes, "retyped_uint8_initializers": retyped,
                   "kv_cache": "by address" if cache_shape else None, "cache_shape": cache_shape,
                   "onnx_inputs": [i.name for i in g.input], "onnx_outputs": [o.name for o in g.output]}


def _caches_by_address(model_path, g, n_slots: int, max_context: int | None) -> list[int] | None:
    """Rewrite graph `g` in place for TensorRT: every rope_kv_attention node (caches k_cache.{i} / v_cache.{i} in,
    L{i}.k_cache_out / v_cache_out out, aliased) becomes rope_kv_attention_addr with input kv_addr.{i}, int64 [2]:
    the device addresses of layer i's caches, which the runner owns (runtime.TensorRTRunner) and the kernel writes
    in place. Why: TensorRT may copy aliased network I/O (two whole caches per layer per step) or reject overlapping
    addresses; TensorRT-LLM's attention plugin takes its cache by pointer the same way. The exported ONNX contract
    (the cache as explicit graph state) is untouched on disk. Node order, names and every other node stay as they
    are. Returns the cache shape [n_slots, n_kv_heads, max_context, head_dim] (None without attention nodes)."""
    from onnx import TensorProto, helper

    graph_inputs = {i.name for i in g.input}
    caches, shape = {}, None  # cache tensor -> the node that owns it
    for idx, n in enumerate(g.node):
        if n.op_type != ATTENTION_OP:
            continue
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        i = a["layer"]
        q, k, v, kc, vc, pos, slots = n.input
        if (kc, vc) != (f"k_cache.{i}", f"v_cache.{i}") or not {kc, vc} <= graph_inputs:
            raise UserError(f"{model_path}: node {n.name} (layer {i}) reads caches {kc}, {vc}; the TensorRT export "
                            f"needs graph inputs k_cache.{i} and v_cache.{i} (the model.onnx of `qtrt export`)")
        if kc in caches:
            raise UserError(f"{model_path}: nodes {caches[kc]} and {n.name} both attend over layer {i}'s cache")
        ctx = int(max_context or a["max_seq_len"])
        if shape and shape[2] != ctx:
            raise UserError(f"{model_path}: attention nodes disagree on the context ({shape[2]} and {ctx})")
        shape = [int(n_slots), int(a["n_kv_heads"]), ctx, int(a["head_dim"])]
        for t in (kc, vc, *n.output[1:]):
            caches[t] = n.name
        a.update(max_seq_len=ctx, n_slots=int(n_slots))
        g.node[idx].CopyFrom(helper.make_node(ATTENTION_ADDR_OP, [q, k, v, kv_addr_name(i), pos, slots],
                                              [n.output[0]], name=n.name, domain=n.domain, **a))
    if not caches:
        return None
    left = [f"{t} (node {n.name})" for n in g.node for t in (*n.input, *n.output) if t in caches]
    left += [f"graph input {x.name}" for x in g.input if x.name.startswith(CACHE_PREFIXES) and x.name not in caches]
    if left:  # a cache read or written by anything but its attention node cannot move out of the network
        raise UserError(f"{model_path}: the TensorRT export passes the KV cache by address, but {', '.join(left)} "
                        "still uses a cache")
    inputs = []
    for x in g.input:
        if x.name.startswith("k_cache."):  # kv_addr.{i} takes the place of k_cache.{i}; v_cache.{i} goes
            inputs.append(helper.make_tensor_value_info(KV_ADDR_PREFIX + x.name[len("k_cache."):], TensorProto.INT64,
                                                        [2]))
        elif x.name not in caches:
            inputs.append(copy.deepcopy(x))  # copies: the repeated fields are cleared below
    outputs = [copy.deepcopy(x) for x in g.output if x.name not in caches]
    value_info = [copy.deepcopy(x) for x in g.value_info if x.name not in caches]
    for field, new in ((g.input, inputs), (g.output, outputs), (g.value_info, value_info)):
        del field[:]
        field.extend(new)
    return shape


def _progress_monitor(trt):
    """An IProgressMonitor (phase_start / step_complete / phase_finish, per the 11.4 docstrings) printing the
    builder's top two phase levels to stderr."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)  # pybind11 trampolines need the base initialiser
            self._lock = threading.Lock()
            self._depth: dict[str, int] = {}
            self._t0: dict[str, float] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self._lock:
                d = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self._depth[phase_name], self._t0[phase_name] = d, time.perf_counter()
                if d <= 1:
                    print(f"[trt] {'  ' * d}{phase_name} ({num_steps} steps)", file=sys.stderr, flush=True)

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            with self._lock:
                d = self._depth.pop(phase_name, 0)
                dt = time.perf_counter() - self._t0.pop(phase_name, time.perf_counter())
                if d <= 1:
                    print(f"[trt] {'  ' * d}{phase_name} done in {dt:.1f}s", file=sys.stderr, flush=True)

    return Monitor()


def _set_flag(config, trt, name: str) -> bool:
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        return False
    config.set_flag(flag)
    return True


def attach_timing_cache(config, cache_path: Path):
    """Give the builder config a timing cache from `cache_path` (or a new one if it is absent or from another GPU /
    TensorRT) and return it: the caller must keep it alive until the build finishes (ITimingCache's docstring: the
    config holds no reference of its own)."""
    blob = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # a cache from another GPU/TensorRT
        print(f"[trt] {cache_path}: timing cache does not match this GPU or TensorRT; starting a new one",
              file=sys.stderr)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(onnx_dir, plan_path, max_context: int, max_batch_tokens: int, timing_cache=None,
                 progress: bool = True, n_slots: int = 1, plugin_weights: str = "int8") -> dict:
    """Parse <onnx_dir>/model.onnx with the qtrt plugins, build with a decode (m=1) and a prefill
    (m <= max_batch_tokens) optimization profile, write the plan atomically; return a summary dict."""
    model_path = Path(onnx_dir) / "model.onnx"
    plan_path = Path(plan_path)
    if not model_path.is_file():
        raise UserError(f"{onnx_dir}: no model.onnx here; run `qtrt export` first")
    if max_context < 2:
        raise UserError(f"--max-context {max_context}: must be at least 2")
    if max_batch_tokens < 1:
        raise UserError(f"--max-batch-tokens {max_batch_tokens}: must be at least 1")
    if n_slots < 1:
        raise UserError(f"--slots {n_slots}: must be at least 1")
    info = plan_info_path(plan_path)
    if info.exists() and not _is_plan_info(info):  # never overwrite what we did not write
        raise UserError(f"{info}: exists and is not a plan summary written by `qtrt engine`; move it or choose "
                        "another -o")
    trt = import_tensorrt()
    from .plugins import register_all

    t0 = time.perf_counter()
    register_all()
    model, facts = prepare_onnx(model_path, plugin_weights, n_slots=n_slots, max_context=max_context)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    # 11.4: STRONGLY_TYPED is "always enabled ... retained for API compatibility but ignored"; on 10.x it makes the
    # ONNX types (f32 activations, int8 weights) the engine's types. PREFER_AOT_PYTHON_PLUGINS picks aot_impl where a
    # plugin has both implementations (ours have only AOT, so it is a statement of intent).
    for name in ("STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS"):
        f = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if f is not None:
            flags |= 1 << int(f)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse(model, path): "path ... Only required if the model has externally stored weights" (11.4 docstring);
    # external data locations resolve relative to model.onnx's directory.
    if not parser.parse(model.SerializeToString(), str(model_path)):
        errs = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise UserError(f"{model_path}: TensorRT could not parse the model: {errs}")

    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    try:
        profiles = profile_shapes(inputs, max_batch_tokens)
    except ValueError as e:
        raise UserError(f"{model_path}: {e}") from None

    config = builder.create_builder_config()
    for prof in (x for x in profiles if x):  # a fully static network needs no profile
        p = builder.create_optimization_profile()
        for name, (mn, opt, mx) in prof.items():
            p.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(p)
    # No PreviewFeature.ALIASED_PLUGIN_IO_10_03: no plugin output aliases an input any more, since the KV cache
    # reaches the attention plugin by address (prepare_onnx) and is neither a network input nor an output.
    monitor = None
    if progress and hasattr(trt, "IProgressMonitor"):
        monitor = _progress_monitor(trt)  # must outlive the build
        config.progress_monitor = monitor

    cache_path = Path(timing_cache) if timing_cache else None
    cache = attach_timing_cache(config, cache_path) if cache_path is not None else None  # alive until the build ends

    plan = builder.build_serialized_network(network, config)
    del cache
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine; its log above says why")
    _atomic_write(plan_path, plan)
    if cache_path is not None:
        _atomic_write(cache_path, config.get_timing_cache().serialize())

    layer_types = Counter(str(network.get_layer(i).type).split(".")[-1] for i in range(network.num_layers))
    summary = {
        "plan": str(plan_path),
        "plan_bytes": plan_path.stat().st_size,
        "weights_bytes": facts["weights_bytes"],
        "build_s": round(time.perf_counter() - t0, 2),
        "tensorrt": trt.__version__,
        "layers": network.num_layers,
        "plugin_layers": sum(v for k, v in layer_types.items() if k.startswith("PLUGIN")),
        "plugins": facts["plugins"],
        "retyped_uint8_initializers": facts["retyped_uint8_initializers"],
        "profiles": [{k: [list(s) for s in v] for k, v in prof.items()} for prof in profiles],
        "max_context": max_context,
        "max_batch_tokens": max_batch_tokens,
        "n_slots": n_slots,
        "kv_cache": facts["kv_cache"],
        "cache_shape": facts["cache_shape"],
        "timing_cache": str(cache_path) if cache_path else None,
    }
    _atomic_write(plan_info_path(plan_path), json.dumps(summary, indent=1).encode())
    return summary
