"""Our TensorRT plugins (toolchain/trt/plugins.py) through the REAL QDP module of TensorRT 11.4 (issue 16, "Proof"):
the unmodified `tensorrt_bindings/plugin/*.py` of the `tensorrt-cu13-bindings==11.4.0.106` wheel, with only the
compiled `tensorrt` module replaced by a stub.

Where the real code comes from
    The `dev` extra installs the wheel on linux x86_64 (wheels exist for CPython 3.10-3.14 there, all with identical
    plugin/*.py; none for aarch64). It holds tensorrt_bindings/__init__.py, tensorrt.so and plugin/*.py. Its
    __init__.py loads tensorrt.so, which needs libnvinfer (absent here), so it is never executed: the package
    directory is found with importlib.util.find_spec, which does not run it. Without the wheel every test skips.

The layout reproduced is the real one
    In an install of TensorRT 11.4, `tensorrt` is the `tensorrt-cu13` front-end package (PyPI sdist 11.4.0.106):
    tensorrt/__init__.py is `from tensorrt_bindings import *` (the compiled names), and tensorrt/plugin/__init__.py
    is `from tensorrt_bindings.plugin import *`; the plugin code itself lives in `tensorrt_bindings.plugin.*` and
    does `import tensorrt as trt`. Here, for the duration of one test (the fixture `qdp`, which takes every
    `tensorrt`/`tensorrt_bindings` module out of sys.modules and puts the previous ones back afterwards):
    - `tensorrt_bindings`: an empty package whose __path__ is the installed directory (its __init__.py not run);
    - `tensorrt_bindings.plugin` and its 8 submodules: the wheel's files, executed unmodified under their real names;
    - `tensorrt.plugin`: the front-end's one line, `from tensorrt_bindings.plugin import *`;
    - `tensorrt`: the stub below, standing in for the compiled names.

What was stubbed: the module `tensorrt`, holding exactly these names (test_the_stub_holds_exactly_what_is_used
checks that every one of them is read by the real plugin module or plugins.py, and nothing else exists):
    Logger (Logger.WARNING, log())                 plugin/__init__.py logs "experimental" at import
    QuickPluginCreationRequest (UNKNOWN, PREFER_JIT, PREFER_AOT, STRICT_JIT, STRICT_AOT)
                                                   its presence is _export.IS_AOT_ENABLED; create_plugin compares
    DataType (FLOAT, INT8, INT32, INT64), float32  annotations; plugins.describe's output dtype (getattr(trt, ...))
    PluginFieldType (INT8, INT16, INT32, INT64, FLOAT16, FLOAT32, FLOAT64)   _utils.py's tables at import
    TensorFormat (LINEAR)                          annotations; the default format combination
    DimensionOperation (SUM PROD MAX MIN SUB EQUAL LESS FLOOR_DIV CEIL_DIV)   ShapeExpr arithmetic, cdiv/max/min
    IDimensionExpr (is_constant(), get_constant_value())   a dim expression; here a constant or a function of m
    Dims (MAX_DIMS = 8 only)                       ShapeExprs' rank check
    DimsExprs(n)                                   get_output_shapes' result (refuses anything but IDimensionExpr)
    PluginTensorDesc, DynamicPluginTensorDesc      attribute holders (dims, type, format, scale; desc, min/opt/max)
    ISymExpr, PluginArgType (INT), PluginArgDataType (INT8, INT16, INT32)    SymExprImpl, the scalars' carrier
    IPluginV3, IPluginV3QuickCore, IPluginV3QuickBuild, IPluginV3QuickRuntime, IPluginV3QuickAOTBuild,
    IPluginCreatorV3Quick                          empty base classes of the plugin and creator templates
    ITensor                                        an annotation in _lib.py (PluginDef.__call__)
    PluginField, PluginFieldCollection             (name, data, type) records and a list of them
    get_plugin_registry()                          a registry with register_creator / get_creator
    Builder                                        read only by toolchain.trt.import_tensorrt (hasattr check)
The objects TensorRT hands the plugin at build time are test stand-ins too: the IExprBuilder (constant(),
operation(), folding constants as TensorRT does), the launch-parameter and scalar sinks of get_launch_params, and
the plugin fields the ONNX parser would build (ONNX INT -> INT32 field, FLOAT -> FLOAT32, in the creator's
field order, which is the order onnx-tensorrt's loadFields walks).

Also replaced: `plugins.ptx_for` returns a fake PTX naming the kernel's entry (no nvcc needed), after checking
that kernels.defines_for accepts the attributes exactly as the plugin received them. The real PTX's parameter list
is checked in tests/test_trt_pure.py (test_ptx_entry_follows_the_aot_calling_convention).

What this proves: the real `register`/`aot_impl` decorators accept our signatures (_validate.py); registration
creates one creator per plugin with the attribute fields the parser fills; the real creator makes an AOT plugin
from parser-style fields; the real _TemplateAOTPlugin runs our description (output dtypes, no aliasing, output
shape expressions) and our aot_impl (all attributes positionally, real TensorDesc/ShapeExpr inputs, kernel name,
launch parameters and SymInt32 scalars) the way TensorRT's builder drives it, and the results evaluate to
shape_rules.output_shapes and kernels.launch_config for several m. What it cannot: anything inside tensorrt.so or
libnvinfer (the registry's and the builder's C++ side, PTX loading, the launch itself), see docs/tensorrt.md.
"""
import enum
import importlib
import importlib.util
import operator
import re
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest

