"""The TensorRT layer without TensorRT: shape rules, launch parameters (ints and symbolic), plugin signatures against
the op table, the ONNX preparation, and the CLI's answer when TensorRT is missing."""
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
    """toolchain.graph.CUSTOM_OPS is what the exporter writes: same ops, inputs, outputs, attribute names and types."""
    graph = pytest.importorskip("toolchain.graph")
    import onnx

    A = onnx.defs.OpSchema.AttrType
    assert set(R.CUSTOM_OPS) <= set(graph.CUSTOM_OPS)
    assert graph.PLUGIN_NAMESPACE == R.NAMESPACE and set(graph.PARSER_ATTRS) <= set(R.ROUTING_ATTRS)
    for op in R.CUSTOM_OPS:
        (ins, outs, attrs), s = graph.CUSTOM_OPS[op], R.SCHEMAS[op]
        assert [n for n, _ in ins] == list(s.inputs) and [n for n, _ in outs] == list(s.outputs), op
        assert {n: {A.INT: int, A.FLOAT: float}[t] for n, t in attrs.items()} == dict(s.attrs), op


def test_cache_outputs_map_to_their_inputs():
    from toolchain.trt.runtime import aliased_input_by_name

    inputs = ["token_ids", "k_cache.0", "v_cache.0", "k_cache.11", "v_cache.11"]
    assert aliased_input_by_name("L11.k_cache_out", inputs) == "k_cache.11"
    assert aliased_input_by_name("L0.v_cache_out", inputs) == "v_cache.0"
    assert aliased_input_by_name("v_cache_out.11", inputs) == "v_cache.11"
    assert aliased_input_by_name("L3.k_cache_out", inputs) is None
    assert aliased_input_by_name("logits", inputs) is None
    graph = pytest.importorskip("toolchain.graph")
    if hasattr(graph, "cache_output_name"):
        assert aliased_input_by_name(graph.cache_output_name(11, "k"), inputs) == "k_cache.11"


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

    def launch_config(op, dims, ops):
        rec["launch"].append((op, dims))
        m = dims["m"]
        return types.SimpleNamespace(grid=(ops.cdiv(m, 4), 2, np.int64(1)), block=(128, 1, 1), shared_mem=0,
                                     scalars=(m, np.int32(7)))

    def compile_kernel(op, defines={}, fmt="ptx", arch="sm_90"):
        rec["compile"].append((op, defines, fmt, arch))
        return b"// ptx"

    kernels.__dict__.update(launch_config=launch_config, compile_kernel=compile_kernel,
                            kernel_name=lambda op: f"qtrt_{op}", defines_for=lambda op, attrs: dict(sorted(
                                (k.upper(), v) for k, v in attrs.items() if k != "layer")))
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
    assert sorted(ids) == sorted(f"qtrt::{op}" for op in R.CUSTOM_OPS)
    assert plugins.register_all() == ids  # idempotent
    table = _docs_table()
    for op in R.CUSTOM_OPS:
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


@pytest.mark.parametrize("op", R.CUSTOM_OPS)
def test_plugin_description_and_aot_impl(fake_trt, op):
    plugins.register_all()
    shapes, attrs, expected = _int_case(op, 5)
    m = Sym.var("m")
    descs = [_FakeDesc(tuple(m if j == 0 and i in _m_inputs(op) else d for j, d in enumerate(s)), "x")
             for i, s in enumerate(shapes)]
    out = fake_trt["register"][f"qtrt::{op}"](*descs, **attrs)
    out = out if isinstance(out, tuple) else (out,)
    s = R.SCHEMAS[op]
    for i, d in enumerate(out):
        if i in s.alias_of:
            assert d.get_aliased() is descs[s.alias_of[i]]
        else:
            assert d.dtype == "float32" and d.get_aliased() is None
        assert tuple(_ev(v, m=5) for v in d.shape_expr) == expected[i]

    # aot_impl is called positionally with every attribute (get_launch_params in _plugin_class.py)
    name, ptx, params, extra = fake_trt["aot"][f"qtrt::{op}"](*descs, *attrs.values(), out, 0)
    assert (name, ptx) == (f"qtrt_{op}", b"// ptx")
    assert fake_trt["compile"][-1][2:] == ("ptx", "sm_90")
    assert all(type(v).__name__ == "SymInt32" for v in extra.items)  # not bare SymIntExpr
    assert [_ev(v.v, m=9) for v in extra.items] == [9, 7]
    assert all(type(params.__dict__[f]).__name__ == "SymInt32" for f in ("grid_x", "block_x", "shared_mem"))
    assert _ev(params.grid_x.v, m=9) == 3 and params.grid_z.v == 1
    op_dims = fake_trt["launch"][-1][1]
    assert _ev(op_dims["m"], m=9) == 9


def test_one_ptx_per_attribute_set(fake_trt):
    """Layers differ only in `layer`, which the kernels ignore: all layers share one compile."""
    plugins.register_all()
    shapes, attrs, _ = _int_case(R.ATTENTION_OP, 1)
    descs = [_FakeDesc(s, "x") for s in shapes]
    for layer in range(4):
        a = dict(attrs, layer=layer)
        fake_trt["aot"]["qtrt::rope_kv_attention"](*descs, *a.values(), (), 0)
    assert len(fake_trt["compile"]) == 1


# --- optimization profiles --------------------------------------------------------------------------------------

def test_profiles_decode_and_prefill():
    inputs = {"token_ids": (-1,), "positions": (-1,), "slots": (-1,), "k_cache.0": (-1, 2, -1, 128),
              "v_cache.0": (1, 2, 4096, 128)}
    dec, pre = R.profile_shapes(inputs, max_context=4096, max_batch_tokens=512)
    assert dec["token_ids"] == ((1,), (1,), (1,))
    assert pre["positions"] == ((1,), (128,), (512,))
    assert dec["k_cache.0"] == pre["k_cache.0"] == ((1, 2, 4096, 128),) * 3
    assert "v_cache.0" not in dec  # static: no profile entry
    assert len(R.profile_shapes(inputs, 64, 1)) == 1
    with pytest.raises(ValueError, match="weird"):
        R.profile_shapes({"weird": (-1, 3)}, 64, 8)


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
    from toolchain.kernels import GEMM_OPS, MODEL_ATTRS, launch_config

    assert not set(R.CUSTOM_OPS) & set(GEMM_OPS)
    model = MODEL_ATTRS[0]
    for op in R.CUSTOM_OPS:
        for m in (1, 128, 512):
            if op in R.MATMUL_OPS:
                dims = {"m": m, "k": model["hidden"], "n": model["ffn"]}
            elif op in R.GATHER_OPS:
                dims = {"m": m, "hidden": model["hidden"]}
            elif op == R.ATTENTION_OP:
                dims = {"m": m, "n_heads": model["n_heads"], "n_slots": 1, "max_seq": 4096}
            else:
                dims = {"m": m, "numel": m * model["ffn"]}
            assert launch_config(op, dims).shared_mem == 0, (op, m)


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

    def plan(p):  # TensorRTRunner(plan) -> the stand-in
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

    monkeypatch.setattr(runtime, "TensorRTRunner", lambda p: _ReferencePlan(dec.model, ctx, n_slots=1))
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
