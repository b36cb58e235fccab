"""ONNX graphs of a Qwen2 decode step: one graph per layer (1 activation input + 13 op nodes) and the whole model.

The graph is the single source of truth for every backend: the numpy runner, ONNX's ReferenceEvaluator, our CUDA
runtime and TensorRT all execute exactly these nodes. Weights are uint8 initializers holding the raw GGUF blocks,
named as in the GGUF file; the builder returns the graph without initializers plus a name -> array map, and
`attach_initializers` decides whether the bytes go inline or to an external file (export) so that in-memory users
(the CUDA runtime) never copy a gigabyte into protobuf.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .gguf_model import Config, GGUFModel
from .ops import GATHER_OP, MATMUL_OP

DOMAIN = "ai.qtrt"
PLUGIN_NAMESPACE = "qtrt"
OPSET = 23  # RMSNormalization
OPSET_IMPORTS = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)]

F32, F16, I32, I64, U8 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT8

# Custom ops: name -> (inputs [(name, dtype)], outputs [(name, dtype)], attributes {name: AttrType}).
_A = onnx.defs.OpSchema.AttrType
_matmul = ([("x", "tensor(float)"), ("w", "tensor(uint8)"), ("bias", "tensor(float)")], [("y", "tensor(float)")],
           {"in_features": _A.INT, "out_features": _A.INT})
_gather = ([("w", "tensor(uint8)"), ("ids", "tensor(int32)")], [("y", "tensor(float)")], {"hidden": _A.INT})
CUSTOM_OPS = {
    **{op: _matmul for op in MATMUL_OP.values()},
    **{op: _gather for op in GATHER_OP.values()},
    "rope_kv_attention": (
        [("q", "tensor(float)"), ("k", "tensor(float)"), ("v", "tensor(float)"), ("k_cache", "tensor(float16)"),
         ("v_cache", "tensor(float16)"), ("positions", "tensor(int32)"), ("slots", "tensor(int32)")],
        [("out", "tensor(float)"), ("k_cache_out", "tensor(float16)"), ("v_cache_out", "tensor(float16)")],
        {"n_heads": _A.INT, "n_kv_heads": _A.INT, "head_dim": _A.INT, "rope_theta": _A.FLOAT, "layer": _A.INT,
         "max_seq_len": _A.INT}),
    "swiglu": ([("gate", "tensor(float)"), ("up", "tensor(float)")], [("y", "tensor(float)")], {}),
    # Fused ops produced by toolchain/fusion.py (fewer kernel launches per token); semantics in toolchain/ops.py.
    "rms_norm_qkv": (
        [("x", "tensor(float)"), ("norm_w", "tensor(float)"), ("wq", "tensor(uint8)"), ("bq", "tensor(float)"),
         ("wk", "tensor(uint8)"), ("bk", "tensor(float)"), ("wv", "tensor(uint8)"), ("bv", "tensor(float)")],
        [("q", "tensor(float)"), ("k", "tensor(float)"), ("v", "tensor(float)")],
        {"epsilon": _A.FLOAT, "q_type": _A.STRING, "k_type": _A.STRING, "v_type": _A.STRING, "q_dim": _A.INT,
         "kv_dim": _A.INT}),
    "matmul_add": (
        [("x", "tensor(float)"), ("w", "tensor(uint8)"), ("bias", "tensor(float)"), ("residual", "tensor(float)")],
        [("y", "tensor(float)")], {"w_type": _A.STRING, "in_features": _A.INT, "out_features": _A.INT}),
    "rms_norm_swiglu": (
        [("x", "tensor(float)"), ("norm_w", "tensor(float)"), ("w_gate", "tensor(uint8)"), ("w_up", "tensor(uint8)")],
        [("y", "tensor(float)")], {"epsilon": _A.FLOAT, "gate_type": _A.STRING, "up_type": _A.STRING, "ffn": _A.INT}),
}
# Attributes every custom node carries for TensorRT's ONNX parser (plugin lookup), not read by the op itself.
PARSER_ATTRS = {"plugin_namespace": _A.STRING}


def _tensor_type(elem, dims):
    return helper.make_tensor_type_proto(elem, dims)


def _infer(op):
    """Shape inference: outputs follow the contract in docs/ops.md (row count m from the first activation)."""
    def fn(ctx):
        def dims(i):
            return [d for d in ctx.get_input_type(i).tensor_type.shape.dim]

        def attr(name):
            return helper.get_attribute_value(ctx.get_attribute(name))

        def out(i, elem, shape):
            tp = onnx.TypeProto()
            tp.tensor_type.elem_type = elem
            for d in shape:
                nd = tp.tensor_type.shape.dim.add()
                if isinstance(d, int):
                    nd.dim_value = d
                else:
                    nd.CopyFrom(d)
            ctx.set_output_type(i, tp)

        if op in MATMUL_OP.values():
            out(0, F32, [dims(0)[0], attr("out_features")])
        elif op in GATHER_OP.values():
            out(0, F32, [dims(1)[0], attr("hidden")])
        elif op == "rope_kv_attention":
            out(0, F32, [dims(0)[0], attr("n_heads") * attr("head_dim")])
            out(1, F16, dims(3))
            out(2, F16, dims(4))
        elif op == "swiglu":
            out(0, F32, dims(0))
        elif op == "rms_norm_qkv":
            out(0, F32, [dims(0)[0], attr("q_dim")])
            out(1, F32, [dims(0)[0], attr("kv_dim")])
            out(2, F32, [dims(0)[0], attr("kv_dim")])
        elif op == "matmul_add":
            out(0, F32, [dims(0)[0], attr("out_features")])
        elif op == "rms_norm_swiglu":
            out(0, F32, [dims(0)[0], attr("ffn")])
    return fn


def register_schemas():
    """Register every custom op with ONNX so check_model(full_check=True) validates our graphs. Idempotent."""
    for op, (ins, outs, attrs) in CUSTOM_OPS.items():
        if onnx.defs.has(op, DOMAIN):
            continue
        types = sorted({t for _, t in ins + outs})
        tc = {t: f"T{i}" for i, t in enumerate(types)}
        schema = onnx.defs.OpSchema(
            op, DOMAIN, 1, doc=f"qwen-trt custom op {op}: see docs/ops.md",
            inputs=[onnx.defs.OpSchema.FormalParameter(n, tc[t]) for n, t in ins],
            outputs=[onnx.defs.OpSchema.FormalParameter(n, tc[t]) for n, t in outs],
            type_constraints=[(tc[t], [t], t) for t in types],
            attributes=[onnx.defs.OpSchema.Attribute(a, t, a, required=True) for a, t in attrs.items()]
            + [onnx.defs.OpSchema.Attribute(a, t, "TensorRT ONNX parser: plugin lookup", required=False)
               for a, t in PARSER_ATTRS.items()])
        schema.set_type_and_shape_inference_function(_infer(op))
        onnx.defs.register_schema(schema)


class GraphBuilder:
    """Collects nodes and the weights they reference; weights are named after their GGUF tensors."""

    def __init__(self, model: GGUFModel):
        self.model = model
        self.cfg = model.config
        self.nodes: list[onnx.NodeProto] = []
        self.arrays: dict[str, np.ndarray] = {}

    def weight(self, name: str) -> str:
        t = self.model.tensors[name]
        if name not in self.arrays:
            if t.ggml_type == "F32":
                self.arrays[name] = t.data.view(np.float32).reshape(t.shape)
            else:  # raw GGUF blocks, one row per output feature
                self.arrays[name] = t.data.reshape(t.shape[0], -1)
        return name

    def zeros(self, n: int) -> str:
        name = f"zeros.{n}"
        self.arrays.setdefault(name, np.zeros(n, np.float32))
        return name

    def node(self, op, inputs, outputs, name, domain="", **attrs):
        if domain == DOMAIN:
            attrs["plugin_namespace"] = PLUGIN_NAMESPACE
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain or None, **attrs))
        return outputs[0]

    def rms_norm(self, x, weight, out, name):
        return self.node("RMSNormalization", [x, self.weight(weight)], [out], name, axis=-1,
                         epsilon=float(self.cfg.rms_eps), stash_type=1)

    def matmul(self, x, weight, bias, out, name):
        t = self.model.tensors[weight]
        n, k = t.shape
        b = self.weight(bias) if bias else self.zeros(n)
        return self.node(MATMUL_OP[t.ggml_type], [x, self.weight(weight), b], [out], name, domain=DOMAIN,
                         in_features=k, out_features=n)

    def layer(self, i: int, x: str, positions: str, slots: str, k_cache: str, v_cache: str, p: str = ""):
        """One decoder layer: the 13 op nodes. Returns (hidden_out, k_cache_out, v_cache_out) value names."""
        c, w = self.cfg, lambda n: f"blk.{i}.{n}"  # noqa: E731
        h = self.rms_norm(x, w("attn_norm.weight"), p + "attn_in", p + "attn_norm")
        q = self.matmul(h, w("attn_q.weight"), w("attn_q.bias"), p + "q", p + "q_proj")
        k = self.matmul(h, w("attn_k.weight"), w("attn_k.bias"), p + "k", p + "k_proj")
        v = self.matmul(h, w("attn_v.weight"), w("attn_v.bias"), p + "v", p + "v_proj")
        outs = [p + "attn", p + "k_cache_out", p + "v_cache_out"]
        self.node("rope_kv_attention", [q, k, v, k_cache, v_cache, positions, slots], outs, p + "attention",
                  domain=DOMAIN, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                  rope_theta=float(c.rope_theta), layer=i, max_seq_len=c.context_length)
        o = self.matmul(outs[0], w("attn_output.weight"), None, p + "o", p + "o_proj")
        x1 = self.node("Add", [x, o], [p + "resid1"], p + "resid1_add")
        h2 = self.rms_norm(x1, w("ffn_norm.weight"), p + "ffn_in", p + "ffn_norm")
        g = self.matmul(h2, w("ffn_gate.weight"), None, p + "gate", p + "gate_proj")
        u = self.matmul(h2, w("ffn_up.weight"), None, p + "up", p + "up_proj")
        s = self.node("swiglu", [g, u], [p + "act"], p + "swiglu", domain=DOMAIN)
        d = self.matmul(s, w("ffn_down.weight"), None, p + "down", p + "down_proj")
        y = self.node("Add", [x1, d], [p + "hidden_out"], p + "resid2_add")
        return y, outs[1], outs[2]


def _io(name, elem, dims):
    return helper.make_tensor_value_info(name, elem, dims)


def _cache_dims(c: Config):
    return ["n_slots", c.n_kv_heads, "max_seq", c.head_dim]


def state_inputs(c: Config):
    return [_io("positions", I32, ["m"]), _io("slots", I32, ["m"])]


def build_layer_graph(model: GGUFModel, i: int) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Layer i's decode-step graph: activation input `hidden` [m, hidden] plus the step's state (positions, slots,
    this layer's KV cache). Returns the model (no initializers yet) and the weights it names."""
    c = model.config
    b = GraphBuilder(model)
    y, kc, vc = b.layer(i, "hidden", "positions", "slots", "k_cache", "v_cache")
    inputs = [_io("hidden", F32, ["m", c.hidden]), *state_inputs(c), _io("k_cache", F16, _cache_dims(c)),
              _io("v_cache", F16, _cache_dims(c))]
    outputs = [_io(y, F32, ["m", c.hidden]), _io(kc, F16, _cache_dims(c)), _io(vc, F16, _cache_dims(c))]
    return _model(b, f"qwen2_layer_{i}", inputs, outputs), b.arrays


