"""TensorRT plugins `qtrt::<op>` for every custom op of docs/ops.md: Python plugins (QDP) with an ahead-of-time
implementation, so the PTX of our own CUDA kernels is baked into the plan and the plan runs without Python.

Per op: a `tensorrt.plugin.register` description (output shapes, from shape_rules) and a `tensorrt.plugin.aot_impl`
returning (kernel name, PTX, KernelLaunchParams, SymIntExprs of the int32 scalars), all from toolchain.kernels.
Source of every API used: the TensorRT 11.4 bindings wheel (tensorrt-cu13-bindings 11.4.0.106),
tensorrt_bindings/plugin/{_lib,_plugin_class,_tensor,_top_level,_validate}.py; see docs/tensorrt.md.

Call `register_all()` before parsing an ONNX model; importing this module does not import TensorRT.
"""
# No `from __future__ import annotations` in this file: tensorrt.plugin reads the decorated functions' annotations
# with inspect.signature and requires real classes (_validate.py: inspect.isclass(param.annotation)), not strings.
import functools
import numbers
import os
from typing import Tuple, Union

from . import import_tensorrt
from .shape_rules import (ATTENTION_ADDR_OP, GATHER_OPS, MATMUL_OPS, NAMESPACE, PLUGIN_OPS, SCHEMAS, SWIGLU_OP,
                          launch_dims, output_shapes)
from ..errors import UserError

_REGISTERED: list = []


def plugin_id(op: str) -> str:
    return f"{NAMESPACE}::{op}"


class TrtOps:
    """The `ops` namespace for kernels.launch_config inside TensorRT: cdiv/max/min on shape expressions.
    tensorrt.plugin.cdiv/max/min refuse two ints (_top_level.py: "Both arguments cannot be 'int's"), so plain
    Python does those."""

    def __init__(self, trtp):
        self._trtp = trtp

    def cdiv(self, a, b):
        return -(-a // b) if _is_int(a) and _is_int(b) else self._trtp.cdiv(_int(a), _int(b))

    def max(self, a, b):
        return max(a, b) if _is_int(a) and _is_int(b) else self._trtp.max(_int(a), _int(b))

    def min(self, a, b):
        return min(a, b) if _is_int(a) and _is_int(b) else self._trtp.min(_int(a), _int(b))


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral)


def _int(v):
    """numpy ints become Python ints: SymIntExpr(value) only recognises `int` (_tensor.py, SymIntExpr.__init__)."""
    return int(v) if _is_int(v) else v


@functools.lru_cache(maxsize=None)
def target_arch() -> str:
    """The GPU's sm_XY for the PTX: $QTRT_CUDA_ARCH, else the current device's compute capability, else sm_90."""
    if os.environ.get("QTRT_CUDA_ARCH"):
        return os.environ["QTRT_CUDA_ARCH"]
    try:
        from .. import cuda_runtime as cr

        d = cr.driver()
        cr.init()
        dev = cr.check(d.cuCtxGetDevice(), "cuCtxGetDevice")
        a = d.CUdevice_attribute
        cc = [cr.check(d.cuDeviceGetAttribute(x, dev), "cuDeviceGetAttribute")
              for x in (a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)]
        return f"sm_{cc[0]}{cc[1]}"
    except Exception:
        pass
    return "sm_90"


@functools.lru_cache(maxsize=None)
def _ptx(op: str, defines: tuple, arch: str) -> bytes:
    from .. import kernels

    return kernels.compile_kernel(op, dict(defines), fmt="ptx", arch=arch)


def ptx_for(op: str, attrs: dict) -> bytes:
    """PTX of op's kernel specialised for attrs (one compile per distinct define set, e.g. once for all layers)."""
    from .. import kernels

    defines = kernels.defines_for(op, attrs, clusters=False)  # TensorRT launches no clusters (issue 16, risk 1)
    return _ptx(op, tuple(sorted(defines.items())), target_arch())


def describe(trt, trtp, op: str, descs, attrs: dict):
    """Output TensorDescs: new tensors of the schema's dtypes. No plugin output aliases an input: the KV cache, the
    one state updated in place, reaches the attention plugin by address (rope_kv_attention_addr, issue 16 risk 2),
    so TensorRT never sees aliased plugin I/O."""
    s = SCHEMAS[op]
    assert not s.aliases, f"{op}: aliased outputs are not a TensorRT plugin's"
    shapes = output_shapes(op, [d.shape_expr for d in descs], attrs)
    out = [trtp.from_shape_expr(tuple(_int(d) for d in shape), dtype=getattr(trt, s.output_dtypes[i]))
           for i, shape in enumerate(shapes)]
    return out[0] if len(out) == 1 else tuple(out)


def aot_result(trtp, ops, op: str, descs, attrs: dict):
    """(kernel_name, PTX, KernelLaunchParams, SymIntExprs). The kernel's parameters are: input pointers, then these
    int32 scalars, then output pointers (aot_impl docstring in _lib.py: "extra_args: ... located after the tensor
    inputs and before the tensor outputs"). Each scalar must be a SymInt32, not a bare SymIntExpr: get_launch_params
    raises TypeError otherwise (_plugin_class.py), and SymIntExprs.__setitem__ wraps ints as SymIntExpr, so wrap."""
    from .. import kernels

    lc = kernels.launch_config(op, launch_dims(op, [d.shape_expr for d in descs], attrs), ops=ops,
                                clusters=False)
    params = trtp.KernelLaunchParams()  # fields accept int | IDimensionExpr | SymInt32 (_tensor.py)
    params.grid_x, params.grid_y, params.grid_z = (_int(v) for v in lc.grid)
    params.block_x, params.block_y, params.block_z = (_int(v) for v in lc.block)
    params.shared_mem = _int(lc.shared_mem)
    extra = trtp.SymIntExprs(len(lc.scalars))
    for i, v in enumerate(lc.scalars):
        extra[i] = trtp.SymInt32(_int(v))
    return kernels.kernel_name(op), ptx_for(op, attrs), params, extra


