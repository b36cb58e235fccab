"""The TensorRT layer without TensorRT: shape rules, launch parameters (ints and symbolic), plugin signatures against
the op table, the ONNX preparation, and the CLI's answer when TensorRT is missing."""
import contextlib
import inspect
import re
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest

import toolchain
from toolchain.errors import UserError
from toolchain.trt import TRT_MISSING, plugins
from toolchain.trt import shape_rules as R

ROOT = Path(__file__).resolve().parents[1]


def _have_tensorrt() -> bool:
    try:
        import tensorrt

        return hasattr(tensorrt, "Builder")
    except Exception:
        return False


# --- a stand-in for tensorrt.plugin.ShapeExpr ---------------------------------------------------------------------

class Sym:
    """Like ShapeExpr (tensorrt_bindings/plugin/_tensor.py): + - * // with the expression on the left only (no
    __radd__/__rmul__), comparisons give expressions, and there is no truth value or int conversion. Evaluates
    with ev(**values)."""

    def __init__(self, f, text):
        self.f, self.text = f, text

    @staticmethod
    def var(name):
        return Sym(lambda env: env[name], name)

    def _op(self, other, fn, sym):
        assert isinstance(other, (Sym, int)) and not isinstance(other, bool), f"operand {other!r}"
        g = other.f if isinstance(other, Sym) else (lambda env: other)
        return Sym(lambda env: fn(self.f(env), g(env)), f"({self.text} {sym} {getattr(other, 'text', other)})")

    def __add__(self, o):
        return self._op(o, lambda a, b: a + b, "+")

    def __sub__(self, o):
        return self._op(o, lambda a, b: a - b, "-")

    def __mul__(self, o):
        return self._op(o, lambda a, b: a * b, "*")

    def __floordiv__(self, o):
        return self._op(o, lambda a, b: a // b, "//")

    def __eq__(self, o):
        return self._op(o, lambda a, b: int(a == b), "==")

    def __lt__(self, o):
        return self._op(o, lambda a, b: int(a < b), "<")

    __hash__ = object.__hash__

    def __bool__(self):
        raise TypeError(f"symbolic {self.text} used as a truth value")

    def __index__(self):
        raise TypeError(f"symbolic {self.text} used as an int")

    def ev(self, **env):
        return self.f(env)


def _ev(v, **env):
    return v.ev(**env) if isinstance(v, Sym) else v


def _sym_binary(fn, text):
    def op(a, b):
        if isinstance(a, int) and isinstance(b, int):
            raise ValueError("Both arguments cannot be 'int's")  # as tensorrt.plugin.cdiv/max/min
        a = a if isinstance(a, Sym) else Sym(lambda env, a=a: a, str(a))
        b_f = b.f if isinstance(b, Sym) else (lambda env: b)
        return Sym(lambda env: fn(a.f(env), b_f(env)), f"{text}({a.text}, {getattr(b, 'text', b)})")
    return op


SYM_TRTP = types.SimpleNamespace(cdiv=_sym_binary(lambda a, b: -(-a // b), "cdiv"),
                                 max=_sym_binary(max, "max"), min=_sym_binary(min, "min"))


# --- shape rules -----------------------------------------------------------------------------------------------

ATTN = dict(n_heads=12, n_kv_heads=2, head_dim=128, rope_theta=1e6, layer=3, max_seq_len=32768)


def _int_case(op, m):
    """Concrete input shapes, attributes and expected output shapes for op with m tokens."""
    if op in R.MATMUL_OPS:
        elems, nbytes = {"q4k": (256, 144), "q6k": (256, 210), "q5_0": (32, 22), "q8_0": (32, 34)}[op.rsplit("_", 1)[0]]
        k, n = 1536, 256
        return [(m, k), (n, k // elems * nbytes), (n,)], dict(in_features=k, out_features=n), [(m, n)]
    if op in R.GATHER_OPS:
        elems, nbytes = {"q4k": (256, 144), "q6k": (256, 210), "q5_0": (32, 22), "q8_0": (32, 34)}[op.rsplit("_", 1)[0]]
        return [(1000, 1536 // elems * nbytes), (m,)], dict(hidden=1536), [(m, 1536)]
    if op == R.ATTENTION_OP:
        cache = (1, 2, 64, 128)
        return ([(m, 1536), (m, 256), (m, 256), cache, cache, (m,), (m,)], dict(ATTN),
                [(m, 1536), cache, cache])
    if op == R.ATTENTION_ADDR_OP:  # the same geometry as above, from the attributes
        return [(m, 1536), (m, 256), (m, 256), (2,), (m,), (m,)], dict(ATTN, max_seq_len=64, n_slots=1), [(m, 1536)]
    return [(m, 8960), (m, 8960)], {}, [(m, 8960)]


@pytest.mark.parametrize("op", R.CUSTOM_OPS)
@pytest.mark.parametrize("m", [1, 7])
def test_output_shapes_with_ints(op, m):
    shapes, attrs, expected = _int_case(op, m)
    R.check_shapes(op, shapes, attrs)
    assert [tuple(s) for s in R.output_shapes(op, shapes, attrs)] == expected
    assert len(expected) == len(R.SCHEMAS[op].outputs) == len(R.SCHEMAS[op].output_dtypes)


@pytest.mark.parametrize("op", R.CUSTOM_OPS)
def test_output_shapes_pass_symbolic_dims_through(op):
    shapes, attrs, expected = _int_case(op, 5)
    m = Sym.var("m")
    sym_shapes = [tuple(m if d == 5 and j == 0 else d for j, d in enumerate(s)) for s in shapes]
    out = R.output_shapes(op, sym_shapes, attrs)
    assert [tuple(_ev(d, m=5) for d in s) for s in out] == expected


@pytest.mark.parametrize("op,bad", [("q8_0_matmul", 1), ("q4k_matmul", 2), ("rope_kv_attention", 3),
                                    ("rope_kv_attention_addr", 3), ("rope_kv_attention_addr", 0),
                                    ("swiglu", 1), ("q6k_gather", 0)])
def test_check_shapes_names_the_mismatch(op, bad):
    shapes, attrs, _ = _int_case(op, 3)
    shapes = [tuple(s) for s in shapes]
    shapes[bad] = tuple(d + 1 for d in shapes[bad])
    with pytest.raises(ValueError, match=op):
        R.check_shapes(op, shapes, attrs)


def test_attention_aliases_its_caches():
    s = R.SCHEMAS[R.ATTENTION_OP]
    assert {s.outputs[o]: s.inputs[i] for o, i in s.aliases} == {"k_cache_out": "k_cache", "v_cache_out": "v_cache"}
    assert all(s.output_dtypes[o] is None for o, _ in s.aliases)


def test_attention_by_address_schema():
    """The TensorRT network's attention: the export's inputs with the two caches replaced by one int64 [2] input of
    their addresses, one float32 output, no aliases; the cache geometry (n_slots, max_seq_len) from attributes, the
    same launch dims as the export's attention with caches of that shape; every plugin op has no aliases."""
    s, old = R.SCHEMAS[R.ATTENTION_ADDR_OP], R.SCHEMAS[R.ATTENTION_OP]
    assert s.inputs == ("q", "k", "v", "cache_addr", "positions", "slots") and s.outputs == ("out",)
    assert s.output_dtypes == ("float32",) and not s.aliases
    assert dict(s.attrs) == {**dict(old.attrs), "n_slots": int}
    assert R.ATTENTION_OP not in R.PLUGIN_OPS and R.ATTENTION_ADDR_OP not in R.EXPORT_OPS
    assert not [op for op in R.PLUGIN_OPS if R.SCHEMAS[op].aliases]
    for m in (1, 9):
        shapes, attrs, _ = _int_case(R.ATTENTION_ADDR_OP, m)
        cache = (3, 2, 100, 128)
        attrs.update(n_slots=3, max_seq_len=100)
        old_shapes = [shapes[0], shapes[1], shapes[2], cache, cache, shapes[4], shapes[5]]
        assert R.launch_dims(R.ATTENTION_ADDR_OP, shapes, attrs) == R.launch_dims(R.ATTENTION_OP, old_shapes, ATTN)
    with pytest.raises(ValueError, match="cache_addr must be"):
        R.check_shapes(R.ATTENTION_ADDR_OP, [(1, 1536), (1, 256), (1, 256), (1, 2), (1,), (1,)], attrs)


# --- launch parameters -------------------------------------------------------------------------------------------

def _kernels():
    try:
        from toolchain import kernels
    except ImportError:
        pytest.skip("toolchain.kernels is not there yet")
    return kernels


@pytest.mark.parametrize("op", R.CUSTOM_OPS)
def test_launch_config_is_the_same_with_ints_and_shape_expressions(op):
    kernels = _kernels()
    ops = plugins.TrtOps(SYM_TRTP)  # what the plugins hand launch_config inside TensorRT
    m = Sym.var("m")
    for mv in (1, 2, 17, 512):
        shapes, attrs, _ = _int_case(op, mv)
        ints = kernels.launch_config(op, R.launch_dims(op, shapes, attrs))
        sym_shapes = [tuple(m if j == 0 and i in _m_inputs(op) else d for j, d in enumerate(s))
                      for i, s in enumerate(shapes)]
        sym = kernels.launch_config(op, R.launch_dims(op, sym_shapes, attrs), ops=ops)
        for field in ("grid", "block"):
            assert len(getattr(sym, field)) == 3
            assert [_ev(v, m=mv) for v in getattr(sym, field)] == list(getattr(ints, field)), field
        assert _ev(sym.shared_mem, m=mv) == ints.shared_mem
        assert [_ev(v, m=mv) for v in sym.scalars] == list(ints.scalars)
        for v in sym.scalars:
            assert isinstance(v, (int, np.integer, Sym))
            assert -2**31 <= _ev(v, m=mv) < 2**31
        assert all(isinstance(_ev(v, m=mv), (int, np.integer)) and _ev(v, m=mv) >= 1
                   for v in (*sym.grid, *sym.block))


@pytest.mark.parametrize("op", R.CUSTOM_OPS)
def test_ptx_entry_follows_the_aot_calling_convention(op):
    """TensorRT calls an AOT kernel with: input pointers, the SymIntExprs scalars, output pointers (aot_impl
    docstring, tensorrt_bindings/plugin/_lib.py). Check the PTX that the plugin returns has exactly that parameter
    list."""
    kernels = _kernels()
    if kernels.nvcc_path() is None:
        pytest.skip("no nvcc")
    shapes, attrs, _ = _int_case(op, 3)
    ptx = plugins._ptx(op, tuple(sorted(kernels.defines_for(op, attrs).items())), "sm_90").decode()
    name = kernels.kernel_name(op)
    entry = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, re.S)
    assert entry, f"no .entry {name} in the PTX"
    params = re.findall(r"\.param\s+\.(\w+)", entry.group(1))
    n_scalars = len(kernels.launch_config(op, R.launch_dims(op, shapes, attrs)).scalars)
    s = R.SCHEMAS[op]
    assert params[:len(s.inputs)] == ["u64"] * len(s.inputs), params
    assert all(p in ("u32", "s32", "b32") for p in params[len(s.inputs):len(s.inputs) + n_scalars]), params
    assert params[len(s.inputs) + n_scalars:] == ["u64"] * len(s.outputs), params


def _m_inputs(op):
    """Indices of the inputs whose first dim is the step's m."""
    if op in R.GATHER_OPS:
        return {1}
    if op == R.ATTENTION_OP:
        return {0, 1, 2, 5, 6}
    if op == R.ATTENTION_ADDR_OP:
        return {0, 1, 2, 4, 5}
    return {0, 1} if op == R.SWIGLU_OP else {0}


def test_trt_ops_do_plain_math_on_ints():
    ops = plugins.TrtOps(SYM_TRTP)
    assert (ops.cdiv(10, 4), ops.max(3, np.int64(5)), ops.min(3, 5)) == (3, 5, 3)
    assert ops.cdiv(Sym.var("m"), 4).ev(m=9) == 3
    assert ops.max(2, Sym.var("m")).ev(m=1) == 2


# --- the op table: docs/ops.md <-> schemas <-> plugin signatures ---------------------------------------------------

def _docs_table() -> dict[str, dict]:
    rows = {}
    for line in (ROOT / "docs" / "ops.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        names = lambda cell: [t for t in re.findall(r"`([^`]+)`", cell) if not t.startswith("[")]  # noqa: E731
        attrs = {a: (float if re.search(rf"`{a}` \(float\)", cells[3]) else int) for a in names(cells[3])}
        for op in names(cells[0]):
            rows[op] = {"inputs": names(cells[1]), "outputs": names(cells[2]), "attrs": attrs}
    return rows


def test_schemas_match_docs_ops_md():
    table = _docs_table()
    assert set(R.CUSTOM_OPS) <= set(table)  # the table also lists fused ops that exported model.onnx never holds
    for op in R.CUSTOM_OPS:
        s, row = R.SCHEMAS[op], table[op]
        assert list(s.inputs) == row["inputs"], op
        assert list(s.outputs) == row["outputs"], op
        assert dict(s.attrs) == row["attrs"], op


def test_schemas_match_graph_custom_ops():
    """toolchain.graph.CUSTOM_OPS is what the exporter writes: same ops, inputs, outputs, attribute names and types
    (the attention by address is TensorRT's alone: prepare_onnx makes it, the exporter never does)."""
    graph = pytest.importorskip("toolchain.graph")
    import onnx

    A = onnx.defs.OpSchema.AttrType
    assert set(R.EXPORT_OPS) <= set(graph.CUSTOM_OPS) and R.ATTENTION_ADDR_OP not in graph.CUSTOM_OPS
    assert graph.PLUGIN_NAMESPACE == R.NAMESPACE and set(graph.PARSER_ATTRS) <= set(R.ROUTING_ATTRS)
    for op in R.EXPORT_OPS:
        (ins, outs, attrs), s = graph.CUSTOM_OPS[op], R.SCHEMAS[op]
        assert [n for n, _ in ins] == list(s.inputs) and [n for n, _ in outs] == list(s.outputs), op
        assert {n: {A.INT: int, A.FLOAT: float}[t] for n, t in attrs.items()} == dict(s.attrs), op


class _FakeDesc:
    def __init__(self, shape_expr=None, dtype=None):
        self.shape_expr, self.dtype, self._aliased_to = shape_expr, dtype, None

    def aliased(self):
        d = _FakeDesc(self.shape_expr, self.dtype)
        d._aliased_to = self
        return d

    def get_aliased(self):
        return self._aliased_to


@pytest.fixture
def fake_trt(monkeypatch):
    """A `tensorrt` with a recording `tensorrt.plugin`, shaped after the 11.4 wheel's plugin/*.py."""
    rec = {"register": {}, "aot": {}, "compile": [], "launch": []}
    trt = types.ModuleType("tensorrt")
    trt.Builder, trt.__version__, trt.float32 = object, "fake", "float32"
    trtp = types.ModuleType("tensorrt.plugin")

    class SymIntExpr:
        def __init__(self, v):
            assert isinstance(v, (int, Sym, SymIntExpr)) and not isinstance(v, (bool, np.integer)), repr(v)
            self.v = v.v if isinstance(v, SymIntExpr) else v

    class SymInt32(SymIntExpr):
        pass

    class SymIntExprs:
        def __init__(self, n):
            self.items = [None] * n

        def __setitem__(self, i, v):  # as in _tensor.py: non-SymIntExpr ints become plain SymIntExpr
            self.items[i] = v if isinstance(v, SymIntExpr) else SymIntExpr(v)

        def __len__(self):
            return len(self.items)

    class KernelLaunchParams:
        def __init__(self):
            for f in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z"):
                setattr(self, f, 1)
            self.shared_mem = 0

        def __setattr__(self, k, v):
            assert k in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem"), k
            object.__setattr__(self, k, SymInt32(v))

    def register(pid):
        return lambda fn: rec["register"].setdefault(pid, fn)

    def aot_impl(pid):
        return lambda fn: rec["aot"].setdefault(pid, fn)

    trtp.__dict__.update(TensorDesc=_FakeDesc, SymInt32=SymInt32, SymIntExprs=SymIntExprs, SymIntExpr=SymIntExpr,
                         KernelLaunchParams=KernelLaunchParams, register=register, aot_impl=aot_impl,
                         from_shape_expr=lambda shape, dtype: _FakeDesc(shape, dtype), **vars(SYM_TRTP))
    trt.plugin = trtp
    kernels = types.ModuleType("toolchain.kernels")

    def launch_config(op, dims, ops, clusters=True):
        rec["launch"].append((op, dims, clusters))
        m = dims["m"]
        return types.SimpleNamespace(grid=(ops.cdiv(m, 4), 2, np.int64(1)), block=(128, 1, 1), shared_mem=0,
                                     scalars=(m, np.int32(7)))

    def compile_kernel(op, defines={}, fmt="ptx", arch="sm_90"):
        rec["compile"].append((op, defines, fmt, arch))
        return b"// ptx"

    kernels.__dict__.update(launch_config=launch_config, compile_kernel=compile_kernel,
                            kernel_name=lambda op: f"qtrt_{op}", defines_for=lambda op, attrs, clusters=True: dict(
                                sorted((k.upper(), v) for k, v in attrs.items() if k != "layer"), CLUSTERS=clusters))
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setitem(sys.modules, "toolchain.kernels", kernels)
    monkeypatch.setattr(toolchain, "kernels", kernels, raising=False)
    monkeypatch.setattr(plugins, "_REGISTERED", [])
    monkeypatch.setenv("QTRT_CUDA_ARCH", "sm_90")
    plugins.target_arch.cache_clear()
    plugins._ptx.cache_clear()
    yield rec
    plugins.target_arch.cache_clear()
    plugins._ptx.cache_clear()


def test_plugin_signatures_match_the_op_table(fake_trt):
    ids = plugins.register_all()
    assert sorted(ids) == sorted(f"qtrt::{op}" for op in R.PLUGIN_OPS)
    assert sorted(fake_trt["register"]) == sorted(fake_trt["aot"]) == sorted(ids)  # nothing else registered
    assert plugins.register_all() == ids  # idempotent
    table = _docs_table()
    for op in R.PLUGIN_OPS:
        s, row = R.SCHEMAS[op], table[op]
        assert (list(s.inputs), dict(s.attrs)) == (row["inputs"], row["attrs"]), op
        reg = inspect.signature(fake_trt["register"][f"qtrt::{op}"])
        tensors = [n for n, p in reg.parameters.items() if p.annotation is _FakeDesc]
        attrs = {n: p.annotation for n, p in reg.parameters.items() if p.annotation is not _FakeDesc}
        assert tensors == row["inputs"], op
        assert attrs == row["attrs"], op
        assert list(reg.parameters)[:len(tensors)] == tensors  # tensors first, then attributes
        ret = reg.return_annotation
        n_out = len(typing.get_args(ret)) if typing.get_origin(ret) is tuple else 1
        assert n_out == len(row["outputs"]), op
        aot = inspect.signature(fake_trt["aot"][f"qtrt::{op}"])
        assert list(aot.parameters) == list(reg.parameters) + ["outputs", "tactic"], op
        assert all(aot.parameters[n].annotation == reg.parameters[n].annotation for n in reg.parameters)


@pytest.mark.parametrize("op", R.PLUGIN_OPS)
def test_plugin_description_and_aot_impl(fake_trt, op):
    plugins.register_all()
    shapes, attrs, expected = _int_case(op, 5)
    m = Sym.var("m")
    descs = [_FakeDesc(tuple(m if j == 0 and i in _m_inputs(op) else d for j, d in enumerate(s)), "x")
             for i, s in enumerate(shapes)]
    out = fake_trt["register"][f"qtrt::{op}"](*descs, **attrs)
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(R.SCHEMAS[op].outputs)
    for i, d in enumerate(out):
        assert d.dtype == "float32" and d.get_aliased() is None  # no aliased plugin I/O (issue 16, risk 2)
        assert tuple(_ev(v, m=5) for v in d.shape_expr) == expected[i]

    # aot_impl is called positionally with every attribute (get_launch_params in _plugin_class.py)
    name, ptx, params, extra = fake_trt["aot"][f"qtrt::{op}"](*descs, *attrs.values(), out, 0)
    assert (name, ptx) == (f"qtrt_{op}", b"// ptx")
    assert fake_trt["compile"][-1][2:] == ("ptx", "sm_90")
    assert fake_trt["compile"][-1][1]["CLUSTERS"] is False  # builds without clusters (issue 16, risk 1)
    assert all(type(v).__name__ == "SymInt32" for v in extra.items)  # not bare SymIntExpr
    assert [_ev(v.v, m=9) for v in extra.items] == [9, 7]
    assert all(type(params.__dict__[f]).__name__ == "SymInt32" for f in ("grid_x", "block_x", "shared_mem"))
    assert _ev(params.grid_x.v, m=9) == 3 and params.grid_z.v == 1
    _, op_dims, clusters = fake_trt["launch"][-1]
    assert _ev(op_dims["m"], m=9) == 9 and clusters is False
    if op == R.ATTENTION_ADDR_OP:  # the cache geometry from the attributes
        assert (op_dims["n_slots"], op_dims["max_seq"]) == (attrs["n_slots"], attrs["max_seq_len"])


def test_one_ptx_per_attribute_set(fake_trt):
    """Layers differ only in `layer`, which the kernels ignore: all layers share one compile."""
    plugins.register_all()
    shapes, attrs, _ = _int_case(R.ATTENTION_ADDR_OP, 1)
    descs = [_FakeDesc(s, "x") for s in shapes]
    for layer in range(4):
        a = dict(attrs, layer=layer)
        fake_trt["aot"]["qtrt::rope_kv_attention_addr"](*descs, *a.values(), (), 0)
    assert len(fake_trt["compile"]) == 1


# --- optimization profiles --------------------------------------------------------------------------------------

def test_profiles_decode_and_prefill():
    """The rewritten network's inputs (prepare_onnx): token inputs [m], kv_addr.{i} static int64 [2]; a cache as a
    network input is refused, as is any other dynamic input."""
    inputs = {"token_ids": (-1,), "positions": (-1,), "slots": (-1,), "kv_addr.0": (2,), "kv_addr.1": (2,)}
    dec, pre = R.profile_shapes(inputs, max_batch_tokens=512)
    assert dec["token_ids"] == ((1,), (1,), (1,))
    assert pre["positions"] == ((1,), (128,), (512,))
    assert set(dec) == set(pre) == set(R.TOKEN_INPUTS)  # static: no profile entry for the addresses
    assert len(R.profile_shapes(inputs, 1)) == 1
    with pytest.raises(ValueError, match="weird"):
        R.profile_shapes({"weird": (-1, 3)}, 8)
    with pytest.raises(ValueError, match="k_cache.0: a KV cache as a network input"):
        R.profile_shapes({**inputs, "k_cache.0": (1, 2, 64, 128)}, 8)


# --- ONNX preparation -------------------------------------------------------------------------------------------

def _tiny_onnx(path: Path, namespace="qtrt"):
    import onnx
    from onnx import TensorProto, helper

    k, n = 64, 8
    w = np.arange(n * k // 32 * 34, dtype=np.int64).astype(np.uint8).reshape(n, -1)
    attrs = dict(in_features=k, out_features=n)
    if namespace:
        attrs["plugin_namespace"] = namespace
    node = helper.make_node("q8_0_matmul", ["x", "w", "b"], ["y"], domain="ai.qtrt", **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                          [helper.make_tensor("w", TensorProto.UINT8, w.shape, w.tobytes(), raw=True),
                           helper.make_tensor("b", TensorProto.FLOAT, [n], np.zeros(n, np.float32))])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("ai.qtrt", 1)])
    onnx.save(model, str(path))
    return w


def test_prepare_onnx_retypes_plugin_weights_bit_identically(tmp_path):
    from onnx import TensorProto, numpy_helper

    from toolchain.trt.engine import prepare_onnx

    w = _tiny_onnx(tmp_path / "model.onnx")
    model, facts = prepare_onnx(tmp_path / "model.onnx")
    t = next(t for t in model.graph.initializer if t.name == "w")
    assert t.data_type == TensorProto.INT8
    assert numpy_helper.to_array(t).view(np.uint8).tobytes() == w.tobytes()
    assert facts["plugins"] == {"q8_0_matmul": 1} and facts["retyped_uint8_initializers"] == 1
    model, facts = prepare_onnx(tmp_path / "model.onnx", plugin_weights="uint8")
    assert facts["retyped_uint8_initializers"] == 0


def test_prepare_onnx_wants_plugin_namespace(tmp_path):
    from toolchain.trt.engine import prepare_onnx

    _tiny_onnx(tmp_path / "model.onnx", namespace=None)
    with pytest.raises(UserError, match="plugin_namespace"):
        prepare_onnx(tmp_path / "model.onnx")


def test_prepare_onnx_refuses_ops_without_a_plugin(tmp_path):
    import onnx

    from toolchain.trt.engine import prepare_onnx

    _tiny_onnx(tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    model.graph.node[0].op_type = "matmul_add"  # a fused op: CUDA-runtime graphs only
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(UserError, match="matmul_add"):
        prepare_onnx(tmp_path / "model.onnx")


def test_exported_custom_nodes_carry_exactly_the_plugin_attributes(tmp_path):
    """The contract TensorRT's parser relies on: node attributes = the plugin signature's attributes (same names and
    types) + plugin_namespace="qtrt"."""
    try:
        from toolchain.export import export_model
        from toolchain.synth import layout, write_synthetic_gguf
    except ImportError:
        pytest.skip("toolchain.export is not there yet")
    pytest.importorskip("gguf")
    import onnx

    cfg, types_ = layout("qwen2.5-coder-0.5b", n_layers=1, vocab=1024, context_length=64)
    gguf = write_synthetic_gguf(tmp_path / "m.gguf", cfg, types_, seed=0)
    export_model(str(gguf), str(tmp_path / "onnx"))
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False)
    py = {onnx.AttributeProto.INT: int, onnx.AttributeProto.FLOAT: float, onnx.AttributeProto.STRING: str}
    seen = set()
    for node in model.graph.node:
        if node.op_type not in R.SCHEMAS:
            continue
        seen.add(node.op_type)
        got = {a.name: py.get(a.type) for a in node.attribute}
        assert got == {**dict(R.SCHEMAS[node.op_type].attrs), "plugin_namespace": str}, node.name
        assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "plugin_namespace")) \
            == b"qtrt"
        assert len(node.input) == len(R.SCHEMAS[node.op_type].inputs), node.name
        assert len(node.output) == len(R.SCHEMAS[node.op_type].outputs), node.name
    assert {R.ATTENTION_OP, R.SWIGLU_OP} <= seen


def test_prepared_export_has_no_uint8_and_int8_feeds_only_plugins(tmp_path):
    """Issue 16, risk 4, on a whole exported model (synthetic 0.5B layout, 2 layers): after prepare_onnx no UINT8
    initializer remains, every INT8 initializer feeds only qtrt plugins, and the weight bytes are those of the
    export (inline bytes equal, external data still points at the same file, offset and length, which is unchanged
    on disk); an initializer shared by a plugin and a standard op is refused rather than retyped."""
    pytest.importorskip("gguf")
    import hashlib

    import onnx

    from toolchain.export import export_model
    from toolchain.synth import layout, write_synthetic_gguf
    from toolchain.trt.engine import prepare_onnx
    from toolchain.trt.shape_rules import CUSTOM_OPS

    cfg, types_ = layout("qwen2.5-coder-0.5b", n_layers=2, vocab=1024, context_length=64)
    gguf = write_synthetic_gguf(tmp_path / "m.gguf", cfg, types_, seed=0)
    export_model(str(gguf), str(tmp_path / "onnx"))
    path = tmp_path / "onnx" / "model.onnx"
    before = onnx.load(str(path), load_external_data=False)
    data = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "onnx").iterdir()}
    model, facts = prepare_onnx(path)
    uint8 = [t.name for t in before.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    assert uint8 and facts["retyped_uint8_initializers"] == len(uint8)
    assert not [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.UINT8]
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, set()).add(n.op_type)
    old = {t.name: t for t in before.graph.initializer}
    for t in model.graph.initializer:
        if t.data_type != onnx.TensorProto.INT8:
            continue
        assert consumers[t.name] <= set(CUSTOM_OPS), (t.name, consumers[t.name])
        assert t.raw_data == old[t.name].raw_data
        assert [(e.key, e.value) for e in t.external_data] == [(e.key, e.value) for e in old[t.name].external_data]
    assert data == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "onnx").iterdir()}
    # poisoned: the embedding table also read by a standard op
    w = next(t.name for t in before.graph.initializer if t.data_type == onnx.TensorProto.UINT8)
    before.graph.node.append(onnx.helper.make_node("Identity", [w], ["leak"], name="leak"))
    onnx.save(before, str(tmp_path / "onnx" / "shared.onnx"))
    with pytest.raises(UserError, match="both a qtrt plugin and a standard op"):
        prepare_onnx(tmp_path / "onnx" / "shared.onnx")


def test_no_plugin_launch_asks_for_dynamic_shared_memory():
    """Risk 5: the AOT path cannot raise the 48 KB limit; the export has no GEMM plugin, and every plugin launch at
    the profiles' token counts (decode 1; prefill 1, 128, 512) asks for no dynamic shared memory."""
    from toolchain.kernels import GEMM_OPS, MODEL_ATTRS, SKINNY_OPS, launch_config

    assert not set(R.CUSTOM_OPS) & set(GEMM_OPS + SKINNY_OPS)
    model = MODEL_ATTRS[0]
    for op in R.PLUGIN_OPS:
        for m in (1, 128, 512):
            if op in R.MATMUL_OPS:
                dims = {"m": m, "k": model["hidden"], "n": model["ffn"]}
            elif op in R.GATHER_OPS:
                dims = {"m": m, "hidden": model["hidden"], "vocab": 151936}
            elif op == R.ATTENTION_ADDR_OP:
                dims = {"m": m, "n_heads": model["n_heads"], "n_slots": 1, "max_seq": 4096}
            else:
                dims = {"m": m, "numel": m * model["ffn"]}
            assert launch_config(op, dims, clusters=False).shared_mem == 0, (op, m)


# --- without TensorRT ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT is installed here")
def test_engine_without_tensorrt_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "model.onnx").write_bytes(b"")
    try:
        from toolchain.cli import main
    except ImportError:
        from toolchain.trt.engine import build_engine

        with pytest.raises(UserError, match="TensorRT is not installed"):
            build_engine(tmp_path, tmp_path / "m.plan", 64, 8)
        return
    rc = main(["engine", str(tmp_path), "-o", str(tmp_path / "m.plan"), "--timing-cache", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip() == f"qtrt: error: {TRT_MISSING}"
    assert not (tmp_path / "m.plan").exists()


def test_engine_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    """<plan>.json is build_engine's summary: a file of that name that is not one is refused before any work, with
    one line and exit 2, and left as it was (TensorRT or not)."""
    from toolchain.cli import main

    (tmp_path / "model.onnx").write_bytes(b"")
    notes = tmp_path / "m.plan.json"
    for text in ("my notes", '{"plan": "elsewhere"}'):
        notes.write_text(text)
        rc = main(["engine", str(tmp_path), "-o", str(tmp_path / "m.plan"), "--timing-cache", str(tmp_path / "t")])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "m.plan.json: exists and is not a plan summary" in err, err
        assert notes.read_text() == text and not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(_have_tensorrt(), reason="TensorRT is installed here")
def test_runner_and_plugins_without_tensorrt(tmp_path):
    from toolchain.trt.runtime import TensorRTRunner

    for call in (lambda: TensorRTRunner(tmp_path / "x.plan"), plugins.register_all):
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == TRT_MISSING and "\n" not in str(e.value)


# -- runtime and builder defects found by the review against the 11.4 sources (issue 16) --------------------------

class _Buf:
    def __init__(self, ptr):
        self.ptr = ptr


class _Kernel:
    def __init__(self):
        self.calls = []

    def launch(self, cfg, args, stream):
        self.calls.append(list(args))


def _bare_runner():
    from toolchain.trt.runtime import TensorRTRunner

    r = object.__new__(TensorRTRunner)  # no plan or TensorRT: only what _advance and _run_graph touch
    kernel = _Kernel()
    r.names = ["token_ids", "positions", "slots", "next_token"]
    r.buf = {"next_token": _Buf(100), "token_ids": _Buf(200), "positions": _Buf(300)}
    r.cr = type("CR", (), {"load_op": staticmethod(lambda op: kernel)})
    r.stream, r._stream_int, r.graph, r.use_graph = None, 0, None, True
    return r, kernel


def test_advance_follows_rebound_buffers(monkeypatch):
    """_advance launched with the token/position addresses of its first use; after _bind() replaced those buffers it
    wrote to the old ones."""
    r, kernel = _bare_runner()
    r._advance()
    r.buf["token_ids"], r.buf["positions"] = _Buf(201), _Buf(301)  # what _bind() does
    r._advance()
    assert kernel.calls[0][0] == 100 and kernel.calls[0][-2:] == [200, 300]
    assert kernel.calls[1][-2:] == [201, 301]


def test_invalidated_capture_falls_back_with_a_message(monkeypatch, capsys):
    """A capture that cuStreamEndCapture reports as invalidated (a RuntimeError from our checked call) must not
    escape: the step already ran plainly, and the runner goes on without graphs, saying so once."""
    import contextlib

    r, kernel = _bare_runner()

    class Stream:
        def synchronize(self):
            pass

        @contextlib.contextmanager
        def capture(self):
            yield object()
            raise RuntimeError("cuStreamEndCapture failed: CUDA_ERROR_STREAM_CAPTURE_INVALIDATED")

    class Ctx:
        runs = 0

        def execute_async_v3(self, stream):
            Ctx.runs += 1
            return True

    r.stream = Stream()
    r._run_graph(Ctx())
    assert Ctx.runs == 2 and r.use_graph is False and r.graph is None
    assert len(kernel.calls) == 2  # the plain step's advance, and the recorded one
    err = capsys.readouterr().err
    assert "cannot be captured" in err and "CAPTURE_INVALIDATED" in err


def test_timing_cache_is_returned_to_be_kept_alive(tmp_path, capsys):
    """The cache handed to set_timing_cache must outlive the build: attach_timing_cache returns the one in use,
    also when the file's cache is refused and a new one replaces it."""
    from toolchain.trt.engine import attach_timing_cache

    class Config:
        def __init__(self, accept):
            self.accept, self.made, self.set = accept, [], []

        def create_timing_cache(self, blob):
            self.made.append(("cache", blob))
            return self.made[-1]

        def set_timing_cache(self, cache, ignore_mismatch):
            self.set.append(cache)
            return self.accept or cache[1] == b""

    path = tmp_path / "timing.cache"
    path.write_bytes(b"old")
    ok = Config(accept=True)
    assert attach_timing_cache(ok, path) is ok.set[-1] == ("cache", b"old")
    refused = Config(accept=False)
    kept = attach_timing_cache(refused, path)
    assert kept is refused.set[-1] and kept == ("cache", b"") and "does not match" in capsys.readouterr().err


# --- the engine over the tensorrt backend, TensorRT stood in for by the numpy reference -----------------------------

class _ReferencePlan:
    """What TensorRTBackend needs of a TensorRTRunner (infer of token_ids / positions / slots -> logits of every
    row; n_slots, max_context, max_batch_tokens), computed by the numpy reference with its own caches; a small plan
    size, so the backend must cut steps into pieces. Records every feed."""

    def __init__(self, model, max_context, n_slots, max_batch_tokens=5):
        from toolchain.decoder import CpuBackend

        self.ref = CpuBackend(model, max_context, n_slots=n_slots)
        self.max_context, self.n_slots, self.max_batch_tokens = max_context, n_slots, max_batch_tokens
        self.feeds = []

    def infer(self, feed, outputs=None):
        assert set(feed) == {"token_ids", "positions", "slots"} and outputs == ["logits"]
        assert 1 <= len(feed["token_ids"]) <= self.max_batch_tokens
        assert all(a.dtype == np.int32 for a in feed.values())
        self.feeds.append({k: v.copy() for k, v in feed.items()})
        return {"logits": self.ref.step(feed["token_ids"], feed["positions"], feed["slots"])}


def test_the_engine_runs_on_the_tensorrt_backend(synth_gguf, monkeypatch):
    """Decoder.start_backend("tensorrt", slots=3) over a stand-in plan: the engine serves 5 requests (3 slots, a queue,
    prompt chunks cut into plan-sized pieces beside decode rows) with the tokens the cpu backend's engine gives them;
    ids, slots and positions outside the plan are refused before any step runs; a plan with fewer slots than asked
    is refused with a one-line error naming `qtrt engine --slots`."""
    from conftest import TINY
    from toolchain.decoder import CpuBackend, Decoder
    from toolchain.engine import Engine, Params
    from toolchain.trt import runtime

    ctx = 256
    path = str(synth_gguf(**TINY))
    plans = []

    def plan(p, cache_shape=None):  # TensorRTRunner(plan, cache_shape) -> the stand-in
        assert cache_shape is None  # "stand-in.plan": no summary beside it, not a plan_name
        model = Decoder.open(path, ctx).model
        plans.append(_ReferencePlan(model, ctx, n_slots=3))
        return plans[-1]

    monkeypatch.setattr(runtime, "TensorRTRunner", plan)
    monkeypatch.setenv("QTRT_PLAN", "stand-in.plan")
    dec = Decoder.open(path, ctx)
    dec.start_backend("tensorrt", why="a stand-in plan", slots=3)
    assert dec.backend.name == "tensorrt" and dec.backend.n_slots == 3
    rng = np.random.default_rng()
    prompts = [[int(50 + i)] + list(map(int, rng.integers(0, TINY["vocab"], int(n))))
               for i, n in enumerate(rng.integers(3, 40, 5))]
    params = Params(max_tokens=6)
    eng = Engine(dec, slots=3, prefill_chunk=8, max_rows=16)  # steps larger than the plan's 5 tokens
    got = [h.ids for h in eng.generate_many(prompts, params)]
    eng.close()
    ref = Decoder.open(path, ctx)
    ref.backend = CpuBackend(ref.model, ctx, n_slots=3)
    eng = Engine(ref, slots=3, prefill_chunk=8)
    want = [h.ids for h in eng.generate_many(prompts, params)]
    eng.close()
    assert got == want
    feeds = plans[0].feeds
    assert {int(s) for f in feeds for s in f["slots"]} == {0, 1, 2}
    assert any(len(f["token_ids"]) == 5 for f in feeds)  # a chunk of 8 cut at the plan's 5
    n = len(feeds)
    for bad, why in ((([TINY["vocab"]], [0], [0]), "vocabulary"), (([1], [0], [3]), "slot 3"),
                     (([1], [ctx], [0]), f"position {ctx}"), (([1], [-1], [0]), "position -1")):
        with pytest.raises(UserError, match=why):
            dec.backend.step(*bad)
    assert len(feeds) == n  # nothing reached the plan

    monkeypatch.setattr(runtime, "TensorRTRunner", lambda p, cache_shape: _ReferencePlan(dec.model, ctx, n_slots=1))
    with pytest.raises(UserError, match=r"1 KV-cache slot\(s\), below --slots 3; rebuild with `qtrt engine --slots 3`"):
        Decoder.open(path, ctx).start_backend("tensorrt", why="a stand-in plan", slots=3)


def test_an_existing_plan_is_chosen_by_its_slots(tmp_path, monkeypatch):
    from toolchain.decoder import existing_plan, trt_cache_dir

    monkeypatch.delenv("QTRT_PLAN", raising=False)
    gguf = tmp_path / "m.gguf"
    d = trt_cache_dir(gguf)
    d.mkdir()
    assert existing_plan(gguf) is None
    (d / "model-ctx4096.plan").write_bytes(b"")
    assert existing_plan(gguf) == str(d / "model-ctx4096.plan") and existing_plan(gguf, 2) is None
    (d / "model-ctx4096-s8.plan").write_bytes(b"")
    assert existing_plan(gguf, 8) == existing_plan(gguf, 2) == str(d / "model-ctx4096-s8.plan")
    assert existing_plan(gguf, 9) is None


# --- the KV cache by address (issue 16, risk 2): prepare_onnx on a real export, the runner over a stand-in engine ---

@pytest.fixture(scope="module")
def tiny_export(synth_gguf, tmp_path_factory):
    """`qtrt export` of the small synthetic model (conftest TINY: 2 layers): (gguf path, model.onnx path)."""
    pytest.importorskip("gguf")
    from conftest import TINY
    from toolchain.export import export_model

    gguf = synth_gguf(**TINY)
    out = tmp_path_factory.mktemp("tiny-export") / "onnx"
    export_model(str(gguf), str(out), progress=False)
    return str(gguf), out / "model.onnx"


def _attrs(node):
    from toolchain.graph import node_attrs

    return node_attrs(node)


def test_prepare_onnx_passes_the_kv_cache_by_address(tiny_export):
    """Every attention node of a real export becomes rope_kv_attention_addr reading kv_addr.{layer} (INT64 [2], a
    graph input feeding exactly that node) with n_slots / max_seq_len as asked; no graph input or output is a cache;
    every other node, the node order and count, and every initializer (but the UINT8 -> INT8 retype) are unchanged;
    the graph is still wired (each node input produced before it); the facts say so."""
    import onnx

    from toolchain.trt.engine import prepare_onnx

    _, path = tiny_export
    before = onnx.load(str(path), load_external_data=False)
    model, facts = prepare_onnx(path, n_slots=3, max_context=48)
    g, old = model.graph, before.graph
    layers = [_attrs(n)["layer"] for n in old.node if n.op_type == R.ATTENTION_OP]
    assert layers == [0, 1] and len(g.node) == len(old.node)
    for a, b in zip(old.node, g.node):
        if a.op_type != R.ATTENTION_OP:
            assert a == b, a.name
            continue
        i = _attrs(a)["layer"]
        assert (b.op_type, b.domain, b.name) == (R.ATTENTION_ADDR_OP, a.domain, a.name)
        assert list(b.input) == [*a.input[:3], f"kv_addr.{i}", *a.input[5:]]
        assert list(b.output) == [a.output[0]]
        assert _attrs(b) == {**_attrs(a), "max_seq_len": 48, "n_slots": 3}
        assert set(_attrs(b)) - set(R.ROUTING_ATTRS) == set(dict(R.SCHEMAS[R.ATTENTION_ADDR_OP].attrs))
    cache = lambda name: name.startswith(R.CACHE_PREFIXES) or "cache_out" in name  # noqa: E731
    assert not [x.name for x in (*g.input, *g.output, *g.value_info) if cache(x.name)]
    assert [x.name for x in g.output] == [x.name for x in old.output if not cache(x.name)]
    assert [x for x in g.input if not x.name.startswith("kv_addr.")] == [x for x in old.input if not cache(x.name)]
    for i in layers:
        x = next(x for x in g.input if x.name == f"kv_addr.{i}")
        assert x.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_value for d in x.type.tensor_type.shape.dim] == [2]
        readers = [n for n in g.node if f"kv_addr.{i}" in n.input]
        assert len(readers) == 1 and readers[0].op_type == R.ATTENTION_ADDR_OP and _attrs(readers[0])["layer"] == i
    assert len([x for x in g.input if x.name.startswith("kv_addr.")]) == len(layers)
    assert len(g.initializer) == len(old.initializer)
    for a, b in zip(old.initializer, g.initializer):
        retyped = (a.data_type, b.data_type) == (onnx.TensorProto.UINT8, onnx.TensorProto.INT8)
        assert retyped or a.data_type == b.data_type, a.name
        b2 = onnx.TensorProto()
        b2.CopyFrom(b)
        b2.data_type = a.data_type
        assert a == b2, a.name
    known = {x.name for x in g.input} | {t.name for t in g.initializer}
    for n in g.node:
        assert set(n.input) <= known, (n.name, set(n.input) - known)
        known |= set(n.output)
    assert {x.name for x in g.output} <= known
    from conftest import TINY

    hd = TINY["hidden"] // TINY["n_heads"]
    assert facts["kv_cache"] == "by address" and facts["cache_shape"] == [3, TINY["n_kv_heads"], 48, hd]
    assert facts["plugins"][R.ATTENTION_ADDR_OP] == 2 and R.ATTENTION_OP not in facts["plugins"]
    assert set(facts["plugins"]) <= set(R.PLUGIN_OPS)
    # without max_context: the export's max_seq_len (the model's context)
    _, facts = prepare_onnx(path)
    assert facts["cache_shape"] == [1, TINY["n_kv_heads"], TINY["context_length"], hd]


@pytest.mark.parametrize("reader", ["k_cache.1", "L0.v_cache_out"])
def test_prepare_onnx_refuses_another_reader_of_a_cache(tiny_export, tmp_path, reader):
    """A cache read by anything but its attention node cannot leave the network: a one-line UserError naming it."""
    import onnx

    _, path = tiny_export
    model = onnx.load(str(path), load_external_data=False)
    model.graph.node.append(onnx.helper.make_node("Identity", [reader], ["peek"], name="peek"))
    (tmp_path / "weights.bin").symlink_to(path.parent / "weights.bin")
    onnx.save(model, str(tmp_path / "model.onnx"))
    from toolchain.trt.engine import prepare_onnx

    with pytest.raises(UserError, match=rf"{re.escape(reader)} \(node peek\)"):
        prepare_onnx(tmp_path / "model.onnx")


# A stand-in for TensorRT and the CUDA driver: "device" memory is host numpy memory at its real host address, so an
# address the runner writes into kv_addr.{i} finds the buffer it names. The stand-in engine runs the prepared graph
# (prepare_onnx's output) with the numpy reference ops; its attention reads the two cache addresses from kv_addr.{i}
# at run time, as the kernel does. A captured "graph" replays closures whose tensor addresses were fixed at capture.

_LIVE: dict[int, np.ndarray] = {}  # address -> the host bytes behind it


def _at(ptr, shape, dtype):
    """The array at device address `ptr` (a buffer's start); refuses to read past the buffer."""
    mem = _LIVE[int(ptr)]
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    assert n <= mem.nbytes, f"{n} bytes at {ptr:#x}: past the {mem.nbytes}-byte buffer"
    return mem[:n].view(dtype).reshape(shape)


class _FakeBuffer:
    """cr.DeviceBuffer's surface, in host memory."""

    def __init__(self, nbytes, shape=None, dtype=None):
        self.nbytes, self.shape, self.dtype = int(nbytes), shape, dtype
        self.mem = np.zeros(max(self.nbytes, 1), np.uint8)
        self.ptr = self.mem.ctypes.data
        _LIVE[self.ptr] = self.mem

    def upload(self, a, stream=None, offset=0, wait=True):
        a = np.ascontiguousarray(a)
        self.mem[offset:offset + a.nbytes] = a.reshape(-1).view(np.uint8)

    def download(self, shape=None, dtype=None, rows=None, stream=None):
        shape = tuple(shape) if rows is None else (rows, *shape[1:])
        return _at(self.ptr, shape, dtype).copy()

    def fill_u8(self, value, stream=None):
        self.mem[:] = value

    def free(self):
        _LIVE.pop(self.ptr, None)


class _FakeStream:
    def __init__(self):
        self.handle, self.recording = 7, None

    def synchronize(self):
        pass

    def enqueue(self, fn):
        (self.recording.append if self.recording is not None else lambda f: f())(fn)

    @contextlib.contextmanager
    def capture(self):
        graph = types.SimpleNamespace(ops=[])
        graph.launch = lambda stream: [fn() for fn in graph.ops]
        self.recording = graph.ops
        try:
            yield graph
        finally:
            self.recording = None


def _fake_cr(stream):
    import ctypes

    class Advance:  # decode_advance: token_ids <- next_token, positions += 1 (plugins/decode_advance.cu)
        def launch(self, cfg, args, s):
            nxt, tok, pos = args[0], args[-2], args[-1]  # fixed at launch, as a captured kernel's parameters
            s.enqueue(lambda: (np.copyto(_at(tok, (1,), np.int32), _at(nxt, (1,), np.int64), casting="unsafe"),
                               _at(pos, (1,), np.int32).__iadd__(1)))

    driver = types.SimpleNamespace(cuMemcpyHtoDAsync=lambda dst, src, n, s: ctypes.memmove(dst, src, n),
                                   cuMemcpyDtoHAsync=lambda dst, src, n, s: ctypes.memmove(dst, src, n),
                                   cuMemsetD8Async=lambda dst, v, n, s: ctypes.memset(dst, v, n))
    return types.SimpleNamespace(Stream=lambda: stream, DeviceBuffer=_FakeBuffer, load_op=lambda op: Advance(),
                                 driver=lambda: driver, check=lambda r, what: r)


class _StandInEngine:
    """ICudaEngine's surface over a prepared ONNX graph (TensorRT's network), with the profiles of
    shape_rules.profile_shapes; its contexts run the graph with the numpy reference ops."""

    def __init__(self, model, arrays, max_batch_tokens):
        from onnx import helper

        g = model.graph
        self.model, self.arrays = model, arrays
        self.io = {}
        for x, mode in [(x, "in") for x in g.input] + [(x, "out") for x in g.output]:
            t = x.type.tensor_type
            self.io[x.name] = (mode, np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)),
                               tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim))
        self.names = list(self.io)
        ins = {n: s for n, (mode, _, s) in self.io.items() if mode == "in"}
        self.profiles = R.profile_shapes(ins, max_batch_tokens)
        self.num_io_tensors, self.num_optimization_profiles = len(self.names), len(self.profiles)
        self.contexts = []

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, n):
        return self.io[n][0]

    def get_tensor_dtype(self, n):
        return self.io[n][1]

    def get_tensor_shape(self, n):
        return self.io[n][2]

    def get_tensor_profile_shape(self, n, p):
        return list(self.profiles[p][n])

    def create_execution_context(self):
        self.contexts.append(_StandInContext(self))
        return self.contexts[-1]


class _StandInContext:
    def __init__(self, engine):
        self.e, self.addr, self.shapes, self.runs = engine, {}, {}, 0

    def set_optimization_profile_async(self, p, stream):
        self.profile = p

    def set_input_shape(self, n, shape):
        self.shapes[n] = tuple(shape)

    def set_tensor_address(self, n, ptr):
        assert n in self.e.io, n  # only the plan's own tensors have addresses
        self.addr[n] = int(ptr)

    def get_tensor_shape(self, n):
        if n in self.shapes:
            return self.shapes[n]
        m = self.shapes["token_ids"][0]
        return tuple(m if d == -1 else d for d in self.e.io[n][2])

    def execute_async_v3(self, stream_handle):
        addr = dict(self.addr)  # fixed now: a captured launch keeps these addresses
        shapes = {n: self.get_tensor_shape(n) for n in self.e.names}
        self.runs += 1
        _STREAM.enqueue(lambda: self._run(addr, shapes))
        return True

    def _run(self, addr, shapes):
        from toolchain import ops
        from toolchain.runners import run_node

        env = dict(self.e.arrays)
        env.update({n: _at(addr[n], shapes[n], dt).copy() for n, (mode, dt, _) in self.e.io.items() if mode == "in"})
        for node in self.e.model.graph.node:
            ins, a = [env[i] for i in node.input], _attrs(node)
            if node.op_type == R.ATTENTION_ADDR_OP:  # the caches at the addresses in kv_addr.{i}, now
                q, k, v, words, pos, slots = ins
                cache = (a["n_slots"], a["n_kv_heads"], a["max_seq_len"], a["head_dim"])
                kc, vc = (_at(int(w), cache, np.float16) for w in words.view(np.uint64))
                outs = [ops.rope_kv_attention(q, k, v, kc, vc, pos, slots, n_heads=a["n_heads"],
                                              n_kv_heads=a["n_kv_heads"], head_dim=a["head_dim"],
                                              rope_theta=a["rope_theta"])[0]]
            else:
                outs = run_node(node.op_type, ins, a)
            env.update(zip(node.output, outs))
        for n, (mode, dt, _) in self.e.io.items():
            if mode == "out":
                _at(addr[n], shapes[n], dt)[...] = env[n]


_STREAM = _FakeStream()


@pytest.fixture
def stand_in_plan(tiny_export, tmp_path, monkeypatch):
    """plan(name, n_slots, max_context, max_batch_tokens) -> a plan file whose engine is the stand-in over
    prepare_onnx(tiny export); TensorRT and cuda_runtime replaced in toolchain.trt.runtime."""
    import onnx
    from onnx import numpy_helper

    from toolchain.trt import runtime
    from toolchain.trt.engine import prepare_onnx

    _, path = tiny_export
    full = onnx.load(str(path))
    arrays = {t.name: numpy_helper.to_array(t) for t in full.graph.initializer}  # the export's UINT8 bytes
    engines = {}

    def make(name="model.plan", n_slots=2, max_context=64, max_batch_tokens=8):
        model, _ = prepare_onnx(path, n_slots=n_slots, max_context=max_context)
        plan = tmp_path / name
        plan.write_bytes(b"stand-in")
        engines[plan.read_bytes()] = _StandInEngine(model, arrays, max_batch_tokens)
        return plan

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    trt = types.SimpleNamespace(
        __version__="stand-in", Logger=Logger, TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
        nptype=lambda d: d, Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=engines.get))
    cr = _fake_cr(_STREAM)
    monkeypatch.setattr(runtime, "import_tensorrt", lambda: trt)
    monkeypatch.setattr(toolchain, "cuda_runtime", cr, raising=False)
    monkeypatch.setitem(sys.modules, "toolchain.cuda_runtime", cr)
    yield make
    _STREAM.recording = None


def _reference_steps(tiny_export, n_slots, max_seq, steps):
    """Logits of each step (feeds of token_ids / positions / slots) by the ONNX contract: the export's graph with
    explicit caches (NumpyRunner), caches carried from step to step."""
    import onnx
    from onnx import numpy_helper

    from toolchain.decoder import Decoder
    from toolchain.runners import NumpyRunner, new_caches

    gguf, path = tiny_export
    full = onnx.load(str(path))
    runner = NumpyRunner(full, {t.name: numpy_helper.to_array(t) for t in full.graph.initializer})
    caches = new_caches(Decoder.open(gguf, max_seq).model.config, n_slots, max_seq)
    out = []
    for feed in steps:
        got = runner.infer({**{k: np.asarray(v, np.int32) for k, v in feed.items()}, **caches})
        caches = {f"{kind}_cache.{i}": got[f"L{i}.{kind}_cache_out"] for i in range(2) for kind in "kv"}
        out.append(got["logits"])
    return out, caches


def test_runner_owns_the_caches_and_passes_their_addresses(stand_in_plan, tiny_export):
    """TensorRTRunner over the stand-in plan: it allocates k_cache.{i} / v_cache.{i} itself at cache_shape (no plan
    tensor is a cache), writes their addresses into kv_addr.{i}; prefill and decode steps (the decode replayed from
    a captured graph) give the logits of the ONNX contract's numpy runner and leave the same caches; binding a
    caller's cache rewrites only that layer's address words and the captured graph stays and writes there."""
    from conftest import TINY
    from toolchain.trt.runtime import TensorRTRunner

    shape = (2, TINY["n_kv_heads"], 64, TINY["hidden"] // TINY["n_heads"])
    r = TensorRTRunner(stand_in_plan(), cache_shape=shape)
    assert r.caches == ["k_cache.0", "v_cache.0", "k_cache.1", "v_cache.1"]
    assert not [n for n in r.names if n.startswith(R.CACHE_PREFIXES)] and (r.n_slots, r.max_context) == (2, 64)
    for i in range(2):
        k, v = r.buf[f"k_cache.{i}"], r.buf[f"v_cache.{i}"]
        assert k in r._owned and v in r._owned and r.read(f"k_cache.{i}").shape == shape
        assert r.read(f"kv_addr.{i}").tolist() == [k.ptr, v.ptr]
        assert all(c.addr[f"kv_addr.{i}"] == r.buf[f"kv_addr.{i}"].ptr for c in r.contexts)

    rng = np.random.default_rng(3)
    steps = [{"token_ids": rng.integers(0, TINY["vocab"], 6), "positions": np.arange(6), "slots": np.full(6, 1)}]
    steps += [{"token_ids": [int(rng.integers(0, TINY["vocab"]))], "positions": [p], "slots": [1]} for p in (6, 7, 8)]
    want, caches = _reference_steps(tiny_export, 2, 64, steps)
    for feed, ref in zip(steps, want):
        got = r.infer({k: np.asarray(v, np.int32) for k, v in feed.items()}, outputs=["logits"])["logits"]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the first decode step ran plainly and was captured; the other two were replays of the graph
    assert r.graph is not None and r.contexts[r.decode].runs == 2
    for name, c in caches.items():
        np.testing.assert_allclose(r.read(name).astype(np.float32), c.astype(np.float32), atol=1e-3)
    assert not r.read("k_cache.0")[0].any() and r.read("k_cache.0")[1, :, :9].any()

    # bind a caller's cache for layer 1 (a copy of the runner's): only kv_addr.1 changes, the graph stays
    old = {n: r.buf[n].ptr for n in r.caches}
    mine = _FakeBuffer(r.buf["k_cache.1"].nbytes)
    mine.upload(r.read("k_cache.1"))
    before = r.read("k_cache.1")
    graph = r.graph
    tok = r.read("next_token", rows=1).reshape(-1)  # replay_decode goes on from the device's token and position
    r.infer({"k_cache.1": mine, "token_ids": tok.astype(np.int32), "positions": np.array([9], np.int32),
             "slots": np.array([1], np.int32)}, outputs=["logits"])
    assert r.graph is graph and r.buf["k_cache.1"].ptr == mine.ptr
    assert r.read("kv_addr.1").tolist() == [mine.ptr, old["v_cache.1"]]
    assert r.read("kv_addr.0").tolist() == [old["k_cache.0"], old["v_cache.0"]]
    assert _at(mine.ptr, shape, np.float16)[1, :, 9].any()  # the replayed step wrote the caller's cache
    np.testing.assert_array_equal(_at(old["k_cache.1"], shape, np.float16), before)  # and not the old one
    with pytest.raises(ValueError, match="v_cache.0: a device buffer of"):
        r.infer({"v_cache.0": _FakeBuffer(mine.nbytes - 2), "token_ids": np.ones(1, np.int32),
                 "positions": np.ones(1, np.int32), "slots": np.ones(1, np.int32)})
    r.zero_caches()
    assert not _at(mine.ptr, shape, np.float16).any() and not r.read("v_cache.0").any()
    r.close()


def test_runner_refuses_unknown_cache_shapes_and_old_plans(stand_in_plan, tmp_path):
    """A plan taking caches by address with no cache_shape (and no summary beside it or plan_name) is a clear
    error; plan_cache_shape reads build_engine's summary when it describes the plan, else the plan's name."""
    from toolchain.trt.engine import plan_info_path
    from toolchain.trt.runtime import TensorRTRunner, plan_cache_shape

    plan = stand_in_plan("x.plan")
    with pytest.raises(UserError, match="shape is unknown"):
        TensorRTRunner(plan)
    cfg = types.SimpleNamespace(n_kv_heads=2, head_dim=64)
    assert plan_cache_shape(plan, cfg) is None
    plan_info_path(plan).write_text(f'{{"cache_shape": [3, 2, 32, 64], "plan_bytes": {plan.stat().st_size}}}')
    assert plan_cache_shape(plan) == (3, 2, 32, 64)
    assert TensorRTRunner(plan).buf["v_cache.1"].shape == (3, 2, 32, 64)
    plan_info_path(plan).write_text('{"cache_shape": [3, 2, 32, 64], "plan_bytes": 1}')  # another plan's
    assert plan_cache_shape(plan) is None
    assert plan_cache_shape(tmp_path / "model-ctx4096-s8.plan", cfg) == (8, 2, 4096, 64)
    assert plan_cache_shape(tmp_path / "model-ctx512.plan", cfg) == (1, 2, 512, 64)


def test_tensorrt_backend_over_the_stand_in_runner(stand_in_plan, tiny_export):
    """TensorRTBackend with a plan named as the backend names its builds (model-ctx64-s2.plan): the runner's caches
    get the plan's shape from the model and the name; forward in plan-sized pieces and greedy (replayed graph, the
    stand-in decode_advance) give the ONNX contract's logits and tokens."""
    from conftest import TINY
    from toolchain.decoder import Decoder
    from toolchain.trt.runtime import TensorRTBackend

    gguf, _ = tiny_export
    plan = stand_in_plan("model-ctx64-s2.plan", n_slots=2, max_context=64, max_batch_tokens=4)
    model = Decoder.open(gguf, 64).model
    b = TensorRTBackend(model, 48, plan=str(plan), n_slots=2)
    assert b.runner.buf["k_cache.0"].shape == (2, TINY["n_kv_heads"], 64, TINY["hidden"] // TINY["n_heads"])
    assert (b.n_slots, b.runner.max_context) == (2, 64)
    prompt = [5, 77, 300, 9, 12, 1000, 44]  # two plan steps: 4 + 3
    steps = [{"token_ids": prompt[:4], "positions": range(4), "slots": [0] * 4},
             {"token_ids": prompt[4:], "positions": range(4, 7), "slots": [0] * 3}]
    want, _ = _reference_steps(tiny_export, 2, 64, steps)
    np.testing.assert_allclose(b.forward(prompt), want[-1][-1], rtol=1e-5, atol=1e-5)
    first = int(np.argmax(want[-1][-1]))
    tokens = list(b.greedy(first, 4))
    ref_tokens, feed, pos = [], [first], 7
    while len(ref_tokens) < 4:
        steps.append({"token_ids": feed, "positions": [pos], "slots": [0]})
        logits, _ = _reference_steps(tiny_export, 2, 64, steps)
        feed, pos = [int(np.argmax(logits[-1][-1]))], pos + 1
        ref_tokens.append(feed[0])
    assert tokens == ref_tokens
    with pytest.raises(UserError, match="built for a context of 64"):
        TensorRTBackend(model, 128, plan=str(plan), n_slots=2)