def build_model_graph(model: GGUFModel) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The whole decode step: embedding gather, all layers, final RMSNorm, lm_head, argmax."""
    c = model.config
    b = GraphBuilder(model)
    emb = model.tensors["token_embd.weight"]
    x = b.node(GATHER_OP[emb.ggml_type], [b.weight("token_embd.weight"), "token_ids"], ["embed"], "embed",
               domain=DOMAIN, hidden=c.hidden)
    inputs = [_io("token_ids", I32, ["m"]), *state_inputs(c)]
    outputs = []
    for i in range(c.n_layers):
        inputs += [_io(f"k_cache.{i}", F16, _cache_dims(c)), _io(f"v_cache.{i}", F16, _cache_dims(c))]
        x, kc, vc = b.layer(i, x, "positions", "slots", f"k_cache.{i}", f"v_cache.{i}", p=f"L{i}.")
        outputs += [_io(kc, F16, _cache_dims(c)), _io(vc, F16, _cache_dims(c))]
    h = b.rms_norm(x, "output_norm.weight", "final", "final_norm")
    head = "output.weight" if "output.weight" in model.tensors else "token_embd.weight"
    logits = b.matmul(h, head, None, "logits", "lm_head")
    b.node("ArgMax", [logits], ["next_token"], "argmax", axis=-1, keepdims=0)
    outputs = [_io("logits", F32, ["m", c.vocab]), _io("next_token", I64, ["m"])] + outputs
    return _model(b, "qwen2_decode_step", inputs, outputs), b.arrays


def cache_output_name(i: int, kind: str) -> str:
    """Model-graph output that aliases input `{kind}_cache.{i}` (kind 'k' or 'v')."""
    return f"L{i}.{kind}_cache_out"


def _model(b: GraphBuilder, name, inputs, outputs) -> onnx.ModelProto:
    register_schemas()
    g = helper.make_graph(b.nodes, name, inputs, outputs)
    m = helper.make_model(g, opset_imports=OPSET_IMPORTS, producer_name="qwen-trt")
    m.ir_version = 11  # opset 23 needs IR 11; not newer than needed, for older consumers
    return m


def attach_initializers(model: onnx.ModelProto, arrays: dict[str, np.ndarray], external: dict | None = None):
    """Add the weights: inline (raw_data), or as references into one external file {name: (location, offset)}."""
    for name in sorted(arrays):
        a = arrays[name]
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(a.dtype)
        t.dims.extend(a.shape)
        if external is None:
            t.raw_data = np.ascontiguousarray(a).tobytes()
        else:
            loc, off = external[name]
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", loc), ("offset", str(off)), ("length", str(a.nbytes))):
                e = t.external_data.add()
                e.key, e.value = k, v
        model.graph.initializer.append(t)
    return model


def node_attrs(node) -> dict:
    """A node's attributes as Python values (strings decoded)."""
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    h: dict[str, int] = {}
    for n in model.graph.node:
        h[n.op_type] = h.get(n.op_type, 0) + 1
    return dict(sorted(h.items()))
