"""toolchain/buffer_plan.py: the activations' shared pool (cuda backend tuning share_activations), checked on the
model's real step graphs (fused decode, unfused prefill, and prefill with the gate/up/SwiGLU GEMM, of the 1.5B
layout, 6 layers) by executing them on a model of memory: every node's outputs take their bytes, every read must find
the bytes its value wrote, in every graph; a layout that ignores one graph, or puts two live values together, must
fail that."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from toolchain import buffer_plan
from toolchain.cuda_backend import prefill_graphs
from toolchain.fusion import fuse
from toolchain.graph import build_model_graph

ROWS = 3


@pytest.fixture(scope="module")
def graphs_and_sizes(synth_gguf):
    from toolchain.gguf_model import load_gguf

    model = load_gguf(synth_gguf("qwen2.5-coder-1.5b", n_layers=6, vocab=4096))
    g, _ = build_model_graph(model)
    # the cuda backend's graphs: decode steps, then prompt prefill as cuda_backend.prefill_graphs makes it: unfused,
    # each layer's gate, up and SwiGLU as one node (where its wgmma GEMMs run), each Add + RMSNorm as one, both
    models = [fuse(g), *prefill_graphs(g).values()]
    widths = {}
    for m in models[:2]:  # (the fused node has no schema; its output's width is the swiglu's)
        inferred = onnx.shape_inference.infer_shapes(m)
        for v in list(inferred.graph.value_info) + list(inferred.graph.output):
            t = v.type.tensor_type
            dims = [d.dim_value for d in t.shape.dim]
            if len(dims) == 2 and dims[1]:
                widths[v.name] = (dims[1], onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    # bytes per value: ROWS x width x itemsize, as the backend sizes them for max_tokens rows
    sizes = {v: ROWS * w * np.dtype(d).itemsize for v, (w, d) in widths.items()}
    return [m.graph for m in models], sizes, widths


def run_on_memory(graphs, sizes, offsets):
    """Execute each graph's nodes in order on a byte-owner map of the pool: outputs claim their bytes; an input
    that lives in the pool must still own all of its bytes (nothing written since clobbered it)."""
    total = max(offsets[v] + sizes[v] for v in offsets)
    ids = {v: i + 1 for i, v in enumerate(sorted(offsets))}
    for g in graphs:
        owner = np.zeros(total, np.int32)
        for node in g.node:
            for v in node.input:
                if v in offsets:
                    got = owner[offsets[v]:offsets[v] + sizes[v]]
                    assert (got == ids[v]).all(), f"{g.name}: {node.name} reads {v}, clobbered"
            for v in node.output:
                if v in offsets:
                    owner[offsets[v]:offsets[v] + sizes[v]] = ids[v]
            for v in node.input:  # a kernel reads while it writes: its outputs must not land on its inputs
                if v in offsets:
                    assert (owner[offsets[v]:offsets[v] + sizes[v]] == ids[v]).all(), \
                        f"{g.name}: {node.name} writes over its input {v}, clobbered"


def check(graphs, sizes, offsets):
    """Walk each graph in node order: at every node, the values alive there (written before and read at or after
    it, its own outputs included) occupy disjoint bytes. Raises AssertionError naming the first clash."""
    for g in graphs:
        life = {v: s for v, s in buffer_plan.lifetimes(g).items() if v in offsets}
        for n, node in enumerate(g.node):
            alive = sorted((offsets[v], offsets[v] + sizes[v], v) for v, (a, b) in life.items() if a <= n <= b)
            for (lo1, hi1, v1), (lo2, hi2, v2) in zip(alive, alive[1:]):
                assert hi1 <= lo2, f"{g.name}, node {n} ({node.name}): {v1} and {v2} overlap"


def test_the_shared_pool_keeps_every_value_until_its_last_read(graphs_and_sizes):
    graphs, sizes, _ = graphs_and_sizes
    total, offsets = buffer_plan.share(graphs, sizes)
    run_on_memory(graphs, sizes, offsets)
    check(graphs, sizes, offsets)
    outputs = {o.name for g in graphs for o in g.output} | {i.name for g in graphs for i in g.input}
    assert not outputs & set(offsets)  # logits, next_token, caches, step inputs: never shared
    assert "logits" in sizes and all(at % buffer_plan.ALIGN == 0 for at in offsets.values())
    unshared = sum(sizes[v] for v in offsets)
    assert len(offsets) > 60 and total * 6 < unshared, (total, unshared)  # about a layer's worth of 6


def test_a_layout_for_one_graph_clobbers_in_the_other(graphs_and_sizes):
    """A layout made for the decode graph alone breaks in the prefill graph: both graphs must count."""
    graphs, sizes, _ = graphs_and_sizes
    _, one = buffer_plan.share(graphs[:1], sizes)
    for v in {v for v in buffer_plan.lifetimes(graphs[1]) if v in sizes} - set(one):
        one[v] = 0  # the prefill graph's own values, all at the start
    with pytest.raises(AssertionError):
        run_on_memory(graphs, sizes, one)
    with pytest.raises(AssertionError):
        check(graphs, sizes, one)


def test_two_live_values_in_one_place_fail_the_check(graphs_and_sizes):
    graphs, sizes, _ = graphs_and_sizes
    _, offsets = buffer_plan.share(graphs, sizes)
    node = graphs[0].node[5]  # a node's input and output are alive together
    a, b = next(v for v in node.input if v in offsets), next(v for v in node.output if v in offsets)
    offsets[b] = offsets[a]
    with pytest.raises(AssertionError, match="overlap"):
        check(graphs, sizes, offsets)
    with pytest.raises(AssertionError, match="clobbered"):
        run_on_memory(graphs, sizes, offsets)


@pytest.mark.parametrize("share", [True, False])
def test_the_cuda_backend_places_its_activations_by_the_plan(graphs_and_sizes, monkeypatch, share):
    """CudaBackend._allocate_activations without a GPU (allocation stood in for by address counting): with
    share_activations every intermediate value is a view into one pool at the plan's offset, so executing the
    graphs on those addresses clobbers nothing; graph outputs (logits) get buffers of their own; without it, one
    buffer each, as before."""
    from toolchain import cuda_backend
    from toolchain import cuda_runtime as cr

    graphs, sizes, widths = graphs_and_sizes
    made = []

    class Fake:
        def __init__(self, nbytes):
            self.ptr, self.nbytes = 4096 + sum(b.nbytes + 4096 for b in made), nbytes
            made.append(self)

    monkeypatch.setattr(cr.DeviceBuffer, "zeros", classmethod(
        lambda cls, shape, dtype: Fake(int(np.prod(shape)) * np.dtype(dtype).itemsize)))
    be = object.__new__(cuda_backend.CudaBackend)
    be.max_tokens, be.tuning = ROWS, {**cuda_backend.TUNING, "share_activations": share}
    be.onnx = types_model(graphs[0])
    be.prefill_graphs = {k: types_model(g) for k, g in zip(((0, 0), (1, 0), (0, 1), (1, 1)), graphs[1:])}
    be.widths, be.buffers = dict(widths), {}
    be._allocate_activations()
    assert set(sizes) <= set(be.buffers)
    addr = {v: be.buffers[v].ptr for v in sizes}
    if share:
        pool = be.buffers["activations"]
        inside = {v for v in sizes if pool.ptr <= addr[v] < pool.ptr + pool.nbytes}
        assert "logits" not in inside and len(inside) == len(sizes) - 1
        run_on_memory(graphs, sizes, {v: addr[v] - pool.ptr for v in inside})
    else:
        assert "activations" not in be.buffers and len(made) == len(sizes)


def types_model(graph):
    """A stand-in for the backend's ModelProto: what _allocate_activations reads of it (.graph)."""
    import types

    return types.SimpleNamespace(graph=graph)


def test_the_gate_up_swiglu_graph_counts(graphs_and_sizes):
    """The gate/up/SwiGLU node reads the FFN's input while it writes the SwiGLU's output, two values that never live
    together in the unfused graphs: a layout made without its graph puts them in one place, which clobbers there."""
    graphs, sizes, _ = graphs_and_sizes
    _, two = buffer_plan.share(graphs[:2], sizes)
    run_on_memory(graphs[:2], sizes, two)
    with pytest.raises(AssertionError, match="writes over its input"):
        run_on_memory(graphs[2:], sizes, two)
