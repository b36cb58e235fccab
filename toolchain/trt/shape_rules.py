"""The TensorRT plugins' shape rules and launch dimensions as plain functions (no TensorRT needed to test them).

Every function here takes shapes as sequences of *dims*, where a dim is either an `int` or a TensorRT shape
expression (`tensorrt.plugin.ShapeExpr`). They only index shapes and pass dims through: a ShapeExpr has `+ - * //`
with the expression on the left but no reflected operators and no truth value (tensorrt_bindings/plugin/_tensor.py),
so anything computed from a dim belongs in `toolchain.kernels.launch_config`, which is written for that.

The op table is docs/ops.md; the tests check this module against it.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ops import GATHER_OP, MATMUL_OP, TYPE_OF_OP
from ..quants import BLOCK

NAMESPACE = "qtrt"  # plugin id = "qtrt::<op_type>"; every custom ONNX node carries plugin_namespace="qtrt"
# Node attributes that TensorRT's ONNX parser reads for routing, not plugin fields (the parser fills a plugin's
# fields from the creator's field names only: onnx-tensorrt onnxOpImporters.cpp, loadFields/addPluginWithCreator).
ROUTING_ATTRS = ("plugin_namespace", "plugin_version", "aot")

MATMUL_OPS = tuple(MATMUL_OP.values())
GATHER_OPS = tuple(GATHER_OP.values())
ATTENTION_OP = "rope_kv_attention"
# The TensorRT export's attention (issue 16, risk 2): the same kernel with the layer's KV cache passed by address,
# an int64 [2] input of device addresses; engine.prepare_onnx rewrites every ATTENTION_OP node into it.
ATTENTION_ADDR_OP = "rope_kv_attention_addr"
SWIGLU_OP = "swiglu"
EXPORT_OPS = MATMUL_OPS + GATHER_OPS + (ATTENTION_OP, SWIGLU_OP)  # what `qtrt export` writes (the ONNX contract)
PLUGIN_OPS = MATMUL_OPS + GATHER_OPS + (ATTENTION_ADDR_OP, SWIGLU_OP)  # what TensorRT gets: the qtrt:: plugins
CUSTOM_OPS = EXPORT_OPS + (ATTENTION_ADDR_OP,)  # every op with a schema here


@dataclass(frozen=True)
class Schema:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, type], ...]  # ONNX attribute name and Python type, in plugin-signature order
    output_dtypes: tuple[str | None, ...]  # tensorrt.DataType alias name; None = aliased to an input
    aliases: tuple[tuple[int, int], ...] = ()  # (output index, input index): output is the input, updated in place

    @property
    def alias_of(self) -> dict[int, int]:
        return dict(self.aliases)


SCHEMAS: dict[str, Schema] = {}
for _op in MATMUL_OPS:
    SCHEMAS[_op] = Schema(("x", "w", "bias"), ("y",), (("in_features", int), ("out_features", int)), ("float32",))
for _op in GATHER_OPS:
    SCHEMAS[_op] = Schema(("w", "ids"), ("y",), (("hidden", int),), ("float32",))
SCHEMAS[ATTENTION_OP] = Schema(
    ("q", "k", "v", "k_cache", "v_cache", "positions", "slots"),
    ("out", "k_cache_out", "v_cache_out"),
    (("n_heads", int), ("n_kv_heads", int), ("head_dim", int), ("rope_theta", float), ("layer", int),
     ("max_seq_len", int)),
    ("float32", None, None),
    aliases=((1, 3), (2, 4)),
)
# max_seq_len here is the cache length the runner allocates (engine.prepare_onnx sets it to --max-context), and
# n_slots the cache's slots: no cache shape is visible to this plugin, so both come as attributes.
SCHEMAS[ATTENTION_ADDR_OP] = Schema(
    ("q", "k", "v", "cache_addr", "positions", "slots"),
    ("out",),
    (("n_heads", int), ("n_kv_heads", int), ("head_dim", int), ("rope_theta", float), ("layer", int),
     ("max_seq_len", int), ("n_slots", int)),
    ("float32",),
)
SCHEMAS[SWIGLU_OP] = Schema(("gate", "up"), ("y",), (), ("float32",))


def output_shapes(op: str, shapes, attrs: dict) -> list[tuple]:
    """Output shapes from input shapes (node input order) and attributes; dims pass through untouched."""
    if op in MATMUL_OPS:
        x = shapes[0]
        return [(x[0], attrs["out_features"])]
    if op in GATHER_OPS:
        ids = shapes[1]
        return [(ids[0], attrs["hidden"])]
    if op == ATTENTION_OP:
        q, k_cache, v_cache = shapes[0], shapes[3], shapes[4]
        return [(q[0], q[1]), tuple(k_cache), tuple(v_cache)]
    if op == ATTENTION_ADDR_OP:
        return [(shapes[0][0], shapes[0][1])]
    if op == SWIGLU_OP:
        return [tuple(shapes[0])]
    raise KeyError(f"unknown custom op {op!r}; known: {', '.join(CUSTOM_OPS)}")


def launch_dims(op: str, shapes, attrs: dict) -> dict:
    """The `dims` that `toolchain.kernels.launch_config(op, dims)` takes: attributes as ints, shape-derived
    values as dims (ints here, shape expressions inside TensorRT)."""
    if op in MATMUL_OPS:
        return {"m": shapes[0][0], "k": attrs["in_features"], "n": attrs["out_features"]}
    if op in GATHER_OPS:  # vocab: the table's rows, for the kernel's bound on token ids (issue 16)
        return {"m": shapes[1][0], "hidden": attrs["hidden"], "vocab": shapes[0][0]}
    if op == ATTENTION_OP:
        k_cache = shapes[3]
        return {"m": shapes[0][0], "n_heads": attrs["n_heads"], "n_kv_heads": attrs["n_kv_heads"],
                "head_dim": attrs["head_dim"], "n_slots": k_cache[0], "max_seq": k_cache[2]}
    if op == ATTENTION_ADDR_OP:  # no cache shape to read: the cache geometry is in the attributes
        return {"m": shapes[0][0], "n_heads": attrs["n_heads"], "n_kv_heads": attrs["n_kv_heads"],
                "head_dim": attrs["head_dim"], "n_slots": attrs["n_slots"], "max_seq": attrs["max_seq_len"]}
    if op == SWIGLU_OP:
        m, f = shapes[0][0], shapes[0][1]
        return {"m": m, "f": f, "numel": m * f}  # expression on the left: ShapeExpr has no __rmul__
    raise KeyError(f"unknown custom op {op!r}; known: {', '.join(CUSTOM_OPS)}")


def check_shapes(op: str, shapes, attrs: dict) -> None:
    """Validate concrete (int) input shapes against the attributes; raises ValueError naming the mismatch."""
    def need(cond, what):
        if not cond:
            raise ValueError(f"{op}: {what} (input shapes {[tuple(s) for s in shapes]}, attributes {attrs})")

    s = SCHEMAS[op]
    need(len(shapes) == len(s.inputs), f"expects {len(s.inputs)} inputs {s.inputs}")
    if op in MATMUL_OPS:
        (x, w, bias), k, n = shapes, attrs["in_features"], attrs["out_features"]
        elems, nbytes = BLOCK[TYPE_OF_OP[op]]
        need(len(x) == 2 and x[1] == k, f"x must be [m, in_features={k}]")
        need(k % elems == 0, f"in_features {k} must be a multiple of the {elems}-element block")
        need(tuple(w) == (n, k // elems * nbytes), f"w must be [out_features={n}, row_bytes={k // elems * nbytes}]")
        need(tuple(bias) == (n,), f"bias must be [out_features={n}]")
    elif op in GATHER_OPS:
        (w, ids), hidden = shapes, attrs["hidden"]
        elems, nbytes = BLOCK[TYPE_OF_OP[op]]
        need(len(w) == 2 and w[1] == hidden // elems * nbytes, f"w must be [vocab, row_bytes of hidden={hidden}]")
        need(len(ids) == 1, "ids must be [m]")
    elif op in (ATTENTION_OP, ATTENTION_ADDR_OP):  # the same rows; the caches as tensors, or their addresses
        (q, k, v), (pos, slots) = shapes[:3], shapes[-2:]
        h, kvh, d = attrs["n_heads"], attrs["n_kv_heads"], attrs["head_dim"]
        m = q[0]
        need(tuple(q) == (m, h * d), f"q must be [m, n_heads*head_dim={h * d}]")
        need(tuple(k) == (m, kvh * d) and tuple(v) == (m, kvh * d), f"k and v must be [m, {kvh * d}]")
        need(tuple(pos) == (m,) and tuple(slots) == (m,), "positions and slots must be [m]")
        need(h % kvh == 0, "n_heads must be a multiple of n_kv_heads")
        if op == ATTENTION_OP:
            kc, vc = shapes[3:5]
            need(len(kc) == 4 and kc[1] == kvh and kc[3] == d, f"k_cache must be [n_slots, {kvh}, max_seq, {d}]")
            need(tuple(vc) == tuple(kc), "v_cache must have k_cache's shape")
        else:
            need(tuple(shapes[3]) == (2,), "cache_addr must be [2] (the k and v caches' device addresses)")
            need(attrs["n_slots"] >= 1 and attrs["max_seq_len"] >= 1, "n_slots and max_seq_len must be at least 1")
    elif op == SWIGLU_OP:
        need(len(shapes[0]) == 2 and tuple(shapes[0]) == tuple(shapes[1]), "gate and up must be equal [m, f]")


# --- optimization profiles ------------------------------------------------------------------------------------

TOKEN_INPUTS = ("token_ids", "positions", "slots")  # [m]
CACHE_PREFIXES = ("k_cache.", "v_cache.")  # the ONNX contract's caches [n_slots, n_kv_heads, max_seq, head_dim]
KV_ADDR_PREFIX = "kv_addr."  # TensorRT network input kv_addr.{i}: int64 [2], layer i's k and v cache addresses


def kv_addr_name(layer: int) -> str:
    return f"{KV_ADDR_PREFIX}{layer}"


def profile_shapes(inputs: dict[str, tuple[int, ...]],
                   max_batch_tokens: int) -> list[dict[str, tuple[tuple, tuple, tuple]]]:
    """(min, opt, max) per dynamic network input (-1 dims) for two profiles: decode (m = 1) and prefill (m up to
    max_batch_tokens). Only the decode profile when max_batch_tokens is 1. Static inputs (kv_addr.{i}: int64 [2])
    get no entry. The only dynamic axis is the token inputs' m: the caches are no network inputs (engine.prepare_onnx
    passes them by address), so a cache input here is refused."""
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens {max_batch_tokens}: must be at least 1")
    ranges = [(1, 1, 1)]
    if max_batch_tokens > 1:
        ranges.append((1, min(max_batch_tokens, 128), max_batch_tokens))
    profiles: list[dict] = [{} for _ in ranges]
    for name, shape in inputs.items():
        shape = tuple(int(d) for d in shape)
        if name.startswith(CACHE_PREFIXES):
            raise ValueError(f"network input {name}: a KV cache as a network input; the TensorRT network takes it by "
                             "address (engine.prepare_onnx)")
        if all(d >= 0 for d in shape):
            continue
        if name not in TOKEN_INPUTS or len(shape) != 1:
            raise ValueError(f"network input {name} {list(shape)}: no rule for its dynamic axes")
        for prof, (lo, opt, hi) in zip(profiles, ranges):
            prof[name] = ((lo,), (opt,), (hi,))
    return profiles
