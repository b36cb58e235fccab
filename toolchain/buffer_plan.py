"""Where each activation of the step graphs lives: one pool, values that are never alive at the same time sharing
bytes (the cuda backend, tuning "share_activations").

The cuda backend sizes every activation for its largest step (max_tokens rows). One buffer per intermediate value
of the fused decode graph and the unfused prefill graph is 5.1 MB a token for the 1.5B (2.6 GB at 512 tokens), but
a value is alive only from the node that writes it to the last node that reads it, a few nodes of one layer. Both
graphs run on one stream, one at a time, each in node order (a plan's extra launches sit at their node's place), so
two values may share bytes unless their lifetimes overlap in either graph. First fit, largest first, over that
conflict relation (tests/test_buffer_plan.py verifies layouts by executing the graphs on a model of memory).

What must never share: graph inputs and outputs (the step's inputs, the KV caches, logits and next_token, read by
the host, the sampler and the next step) and anything in `keep`.
"""
from __future__ import annotations

ALIGN = 256  # bytes: every value starts at a multiple (the kernels' float4 and 16-byte loads)


def lifetimes(graph) -> dict[str, tuple[int, int]]:
    """Each intermediate value of an ONNX GraphProto: (index of the node that writes it, index of the last node that
    reads it, or its writer's where none does)."""
    edge = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    span: dict[str, list[int]] = {}
    for n, node in enumerate(graph.node):
        for v in node.output:
            if v and v not in edge:
                span[v] = [n, n]
        for v in node.input:
            if v in span:
                span[v][1] = n
    return {v: (a, b) for v, (a, b) in span.items()}


def share(graphs, sizes: dict[str, int], keep=()) -> tuple[int, dict[str, int]]:
    """(pool bytes, byte offset of each value) for the intermediate values of `graphs` that have a size in `sizes`
    and are not in `keep`: two values share bytes only if no graph has both alive at one node."""
    import numpy as np

    lives = [lifetimes(g) for g in graphs]
    names = sorted({v for life in lives for v in life if v in sizes and v not in keep},
                   key=lambda v: (-sizes[v], v))
    clash = np.zeros((len(names), len(names)), bool)  # alive together at some node of some graph
    for life in lives:
        here = np.array([v in life for v in names])
        first = np.array([life.get(v, (0, 0))[0] for v in names])
        last = np.array([life.get(v, (0, 0))[1] for v in names])
        clash |= (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None]) & here[:, None] & here[None, :]

    offsets: dict[str, int] = {}
    for j, v in enumerate(names):
        taken = sorted((offsets[u], offsets[u] + sizes[u]) for i, u in enumerate(names[:j]) if clash[i, j])
        at = 0
        for lo, hi in taken:  # the lowest aligned gap that holds v
            if at + sizes[v] <= lo:
                break
            at = max(at, -(-hi // ALIGN) * ALIGN)
        offsets[v] = at
    return max((offsets[v] + sizes[v] for v in offsets), default=0), offsets

