"""Graph-level fusion: rewrite the 13-op layer into 5 nodes so a decode step launches 5 kernels per layer, not 13.

    RMSNorm -> Q, K, V projections          => rms_norm_qkv       (the normalized row never leaves the chip)
    O projection -> residual Add            => matmul_add         (the residual is added in the epilogue)
    RMSNorm -> gate, up projections -> SwiGLU => rms_norm_swiglu
    down projection -> residual Add         => matmul_add

At batch 1 a layer reads ~37 MB of weights in ~12 us on an H100, while each kernel boundary costs about 1-2 us even
inside a CUDA graph: launch count, not arithmetic, is what separates 13 kernels per layer from the bandwidth bound.
The unfused graph stays the export contract; every backend also understands the fused ops (docs/ops.md).
"""
from __future__ import annotations

import onnx
from onnx import helper

from .graph import DOMAIN, PLUGIN_NAMESPACE
from .ops import TYPE_OF_OP


def _is_matmul(n):
    return n is not None and n.domain == DOMAIN and n.op_type.endswith("_matmul")


def _attr(n, name):
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    raise KeyError(name)


class _Index:
    """A graph's producer of each value, its readers, and the graph's outputs: what a rewrite asks of it."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in graph.output}

    def sole_use(self, value, users) -> bool:
        """Whether `users` are exactly the nodes that read `value`, and no graph output is it."""
        return value not in self.outputs and sorted(map(id, self.consumers.get(value, []))) == sorted(map(id, users))


def _rewrite(graph: onnx.GraphProto, replace: dict[int, onnx.NodeProto | None]):
    """Each node with an entry in `replace` (by id) becomes that node at its place, or goes (None)."""
    nodes = [replace.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(n for n in nodes if n is not None)


def fuse(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of the decode-step model with the three patterns above fused (initializers are kept)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    ix = _Index(m.graph)
    producer, sole_use = ix.producer, ix.sole_use
    replace: dict[int, onnx.NodeProto | None] = {}  # id(node) -> fused node at this place, or None to drop

    def node(op, inputs, outs, name, **attrs):
        return helper.make_node(op, inputs, outs, name=name, domain=DOMAIN, plugin_namespace=PLUGIN_NAMESPACE, **attrs)

    for n in nodes:
        if n.op_type == "rope_kv_attention":
            projs = [producer.get(v) for v in n.input[:3]]
            norm = producer.get(projs[0].input[0]) if _is_matmul(projs[0]) else None
            if (all(_is_matmul(p) and p.input[0] == projs[0].input[0] for p in projs) and norm is not None
                    and norm.op_type == "RMSNormalization" and sole_use(norm.output[0], projs)
                    and all(sole_use(p.output[0], [n]) for p in projs)):
                q, k, v = projs
                fused = node("rms_norm_qkv", [norm.input[0], norm.input[1], q.input[1], q.input[2], k.input[1],
                                              k.input[2], v.input[1], v.input[2]],
                             [q.output[0], k.output[0], v.output[0]], norm.name + "+qkv",
                             epsilon=_attr(norm, "epsilon"), q_type=TYPE_OF_OP[q.op_type],
                             k_type=TYPE_OF_OP[k.op_type], v_type=TYPE_OF_OP[v.op_type],
                             q_dim=_attr(q, "out_features"), kv_dim=_attr(k, "out_features"))
                replace[id(norm)] = fused
                for p in projs:
                    replace[id(p)] = None
        elif n.op_type == "swiglu":
            g, u = producer.get(n.input[0]), producer.get(n.input[1])
            norm = producer.get(g.input[0]) if _is_matmul(g) else None
            if (_is_matmul(u) and norm is not None and u.input[0] == g.input[0]
                    and norm.op_type == "RMSNormalization" and sole_use(norm.output[0], [g, u])
                    and sole_use(g.output[0], [n]) and sole_use(u.output[0], [n])
                    and g.input[2].startswith("zeros.") and u.input[2].startswith("zeros.")):
                replace[id(norm)] = node("rms_norm_swiglu", [norm.input[0], norm.input[1], g.input[1], u.input[1]],
                                         [n.output[0]], norm.name + "+swiglu", epsilon=_attr(norm, "epsilon"),
                                         gate_type=TYPE_OF_OP[g.op_type], up_type=TYPE_OF_OP[u.op_type],
                                         ffn=_attr(g, "out_features"))
                replace[id(g)] = replace[id(u)] = replace[id(n)] = None
        elif n.op_type == "Add":
            for j in (0, 1):
                mm = producer.get(n.input[j])
                if _is_matmul(mm) and sole_use(mm.output[0], [n]) and id(mm) not in replace:
                    replace[id(mm)] = None
                    replace[id(n)] = node("matmul_add", [mm.input[0], mm.input[1], mm.input[2], n.input[1 - j]],
                                          [n.output[0]], mm.name + "+add", w_type=TYPE_OF_OP[mm.op_type],
                                          in_features=_attr(mm, "in_features"),
                                          out_features=_attr(mm, "out_features"))
                    break
    _rewrite(m.graph, replace)
    used = {i for n in m.graph.node for i in n.input}
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def fuse_gate_up_swiglu(model: onnx.ModelProto, fused_op: dict[str, str]) -> onnx.ModelProto:
    """A copy of the (unfused) prefill graph where one node computes a layer's gate and up projections and their
    SwiGLU, at the swiglu node's place, for the cuda backend's prefill GEMM that does that (plugins/quant_gemm.cu
    q4k_gemm_swiglu / q6k_gemm_swiglu, runtime-only ops; `fused_op`: matmul op type -> that op). Where both matmuls
    have one type in `fused_op`, the same input and shape, no bias (the graph's zeros), and only the swiglu reads
    them, whose output is read, and only by matmuls of types in `fused_op` (the down projection: so the fused kernel's
    fp16 copy may replace its float32 output, cuda_backend.XH_PRODUCERS). The fused node's inputs: x, w_gate,
    w_up."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ix = _Index(out.graph)
    replace: dict[int, onnx.NodeProto | None] = {}
    for n in out.graph.node:
        if n.op_type != "swiglu":
            continue
        g, u = ix.producer.get(n.input[0]), ix.producer.get(n.input[1])
        if g is None or u is None or g.op_type != u.op_type or g.op_type not in fused_op:
            continue
        shape = (_attr(g, "in_features"), _attr(g, "out_features"))
        readers = ix.consumers.get(n.output[0], [])
        if (g.input[0] != u.input[0] or shape != (_attr(u, "in_features"), _attr(u, "out_features"))
                or not (g.input[2].startswith("zeros.") and u.input[2].startswith("zeros."))
                or not (ix.sole_use(g.output[0], [n]) and ix.sole_use(u.output[0], [n]))
                or shape[1] % 16  # the kernel's epilogue writes 16 rows a thread (a k-quant's ffn always is)
                or n.output[0] in ix.outputs or not readers or any(r.op_type not in fused_op for r in readers)):
            continue
        replace[id(g)] = replace[id(u)] = None
        replace[id(n)] = helper.make_node(fused_op[g.op_type], [g.input[0], g.input[1], u.input[1]], [n.output[0]],
                                          name=n.name, in_features=shape[0], out_features=shape[1])
    _rewrite(out.graph, replace)
    return out


def fuse_add_rms_norm(model: onnx.ModelProto, op: str, keep: tuple[str, ...] = ()) -> onnx.ModelProto:
    """A copy of a prefill graph where each residual Add whose sum an RMSNormalization reads (the o and down
    projections' Adds before the next norm) computes that norm too: one node `op` (the cuda backend's runtime-only
    add_rms_norm, plugins/rms_norm.cu) at the Add's place, inputs (a, b, the norm's weight), outputs (the sum, the
    norm's output), the norm's epsilon; the norm node goes. The sum keeps its other readers (the next residual Add).
    Norms named in `keep` stay as they are (the final norm, which a last-only plan runs on one row). Only Adds of two
    values other nodes produce (no weight or graph input: nothing broadcast, the kernel reads both as [m, hidden])."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ix = _Index(out.graph)
    replace: dict[int, onnx.NodeProto | None] = {}
    for n in out.graph.node:
        add = ix.producer.get(n.input[0]) if n.op_type == "RMSNormalization" else None
        if (add is None or add.op_type != "Add" or n.name in keep or id(add) in replace or _attr(n, "axis") != -1
                or any(i not in ix.producer for i in add.input)):
            continue
        replace[id(n)] = None
        replace[id(add)] = helper.make_node(op, [add.input[0], add.input[1], n.input[1]], [add.output[0], n.output[0]],
                                            name=n.name, epsilon=_attr(n, "epsilon"))
    _rewrite(out.graph, replace)
    return out
