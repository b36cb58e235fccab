"""Runners (Polygraphy style): each executes a decode-step ONNX graph with one contract, `infer(feed) -> outputs`.

`feed` maps graph input names to numpy arrays (token_ids/hidden, positions, slots, the KV caches); `infer` returns
every graph output by name. KV-cache outputs alias their inputs, so a caller that keeps feeding the same cache
arrays carries state between steps. The CUDA and TensorRT runners keep the same contract with device buffers.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from . import ops
from .graph import DOMAIN, node_attrs, register_schemas


def run_node(op_type: str, inputs: list, attrs: dict) -> list:
    """Execute one node with the numpy references of docs/ops.md (standard ops included)."""
    if op_type in ops.TYPE_OF_OP and op_type.endswith("_matmul"):
        x, w, b = inputs
        return [ops.quant_matmul(x, w, b, ops.TYPE_OF_OP[op_type])]
    if op_type in ops.TYPE_OF_OP and op_type.endswith("_gather"):
        w, ids = inputs
        return [ops.quant_gather(w, ids, ops.TYPE_OF_OP[op_type], attrs["hidden"])]
    if op_type == "rope_kv_attention":
        return list(ops.rope_kv_attention(*inputs, n_heads=attrs["n_heads"], n_kv_heads=attrs["n_kv_heads"],
                                          head_dim=attrs["head_dim"], rope_theta=attrs["rope_theta"]))
    if op_type == "swiglu":
        return [ops.swiglu(*inputs)]
    if op_type in ("rms_norm_qkv", "matmul_add", "rms_norm_swiglu"):
        fn = getattr(ops, op_type)
        kw = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()
              if k not in ("plugin_namespace", "q_dim", "kv_dim", "in_features", "out_features", "ffn")}
        out = fn(*inputs, **kw)
        return list(out) if isinstance(out, tuple) else [out]
    if op_type == "RMSNormalization":
        return [ops.rms_norm(inputs[0], inputs[1], attrs["epsilon"])]
    if op_type == "Add":
        return [(inputs[0] + inputs[1]).astype(np.float32)]
    if op_type == "ArgMax":
        return [np.argmax(inputs[0], axis=attrs.get("axis", -1)).astype(np.int64)]
    raise NotImplementedError(f"no numpy implementation for op {op_type}")


class NumpyRunner:
    """Walks the graph in topological order and dispatches each node (the seed's KernelDispatch); `calls` counts
    the dispatches per op type so tests can check that exactly the expected work ran."""

    name = "numpy"

    def __init__(self, model: onnx.ModelProto, arrays: dict[str, np.ndarray]):
        self.model, self.arrays = model, arrays
        self.calls: Counter = Counter()

    def infer(self, feed: dict) -> dict:
        env = dict(self.arrays)
        env.update(feed)
        for node in self.model.graph.node:  # ONNX requires nodes in topological order; check_model verifies it
            outs = run_node(node.op_type, [env[i] for i in node.input], node_attrs(node))
            self.calls[node.op_type] += 1
            env.update(zip(node.output, outs))
        return {o.name: env[o.name] for o in self.model.graph.output}


def _reference_ops():
    """OpRun classes for our custom domain, so onnx.reference.ReferenceEvaluator can run the graph."""
    from onnx.reference.op_run import OpRun

    from .graph import CUSTOM_OPS

    classes = []
    for op in CUSTOM_OPS:
        def _run(self, *args, _op=op, **attrs):
            attrs = {k: v for k, v in attrs.items() if v is not None and k != "plugin_namespace"}
            return tuple(run_node(_op, list(args), attrs))
        classes.append(type(op, (OpRun,), {"op_domain": DOMAIN, "_run": _run}))
    return classes


class OnnxReferenceRunner:
    """ONNX's own evaluator: standard ops (RMSNormalization, Add, ArgMax) and all wiring are executed by code nobody
    here wrote; only our custom ops are supplied, as their numpy reference functions."""

    name = "onnx-reference"

    def __init__(self, model: onnx.ModelProto | str):
        from onnx.reference import ReferenceEvaluator

        register_schemas()
        self.evaluator = ReferenceEvaluator(model, new_ops=_reference_ops())
        self.output_names = list(self.evaluator.output_names)

    def infer(self, feed: dict) -> dict:
        return dict(zip(self.output_names, self.evaluator.run(None, feed)))


def new_caches(cfg, n_slots: int, max_seq: int, layers=None, poison=False) -> dict[str, np.ndarray]:
    """Zeroed float16 KV caches named as the model graph's inputs (k_cache.{i}, v_cache.{i})."""
    shape = (n_slots, cfg.n_kv_heads, max_seq, cfg.head_dim)
    fill = np.float16(np.nan) if poison else np.float16(0)
    return {f"{kind}_cache.{i}": np.full(shape, fill, np.float16)
            for i in (range(cfg.n_layers) if layers is None else layers) for kind in "kv"}