from toolchain import kernels
from toolchain.ops import TYPE_OF_OP
from toolchain.quants import BLOCK
from toolchain.trt import plugins
from toolchain.trt import shape_rules as R

WHEEL = "tensorrt-cu13-bindings==11.4.0.106"
WHEEL_VERSION = "11.4.0.106"
PREFIXES = ("tensorrt", "tensorrt_bindings")  # the module trees this file takes over for a test
M_VALUES = (1, 2, 17, 512)  # the step's token count m, the one dynamic dim


def _bindings_dir():
    """(directory of the installed tensorrt_bindings, None) or (None, why not), without importing the package."""
    spec = importlib.util.find_spec("tensorrt_bindings")  # locates the package; runs nothing of it
    if spec is None or not spec.submodule_search_locations:
        return None, f"{WHEEL} is not installed (pip install -e '.[dev]' on linux x86_64, or pip install --no-deps {WHEEL})"
    root = Path(list(spec.submodule_search_locations)[0])
    m = re.search(r'^__version__ = "([^"]+)"', (root / "__init__.py").read_text(), re.M)
    version = m.group(1) if m else "?"
    if version != WHEEL_VERSION:
        return None, f"tensorrt_bindings {version} is installed; this stub is written for {WHEEL}"
    if not (root / "plugin" / "_lib.py").is_file():
        return None, f"{root} has no plugin/_lib.py"
    return root, None


# --- the stub `tensorrt` ------------------------------------------------------------------------------------------

DataType = enum.Enum("DataType", "FLOAT INT8 INT32 INT64")
TensorFormat = enum.Enum("TensorFormat", "LINEAR")
DimensionOperation = enum.Enum("DimensionOperation", "SUM PROD MAX MIN SUB EQUAL LESS FLOOR_DIV CEIL_DIV")
PluginFieldType = enum.Enum("PluginFieldType", "INT8 INT16 INT32 INT64 FLOAT16 FLOAT32 FLOAT64")
QuickPluginCreationRequest = enum.Enum("QuickPluginCreationRequest",
                                       "UNKNOWN PREFER_JIT PREFER_AOT STRICT_JIT STRICT_AOT")
PluginArgType = enum.Enum("PluginArgType", "INT")
PluginArgDataType = enum.Enum("PluginArgDataType", "INT8 INT16 INT32")