def register_all() -> list:
    """Register qtrt::<op> (description + AOT implementation) for every op TensorRT gets (shape_rules.PLUGIN_OPS:
    the export's ops, with the attention by address in place of rope_kv_attention); idempotent. Returns the ids."""
    if _REGISTERED:
        return list(_REGISTERED)
    trt = import_tensorrt()
    import tensorrt.plugin as trtp

    if not (hasattr(trtp, "aot_impl") and hasattr(trtp, "KernelLaunchParams")):  # _export.py: IS_AOT_ENABLED
        raise UserError(f"TensorRT {getattr(trt, '__version__', '?')} has no ahead-of-time Python plugins "
                        "(tensorrt.plugin.aot_impl): this code is written for TensorRT 11.4 (docs/tensorrt.md)")
    ops = TrtOps(trtp)
    for op in MATMUL_OPS:
        _register_matmul(trt, trtp, ops, op)
    for op in GATHER_OPS:
        _register_gather(trt, trtp, ops, op)
    _register_attention(trt, trtp, ops)
    _register_swiglu(trt, trtp, ops)
    _REGISTERED.extend(plugin_id(op) for op in PLUGIN_OPS)
    return list(_REGISTERED)


# The functions below spell out each signature because tensorrt.plugin derives the plugin's inputs and attributes
# from it (_validate.py, _parse_register_inputs): TensorDesc parameters are inputs, the rest attributes, whose names
# and types must equal the ONNX node's attributes (the parser fills plugin fields by these names). aot_impl must
# list *all* attributes in the same order: get_launch_params passes every attribute positionally
# (`_, val = zip(*self.attrs.items())`), while _validate_aot_impl checks the names against register's order.

def _register_matmul(trt, trtp, ops, op):
    Desc = trtp.TensorDesc
    AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]

    @trtp.register(plugin_id(op))
    def matmul_desc(x: Desc, w: Desc, bias: Desc, in_features: int, out_features: int) -> Desc:
        return describe(trt, trtp, op, (x, w, bias), dict(in_features=in_features, out_features=out_features))

    @trtp.aot_impl(plugin_id(op))
    def matmul_aot(x: Desc, w: Desc, bias: Desc, in_features: int, out_features: int,
                   outputs: Tuple[Desc], tactic: int) -> AotResult:
        return aot_result(trtp, ops, op, (x, w, bias), dict(in_features=in_features, out_features=out_features))


def _register_gather(trt, trtp, ops, op):
    Desc = trtp.TensorDesc
    AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]

    @trtp.register(plugin_id(op))
    def gather_desc(w: Desc, ids: Desc, hidden: int) -> Desc:
        return describe(trt, trtp, op, (w, ids), dict(hidden=hidden))

    @trtp.aot_impl(plugin_id(op))
    def gather_aot(w: Desc, ids: Desc, hidden: int, outputs: Tuple[Desc], tactic: int) -> AotResult:
        return aot_result(trtp, ops, op, (w, ids), dict(hidden=hidden))


def _register_attention(trt, trtp, ops):
    Desc = trtp.TensorDesc
    AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]
    op = ATTENTION_ADDR_OP

    # cache_addr: int64 [2], the device addresses of this layer's k and v caches (owned by runtime.TensorRTRunner);
    # the kernel writes the caches in place, so the plugin's only output is `out`.
    @trtp.register(plugin_id(op))
    def attention_desc(q: Desc, k: Desc, v: Desc, cache_addr: Desc, positions: Desc, slots: Desc,
                       n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float, layer: int,
                       max_seq_len: int, n_slots: int) -> Desc:
        attrs = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, rope_theta=rope_theta, layer=layer,
                     max_seq_len=max_seq_len, n_slots=n_slots)
        return describe(trt, trtp, op, (q, k, v, cache_addr, positions, slots), attrs)

    @trtp.aot_impl(plugin_id(op))
    def attention_aot(q: Desc, k: Desc, v: Desc, cache_addr: Desc, positions: Desc, slots: Desc,
                      n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float, layer: int, max_seq_len: int,
                      n_slots: int, outputs: Tuple[Desc], tactic: int) -> AotResult:
        attrs = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, rope_theta=rope_theta, layer=layer,
                     max_seq_len=max_seq_len, n_slots=n_slots)
        return aot_result(trtp, ops, op, (q, k, v, cache_addr, positions, slots), attrs)


def _register_swiglu(trt, trtp, ops):
    Desc = trtp.TensorDesc
    AotResult = Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]
    op = SWIGLU_OP

    @trtp.register(plugin_id(op))
    def swiglu_desc(gate: Desc, up: Desc) -> Desc:
        return describe(trt, trtp, op, (gate, up), {})

    @trtp.aot_impl(plugin_id(op))
    def swiglu_aot(gate: Desc, up: Desc, outputs: Tuple[Desc], tactic: int) -> AotResult:
        return aot_result(trtp, ops, op, (gate, up), {})