_EVAL = {"SUM": operator.add, "PROD": operator.mul, "MAX": max, "MIN": min, "SUB": operator.sub,
         "EQUAL": lambda a, b: int(a == b), "LESS": lambda a, b: int(a < b), "FLOOR_DIV": operator.floordiv,
         "CEIL_DIV": lambda a, b: -(-a // b)}


class IDimensionExpr:
    """A dim expression: a build-time constant, or a function of the dynamic dim m (evaluated with ev(m))."""

    def __init__(self, f, text, const=None):
        self._f, self._text, self._const = f, text, const

    @classmethod
    def constant(cls, v):
        assert isinstance(v, int) and not isinstance(v, bool), repr(v)
        return cls(lambda m: v, str(v), v)

    def is_constant(self):
        return self._const is not None

    def get_constant_value(self):
        if self._const is None:
            raise RuntimeError(f"{self._text} is not a constant")
        return self._const

    def ev(self, m):
        return self._f(m)

    def __repr__(self):
        return f"IDimensionExpr({self._text})"


M = IDimensionExpr(lambda m: m, "m")


class ExprBuilder:
    """The IExprBuilder TensorRT passes to get_output_shapes / get_launch_params: constant() and operation(), which
    folds constants (a shape computed from constants is a constant)."""

    def constant(self, v):
        return IDimensionExpr.constant(v)

    def operation(self, op, a, b):
        assert isinstance(op, DimensionOperation), repr(op)
        assert isinstance(a, IDimensionExpr) and isinstance(b, IDimensionExpr), (op, a, b)
        fn = _EVAL[op.name]
        if a.is_constant() and b.is_constant():
            return IDimensionExpr.constant(fn(a.get_constant_value(), b.get_constant_value()))
        return IDimensionExpr(lambda m: fn(a.ev(m), b.ev(m)), f"{op.name}({a._text}, {b._text})")


class DimsExprs(list):
    def __init__(self, n):
        super().__init__([None] * n)

    def __setitem__(self, i, v):  # the binding takes IDimensionExpr only
        assert isinstance(v, IDimensionExpr), f"DimsExprs[{i}] = {v!r}"
        super().__setitem__(i, v)


class Dims:
    MAX_DIMS = 8


class PluginTensorDesc:
    def __init__(self, dims=(), type=None, format=None, scale=1.0):
        self.dims, self.type, self.format, self.scale = dims, type, format, scale


class DynamicPluginTensorDesc:
    def __init__(self, desc, min=(), opt=(), max=()):
        self.desc, self.min, self.opt, self.max = desc, min, opt, max


class PluginField:
    def __init__(self, name, data=None, type=None):
        self.name, self.data, self.type = name, data, type


class PluginFieldCollection(list):
    pass


class Logger:
    WARNING = "WARNING"

    def log(self, severity, msg):
        pass


class PluginRegistry:
    def __init__(self):
        self.creators = {}

    def register_creator(self, creator, namespace):
        key = (creator.name, creator.plugin_version, namespace)
        if key in self.creators:
            return False
        self.creators[key] = creator
        return True

    def get_creator(self, name, version, namespace):
        return self.creators.get((name, version, namespace))


def _base(name):
    return type(name, (), {"__init__": lambda self: None})


def _stub_names(registry) -> dict:
    return dict(
        Logger=Logger, QuickPluginCreationRequest=QuickPluginCreationRequest, DataType=DataType,
        float32=DataType.FLOAT, PluginFieldType=PluginFieldType, TensorFormat=TensorFormat,
        DimensionOperation=DimensionOperation, IDimensionExpr=IDimensionExpr, Dims=Dims, DimsExprs=DimsExprs,
        PluginTensorDesc=PluginTensorDesc, DynamicPluginTensorDesc=DynamicPluginTensorDesc,
        ISymExpr=_base("ISymExpr"), PluginArgType=PluginArgType, PluginArgDataType=PluginArgDataType,
        **{n: _base(n) for n in ("IPluginV3", "IPluginV3QuickCore", "IPluginV3QuickBuild", "IPluginV3QuickRuntime",
                                 "IPluginV3QuickAOTBuild", "IPluginCreatorV3Quick", "ITensor")},
        PluginField=PluginField, PluginFieldCollection=PluginFieldCollection,
        get_plugin_registry=lambda: registry, Builder=_base("Builder"),
    )


STUBBED = tuple(_stub_names(None))


class TrtStub(types.ModuleType):
    """`tensorrt` with only the stub's names; records which ones are read (`_touched`)."""

    def __getattribute__(self, name):
        if not name.startswith("_"):
            object.__getattribute__(self, "_touched").add(name)
        return super().__getattribute__(name)


def _ours(name):
    return name in PREFIXES or name.startswith(tuple(p + "." for p in PREFIXES))


@pytest.fixture
def qdp(monkeypatch):
    """The real tensorrt_bindings.plugin over the stub, as `tensorrt.plugin`; sys.modules restored afterwards."""
    root, why = _bindings_dir()
    if root is None:
        pytest.skip(why)
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if _ours(k)}
    try:
        registry = PluginRegistry()
        trt = TrtStub("tensorrt")
        trt._touched = set()
        trt.__dict__.update(_stub_names(registry))
        sys.modules["tensorrt"] = trt
        shell = types.ModuleType("tensorrt_bindings")
        shell.__path__ = [str(root)]  # finds the real plugin/ without running the real __init__.py
        sys.modules["tensorrt_bindings"] = shell
        real = importlib.import_module("tensorrt_bindings.plugin")
        assert Path(real.__file__).parent == root / "plugin"
        trtp = types.ModuleType("tensorrt.plugin")
        exec("from tensorrt_bindings.plugin import *", trtp.__dict__)  # the front-end's tensorrt/plugin/__init__.py
        sys.modules["tensorrt.plugin"] = trt.plugin = trtp

        ptx_calls = []

        def ptx_for(op, attrs):
            kernels.defines_for(op, attrs, clusters=False)  # what the real ptx_for does with them first
            ptx_calls.append((op, dict(attrs)))
            return f"// fake PTX\n.visible .entry {kernels.kernel_name(op)}(\n)\n{{\n}}\n".encode()

        monkeypatch.setattr(plugins, "ptx_for", ptx_for)
        monkeypatch.setattr(plugins, "_REGISTERED", [])
        yield types.SimpleNamespace(
            trt=trt, trtp=trtp, registry=registry, ptx_calls=ptx_calls,
            lib=sys.modules["tensorrt_bindings.plugin._lib"],
            tensor=sys.modules["tensorrt_bindings.plugin._tensor"],
            plugin_class=sys.modules["tensorrt_bindings.plugin._plugin_class"])
    finally:
        for k in [k for k in sys.modules if _ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


# --- cases ----------------------------------------------------------------------------------------------------------

ATTRS = dict(in_features=1536, out_features=256, hidden=1536, n_heads=12, n_kv_heads=2, head_dim=128,
             rope_theta=1e6, layer=3, max_seq_len=4096, n_slots=2)  # Qwen2.5 1.5B's geometry
VOCAB, FFN = 151936, 8960
DTYPES = {"w": DataType.INT8, "ids": DataType.INT32, "positions": DataType.INT32, "slots": DataType.INT32,
          "cache_addr": DataType.INT64}  # weights retyped to INT8 by engine.prepare_onnx; the rest float32
OUT_DTYPES = {"float32": DataType.FLOAT}  # shape_rules' output dtype names -> the stub's DataType


def _row_bytes(op, n):
    elems, nbytes = BLOCK[TYPE_OF_OP[op]]
    return n // elems * nbytes


def _case(op):
    """(attrs, input shapes with "m" for the dynamic dim, input dtypes), built from the op's schema."""
    s = R.SCHEMAS[op]
    attrs = {name: ATTRS[name] for name, _ in s.attrs}
    assert all(type(attrs[n]) is t for n, t in s.attrs), s.attrs
    a = attrs
    shape = {
        "x": ("m", a.get("in_features")), "bias": (a.get("out_features"),), "ids": ("m",),
        "q": ("m", a.get("n_heads", 0) * a.get("head_dim", 0)), "k": ("m", a.get("n_kv_heads", 0) * a.get("head_dim", 0)),
        "cache_addr": (2,), "positions": ("m",), "slots": ("m",), "gate": ("m", FFN), "up": ("m", FFN),
    }
    shape["v"] = shape["k"]
    shape["w"] = ((a["out_features"], _row_bytes(op, a["in_features"])) if "in_features" in a else
                  (VOCAB, _row_bytes(op, a["hidden"])) if "hidden" in a else None)
    missing = [n for n in s.inputs if shape.get(n) is None or None in shape[n]]
    assert not missing, f"{op}: no test shape for inputs {missing}; add them to _case"
    shapes = [shape[n] for n in s.inputs]
    R.check_shapes(op, _at(shapes, 3), attrs)  # the case is one the op accepts
    return attrs, shapes, [DTYPES.get(n, DataType.FLOAT) for n in s.inputs]


def _at(shapes, m):
    return [tuple(m if d == "m" else d for d in s) for s in shapes]


def _dims_exprs(shape):
    e = DimsExprs(len(shape))
    for j, d in enumerate(shape):
        e[j] = M if d == "m" else IDimensionExpr.constant(d)
    return e


def _parser_fields(creator, attrs):
    """The PluginFieldCollection onnx-tensorrt builds: the creator's field names, in its order, from the node's
    attributes (ONNX INT -> INT32, FLOAT -> FLOAT32)."""
    out = []
    for f in creator.field_names:
        v = attrs[f.name]
        if isinstance(v, float):
            out.append(PluginField(f.name, np.array([v], np.float32), PluginFieldType.FLOAT32))
        else:
            out.append(PluginField(f.name, np.array([v], np.int32), PluginFieldType.INT32))
    return PluginFieldCollection(out)


class LaunchSink:
    """get_launch_params' `launchParams`: takes the 7 fields, each an ISymExpr (SymInt32()())."""
    FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

    def __setattr__(self, k, v):
        assert k in self.FIELDS, k
        object.__setattr__(self, k, v)


class ScalarSink:
    """get_launch_params' `symExprSetter`: nbSymExprs, then one ISymExpr per index."""

    def __init__(self):
        self.nbSymExprs, self.items = 0, {}

    def __setitem__(self, i, v):
        assert 0 <= i < self.nbSymExprs, (i, self.nbSymExprs)
        self.items[i] = v


def _value(sym, q, m):
    """An ISymExpr the real SymExprImpl made: int32, carrying an IDimensionExpr; its value at m."""
    assert isinstance(sym, q.tensor.SymExprImpl), repr(sym)
    assert (sym.type, sym.dtype) == (PluginArgType.INT, PluginArgDataType.INT32), (sym.type, sym.dtype)
    assert isinstance(sym.expr, IDimensionExpr), f"not a dim expression: {sym.expr!r}"
    return sym.expr.ev(m)


def _build_like_tensorrt(q, op):
    """Drive the real creator and _TemplateAOTPlugin for qtrt::<op> as TensorRT's parser and builder do, checking
    each answer; returns the plugin."""
    attrs, shapes, in_types = _case(op)
    s = R.SCHEMAS[op]
    creator = q.registry.get_creator(op, "1", R.NAMESPACE)
    assert creator is not None, f"no creator {R.NAMESPACE}::{op} in the registry"

    # parser: createPlugin(name, namespace, fields, phase, request); the network prefers AOT plugins
    plg = creator.create_plugin(op, R.NAMESPACE, _parser_fields(creator, attrs), "TensorRTPhase.BUILD (unused)",
                                QuickPluginCreationRequest.PREFER_AOT)
    assert isinstance(plg, q.plugin_class._TemplateAOTPlugin)
    assert plg.attrs == attrs and all(type(plg.attrs[k]) is type(v) for k, v in attrs.items())
    assert plg.get_num_outputs() == len(s.outputs)

    # output types (fake shapes), aliasing
    out_types = plg.get_output_data_types(in_types, [len(x) for x in shapes])
    assert out_types == [OUT_DTYPES[t] for t in s.output_dtypes], (op, out_types)
    assert [plg.get_aliased_input(i) for i in range(len(s.outputs))] == [-1] * len(s.outputs)  # issue 16, risk 2

    # output shapes: real TensorDescs of ShapeExprs over the builder's dim expressions
    out_exprs = plg.get_output_shapes([_dims_exprs(x) for x in shapes], [], ExprBuilder())
    assert len(out_exprs) == len(s.outputs)
    for m in M_VALUES:
        got = [tuple(e.ev(m) for e in exprs) for exprs in out_exprs]
        assert got == [tuple(x) for x in R.output_shapes(op, _at(shapes, m), attrs)], (op, m)

    # formats: no autotune function, so one combination (the declared types, LINEAR) and the default tactic
    dyn = [DynamicPluginTensorDesc(PluginTensorDesc(tuple(-1 if d == "m" else d for d in x), t, TensorFormat.LINEAR),
                                   _at([x], 1)[0], _at([x], 128)[0], _at([x], 512)[0])
           for x, t in zip(shapes, in_types)]
    out_shapes = R.output_shapes(op, [tuple(-1 if d == "m" else d for d in x) for x in shapes], attrs)
    dyn += [DynamicPluginTensorDesc(PluginTensorDesc(tuple(x), t, TensorFormat.LINEAR))
            for x, t in zip(out_shapes, out_types)]
    combos = plg.get_supported_format_combinations(dyn, len(shapes))
    assert [(c.type, c.format) for c in combos] == [(t, TensorFormat.LINEAR) for t in in_types + out_types]
    plg.configure_plugin(dyn[:len(shapes)], dyn[len(shapes):])
    assert plg.get_valid_tactics() == []
    plg.set_tactic(0)

    # launch: our aot_impl through the real get_launch_params
    launch, scalars = LaunchSink(), ScalarSink()
    plg.get_launch_params([_dims_exprs(x) for x in shapes], dyn, len(shapes), launch, scalars, ExprBuilder())
    assert q.tensor.SymIntExpr._exprBuilder is None  # the real code reset it: it got to the end
    assert q.ptx_calls[-1] == (op, attrs), "ptx_for got other attributes than the node's"
    for m in M_VALUES:
        lc = kernels.launch_config(op, R.launch_dims(op, _at(shapes, m), attrs), clusters=False)
        got = [_value(getattr(launch, f), q, m) for f in LaunchSink.FIELDS]
        assert got == [*lc.grid, *lc.block, lc.shared_mem], (op, m, got)
        assert scalars.nbSymExprs == len(lc.scalars) == len(scalars.items), (op, scalars.nbSymExprs)
        assert [_value(scalars.items[i], q, m) for i in range(len(lc.scalars))] == list(lc.scalars), (op, m)
        assert got[-1] <= 48 * 1024, (op, m, got)  # the most an AOT plugin's launch can have (issue 16, risk 5)

    # kernel: what TensorRT loads (PTX bytes, the entry named like the kernel)
    name, ptx = plg.get_kernel([d.desc for d in dyn[:len(shapes)]], [d.desc for d in dyn[len(shapes):]])
    assert name == kernels.kernel_name(op) and isinstance(ptx, bytes)
    assert re.search(rf"\.entry\s+{re.escape(name)}\s*\(", ptx.decode())
    clone = plg.clone()
    assert isinstance(clone, q.plugin_class._TemplateAOTPlugin) and clone.get_timing_cache_id() == ""
    return plg


# --- tests ----------------------------------------------------------------------------------------------------------

def test_wheel_source_is_found_without_importing_it():
    imported = "tensorrt_bindings" in sys.modules
    root, why = _bindings_dir()
    if root is None:
        pytest.skip(why)
    assert imported or "tensorrt_bindings" not in sys.modules  # its __init__.py (which loads tensorrt.so) not run
    assert {p.name for p in (root / "plugin").glob("*.py")} >= {"_lib.py", "_validate.py", "_tensor.py",
                                                               "_plugin_class.py", "_top_level.py", "_export.py"}


def test_register_all_through_the_real_decorators(qdp):
    """The real register/aot_impl validate every signature (_validate.py raises on a mismatch); the registry then
    holds exactly our plugins, with the inputs, attributes and outputs of shape_rules.SCHEMAS."""
    ids = plugins.register_all()
    assert sys.modules["tensorrt_bindings.plugin._export"].IS_AOT_ENABLED
    assert sorted(ids) == sorted(f"{R.NAMESPACE}::{op}" for op in R.PLUGIN_OPS)
    assert sorted(qdp.lib.QDP_REGISTRY) == sorted(ids)  # nothing else, all in namespace qtrt
    assert plugins.register_all() == ids  # idempotent: a second real register would raise "already has a defintion"
    # every custom op is a plugin, except those with aliased outputs (describe refuses them; prepare_onnx rewrites)
    assert set(R.PLUGIN_OPS) <= set(R.CUSTOM_OPS)
    assert all(R.SCHEMAS[op].aliases for op in set(R.CUSTOM_OPS) - set(R.PLUGIN_OPS))
    ns = getattr(qdp.trtp.op, R.NAMESPACE)
    for op in R.PLUGIN_OPS:
        s, d = R.SCHEMAS[op], qdp.lib.QDP_REGISTRY[f"{R.NAMESPACE}::{op}"]
        assert getattr(ns, op) is d
        assert d.input_tensor_names == list(s.inputs), op
        assert d.input_attrs == dict(s.attrs), op
        assert d.num_outputs == len(s.outputs), op
        assert d.aot_impl_attr_names == [n for n, _ in s.attrs], op  # all of them, in register order
        assert d.impl_func is None and d.autotune_func is None  # AOT only: nothing runs Python at run time
        assert d.register_func.__module__ == d.aot_impl_func.__module__ == plugins.__name__
        # the creator's fields are what the ONNX parser fills from the node's attributes, by name
        creator = qdp.registry.get_creator(op, "1", R.NAMESPACE)
        field_type = {int: PluginFieldType.INT64, float: PluginFieldType.FLOAT64}
        assert [(f.name, f.type) for f in creator.field_names] == [(n, field_type[t]) for n, t in s.attrs], op
    assert sorted(qdp.registry.creators) == sorted((op, "1", R.NAMESPACE) for op in R.PLUGIN_OPS)


@pytest.mark.parametrize("op", R.PLUGIN_OPS)
def test_plugin_as_tensorrt_builds_it(qdp, op):
    """Creator -> AOT plugin -> output types, shapes, formats -> launch parameters and scalars -> kernel, all in the
    real _lib.py / _plugin_class.py / _tensor.py, against shape_rules and kernels.launch_config with ints."""
    plugins.register_all()
    _build_like_tensorrt(qdp, op)


def test_the_stub_holds_exactly_what_is_used(qdp):
    """The module docstring's list of stubbed names is exact: each is read by the real plugin module or by
    plugins.py over a full registration and build of every plugin, and the stub has nothing else."""
    plugins.register_all()
    for op in R.PLUGIN_OPS:
        _build_like_tensorrt(qdp, op)
    touched = object.__getattribute__(qdp.trt, "_touched")
    assert sorted(touched - {"plugin"}) == sorted(STUBBED), sorted(set(STUBBED) ^ (touched - {"plugin"}))


# --- the real module refuses what it should: these checks can fail ------------------------------------------------

def test_real_register_refuses_a_string_annotation(qdp):
    """What `from __future__ import annotations` in plugins.py would do to every attribute (its header comment)."""
    trtp = qdp.trtp

    with pytest.raises(ValueError, match="not a supported serializable type"):
        @trtp.register("qtrt::bad_annotation")
        def _(x: trtp.TensorDesc, hidden: "int") -> trtp.TensorDesc:
            return x.like()


def test_real_aot_impl_refuses_attributes_out_of_register_order(qdp):
    trtp = qdp.trtp
    AotResult = typing.Tuple[typing.Union[str, bytes], typing.Union[str, bytes], trtp.KernelLaunchParams,
                             trtp.SymIntExprs]

    @trtp.register("qtrt::bad_order")
    def _(x: trtp.TensorDesc, in_features: int, out_features: int) -> trtp.TensorDesc:
        return x.like()

    with pytest.raises(ValueError, match="does not match the expected input arg schema"):
        @trtp.aot_impl("qtrt::bad_order")
        def _(x: trtp.TensorDesc, out_features: int, in_features: int, outputs: typing.Tuple[trtp.TensorDesc],
              tactic: int) -> AotResult:
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="Expected a descendent of tensorrt.plugin.SymExprs"):
        @trtp.aot_impl("qtrt::bad_order")
        def _(x: trtp.TensorDesc, in_features: int, out_features: int, outputs: typing.Tuple[trtp.TensorDesc],
              tactic: int) -> typing.Tuple[str, bytes, trtp.KernelLaunchParams, tuple]:
            raise AssertionError("never called")


def test_real_launch_refuses_bare_symintexpr_scalars(qdp, monkeypatch):
    """plugins.aot_result wraps each scalar in SymInt32; had it used SymIntExpr (what SymIntExprs.__setitem__ makes
    of an int), the real get_launch_params raises, and so does the flow test above."""
    plugins.register_all()
    monkeypatch.setattr(qdp.trtp, "SymInt32", qdp.tensor.SymIntExpr)
    op = R.PLUGIN_OPS[0]
    with pytest.raises(TypeError, match="Extra args must be a 'tensorrt.plugin.SymInt32'"):
        _build_like_tensorrt(qdp, op)
