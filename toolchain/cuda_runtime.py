"""A thin layer over the CUDA driver API through cuda-python (cuda.bindings.driver): no torch, no cupy.

    init(), gpu_available(), device_name()   primary context of device 0, current on this thread
    DeviceBuffer(nbytes, shape, dtype)       .from_numpy(a) .zeros(shape, dtype) .empty(nbytes); .ptr
                                             .upload(a, stream) .download(shape, dtype) or .download(stream, rows=m)
                                             .fill_u8 / .fill_u32 (poison) .free()
    Module(image)                            cubin or PTX (cuModuleLoadData); .kernel(name) / .function(name)
    Kernel.launch(cfg, args, stream, pdl)    args in kernel order; each is packed by the kernel's own parameter
                                             sizes (cuFuncGetParamInfo): 8 bytes -> pointer (DeviceBuffer, Ptr, int,
                                             None), 4 bytes -> int32. pdl=True: programmatic dependent launch
                                             (plugins/pdl.cuh), the kernel may start before the previous one ends
    Kernel.launch_op(cfg, inputs, outputs, stream)   the op ABI: inputs, cfg.scalars, outputs
    Stream, Event, time_ms(stream, fn), memcpy_dtod(dst, src, nbytes, stream)
    CUDA graphs: capture(stream, fn) -> Graph, or `with stream.capture() as g: ...`; g.launch(stream)

Every CUresult is checked: a failure raises RuntimeError naming the call and the error. cuda.bindings is imported
on first use, so `import toolchain.cuda_runtime` works on machines without it.
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import threading
import time
from dataclasses import dataclass

import numpy as np

_drv = None
_ctx = None
_init_lock = threading.Lock()  # the context may be created on BackgroundUpload's thread and the main one at once


def driver():
    """The cuda.bindings.driver module (imported lazily)."""
    global _drv
    if _drv is None:
        try:
            from cuda.bindings import driver as d
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError("cuda-python is not installed (pip install -e '.[cuda]')") from e
        _drv = d
    return _drv


def check(result, what: str = "CUDA call"):
    """Unpack a cuda-python result tuple (err, *values); raise RuntimeError on any error."""
    if isinstance(result, tuple):
        err, vals = result[0], result[1:]
    else:
        err, vals = result, ()
    d = driver()
    if err != d.CUresult.CUDA_SUCCESS:
        e, name = d.cuGetErrorName(err)
        name = name.decode() if e == d.CUresult.CUDA_SUCCESS else str(err)
        raise RuntimeError(f"{what} failed: {name}")
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else vals


def gpu_problem() -> str | None:
    """Why the GPU path cannot run here, in one line (None when cuda-python imports and sees a CUDA device)."""
    try:
        d = driver()
    except RuntimeError as e:
        return f"{e}; `make run` installs it where nvidia-smi finds a GPU"
    except Exception as e:  # noqa: BLE001 - a broken install must not become a traceback
        return f"cuda-python does not import ({type(e).__name__}: {e})"
    try:
        err = d.cuInit(0)[0]
        if err != d.CUresult.CUDA_SUCCESS:
            name = d.cuGetErrorName(err)[1]
            return f"no usable NVIDIA GPU (cuInit: {name.decode() if isinstance(name, bytes) else err})"
        err, n = d.cuDeviceGetCount()
    except Exception as e:  # noqa: BLE001 - e.g. libcuda.so missing: cuda-python's DynamicLibNotFoundError
        return f"the NVIDIA driver library could not be loaded ({type(e).__name__}: {e})"
    if err != d.CUresult.CUDA_SUCCESS or n == 0:
        return "no CUDA device found"
    return None


def gpu_available() -> bool:
    """True if cuda-python imports and a CUDA device is present."""
    return gpu_problem() is None


available = gpu_available


def init(device: int = 0):
    """Make device's primary context current (idempotent). Returns the CUcontext."""
    global _ctx
    d = driver()
    with _init_lock:
        if _ctx is None:
            check(d.cuInit(0), "cuInit")
            dev = check(d.cuDeviceGet(device), "cuDeviceGet")
            _ctx = check(d.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    check(d.cuCtxSetCurrent(_ctx), "cuCtxSetCurrent")
    return _ctx


def synchronize():
    check(driver().cuCtxSynchronize(), "cuCtxSynchronize")


def device_name(device: int = 0) -> str:
    d = driver()
    init()
    dev = check(d.cuDeviceGet(device), "cuDeviceGet")
    return check(d.cuDeviceGetName(64, dev), "cuDeviceGetName").split(b"\0")[0].decode()


def compute_capability(device: int = 0) -> tuple[int, int]:
    d = driver()
    init()
    dev = check(d.cuDeviceGet(device), "cuDeviceGet")
    a = d.CUdevice_attribute
    return (check(d.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cuDeviceGetAttribute"),
            check(d.cuDeviceGetAttribute(a.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cuDeviceGetAttribute"))


def sm_count(device: int = 0) -> int:
    """The GPU's streaming multiprocessors."""
    d = driver()
    init()
    dev = check(d.cuDeviceGet(device), "cuDeviceGet")
    a = d.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
    return int(check(d.cuDeviceGetAttribute(a, dev), "cuDeviceGetAttribute"))


def _stream_handle(stream):
    return 0 if stream is None else stream.handle


@dataclass(frozen=True)
class Ptr:
    """A raw device address passed as a pointer argument (a plain int would be packed as int32)."""
    value: int


class DeviceBuffer:
    """Device memory; remembers an optional (shape, dtype) so download() can default to it."""

    def __init__(self, nbytes: int, shape=None, dtype=None):
        init()
        self.nbytes = int(nbytes)
        self.shape = tuple(shape) if shape is not None else (self.nbytes,)
        self.dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.uint8)
        self.ptr = int(check(driver().cuMemAlloc(max(self.nbytes, 1)), "cuMemAlloc"))

    @classmethod
    def from_numpy(cls, a: np.ndarray, stream=None) -> "DeviceBuffer":
        a = np.ascontiguousarray(a)
        buf = cls(a.nbytes, a.shape, a.dtype)
        buf.upload(a)  # synchronous: `a` may be a temporary
        return buf

    from_array = from_numpy

    @classmethod
    def zeros(cls, shape, dtype) -> "DeviceBuffer":
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        buf = cls(int(np.prod(shape)) * np.dtype(dtype).itemsize, shape, dtype)
        buf.fill_u8(0)
        synchronize()
        return buf

    @classmethod
    def empty(cls, nbytes: int) -> "DeviceBuffer":
        return cls(nbytes)

    def upload(self, a: np.ndarray, stream=None, offset: int = 0, wait: bool = True):
        """Host -> device, at byte `offset`. With a stream the copy is ordered on it and waited for (a may be a
        temporary), unless not `wait`: from pageable memory the driver has staged the bytes when the call returns,
        so a caller that keeps `a` alive may go on at once."""
        a = np.ascontiguousarray(a)
        if offset < 0 or offset + a.nbytes > self.nbytes:
            raise ValueError(f"upload of {a.nbytes} bytes at {offset} into a buffer of {self.nbytes}")
        d = driver()
        if stream is None:
            check(d.cuMemcpyHtoD(self.ptr + offset, a.ctypes.data, a.nbytes), "cuMemcpyHtoD")
        else:
            check(d.cuMemcpyHtoDAsync(self.ptr + offset, a.ctypes.data, a.nbytes, stream.handle),
                  "cuMemcpyHtoDAsync")
            if wait:
                stream.synchronize()

    def download(self, *args, stream=None, rows=None, shape=None, dtype=None) -> np.ndarray:
        """download(shape, dtype), download(stream, rows=m) or download(): device -> host, synchronous
        (after the stream's earlier work when a stream is given). Defaults: the buffer's shape and dtype;
        rows=m keeps the first m rows."""
        for a in args:
            if isinstance(a, Stream):
                stream = a
            elif a is None:
                continue
            elif shape is None and isinstance(a, (int, np.integer, tuple, list)):
                shape = a
            else:
                dtype = a
        dtype = np.dtype(dtype) if dtype is not None else self.dtype
        if shape is None:
            shape = self.shape if dtype == self.dtype else (self.nbytes // dtype.itemsize,)
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
        if rows is not None:
            shape = (int(rows), *shape[1:])
        out = np.empty(shape, dtype)
        if out.nbytes > self.nbytes:
            raise ValueError(f"download of {out.nbytes} bytes from a buffer of {self.nbytes}")
        d = driver()
        if stream is not None:
            check(d.cuMemcpyDtoHAsync(out.ctypes.data, self.ptr, out.nbytes, stream.handle), "cuMemcpyDtoHAsync")
            stream.synchronize()
        else:
            check(d.cuMemcpyDtoH(out.ctypes.data, self.ptr, out.nbytes), "cuMemcpyDtoH")
        return out

    def fill_u8(self, value: int, stream=None):
        """Set every byte (0xFF poisons ints; use fill_u32(0x7FC00000) for float NaN)."""
        check(driver().cuMemsetD8Async(self.ptr, value & 0xFF, self.nbytes, _stream_handle(stream)), "cuMemsetD8")

    def fill_u32(self, value: int, stream=None):
        check(driver().cuMemsetD32Async(self.ptr, value & 0xFFFFFFFF, self.nbytes // 4, _stream_handle(stream)),
              "cuMemsetD32")

    def copy_from(self, other: "DeviceBuffer", nbytes: int | None = None, stream=None):
        memcpy_dtod(self, other, min(self.nbytes, other.nbytes) if nbytes is None else nbytes, stream)

    def free(self):
        if self.ptr:
            check(driver().cuMemFree(self.ptr), "cuMemFree")
            self.ptr = 0

    def __del__(self):  # best effort; explicit free() is preferred
        try:
            if self.ptr and _drv is not None:
                _drv.cuMemFree(self.ptr)
        except Exception:
            pass


class PinnedArray:
    """Page-locked host memory as a numpy array (`.array`): the target of asynchronous device-to-host copies."""

    def __init__(self, shape, dtype):
        import ctypes

        init()
        self.nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.ptr = int(check(driver().cuMemHostAlloc(self.nbytes, 0), "cuMemHostAlloc"))
        raw = np.ctypeslib.as_array(ctypes.cast(self.ptr, ctypes.POINTER(ctypes.c_uint8)), shape=(self.nbytes,))
        self.array = raw.view(dtype).reshape(shape)

    def copy_from_device(self, src: int, nbytes: int, stream: "Stream"):
        """Enqueue a copy of nbytes from device address src into the array's start, on `stream`."""
        check(driver().cuMemcpyDtoHAsync(self.ptr, int(src), int(nbytes), stream.handle), "cuMemcpyDtoHAsync")

    def free(self):
        if self.ptr:
            driver().cuMemFreeHost(self.ptr)
            self.ptr = 0
            self.array = None


class BackgroundUpload:
    """`host` (bytes in memory, e.g. a GGUF's tensor data in its memory map) copied into one new device buffer on a
    thread, which also creates the CUDA context if it does not exist yet. cuda-python runs each driver call without
    the interpreter lock, so the context's creation and the copy (0.4 s on the H100 for the 1.5B file) overlap what
    holds the lock meanwhile: imports, the tokenizer, the step graphs (issue 13: time to first token). One call for the
    whole region, so the thread needs the lock only a few times. result() waits for it and returns the buffer, or
    raises what the thread raised."""

    def __init__(self, host: np.ndarray):
        self.host, self.buffer, self.error, self.seconds = host, None, None, None
        self._thread = threading.Thread(target=self._copy, name="qtrt-upload", daemon=True)
        self._thread.start()
        atexit.register(self._thread.join)  # a process that fails meanwhile exits after the copy, not during it

    def _copy(self):
        t0 = time.perf_counter()
        try:
            buf = DeviceBuffer(self.host.nbytes)
            buf.upload(self.host)
            self.buffer = buf
        except BaseException as e:  # noqa: BLE001 - handed to the caller of result()
            self.error = e
        self.seconds = round(time.perf_counter() - t0, 4)

    def result(self) -> DeviceBuffer:
        self._thread.join()
        if self.error is not None:
            raise self.error
        init()  # the context current on the caller's thread too
        return self.buffer


def upload_weights(model) -> BackgroundUpload | None:
    """Start copying a GGUFModel's tensor data to the GPU (BackgroundUpload: the file's bytes, as the kernels read
    them), or None when its tensors are not one region of a file. Imports nothing slow: callers start it first."""
    data = model.tensor_data()
    return BackgroundUpload(data) if data is not None else None


class DeviceView(DeviceBuffer):
    """`nbytes` of another DeviceBuffer from byte `offset`: no memory of its own (free() only forgets it)."""

    def __init__(self, base: DeviceBuffer, offset: int, nbytes: int, shape=None, dtype=None):
        self.base, self.nbytes = base, int(nbytes)
        self.ptr = base.ptr + int(offset)
        self.shape = tuple(shape) if shape is not None else (self.nbytes,)
        self.dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.uint8)

    def free(self):
        self.ptr = 0

    def __del__(self):
        pass


def _addr(x) -> int:
    if x is None:
        return 0
    if isinstance(x, DeviceBuffer):
        return x.ptr
    if isinstance(x, Ptr):
        return x.value
    return int(x)


def memcpy_dtod(dst, src, nbytes: int, stream=None):
    check(driver().cuMemcpyDtoDAsync(_addr(dst), _addr(src), int(nbytes), _stream_handle(stream)), "cuMemcpyDtoD")


class Stream:
    def __init__(self):
        init()
        d = driver()
        self.handle = check(d.cuStreamCreate(int(d.CUstream_flags.CU_STREAM_NON_BLOCKING)), "cuStreamCreate")

    def synchronize(self):
        check(driver().cuStreamSynchronize(self.handle), "cuStreamSynchronize")

    def wait(self, event: "Event"):
        """Work enqueued on this stream from now on starts after `event` (recorded on another stream) completes; under
        stream capture this joins the other stream's captured work (a fork or a join of the graph)."""
        check(driver().cuStreamWaitEvent(self.handle, event.handle, 0), "cuStreamWaitEvent")

    @contextlib.contextmanager
    def capture(self):
        """Capture the launches made on this stream inside the block into a Graph (instantiated on exit)."""
        d = driver()
        graph = Graph()
        check(d.cuStreamBeginCapture(self.handle, d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
              "cuStreamBeginCapture")
        try:
            yield graph
        finally:
            g = check(d.cuStreamEndCapture(self.handle), "cuStreamEndCapture")
        graph._instantiate(g)


class Graph:
    """An instantiated CUDA graph (from Stream.capture)."""
    graph = None
    exec = None

    def _instantiate(self, g):
        self.graph = g
        self.exec = check(driver().cuGraphInstantiate(g, 0), "cuGraphInstantiate")

    def launch(self, stream: Stream):
        check(driver().cuGraphLaunch(self.exec, stream.handle), "cuGraphLaunch")


def capture(stream: Stream, fn) -> Graph:
    """Run fn() under stream capture of `stream` and return the instantiated Graph."""
    with stream.capture() as g:
        fn()
    return g


def time_ms(stream, fn) -> float:
    """Milliseconds of device time for the work fn() enqueues on `stream` (events around it)."""
    a, b = Event(), Event()
    a.record(stream)
    fn()
    b.record(stream)
    return b.elapsed_ms(a)


class Event:
    def __init__(self):
        init()
        self.handle = check(driver().cuEventCreate(0), "cuEventCreate")

    def record(self, stream=None):
        check(driver().cuEventRecord(self.handle, _stream_handle(stream)), "cuEventRecord")

    def synchronize(self):
        check(driver().cuEventSynchronize(self.handle), "cuEventSynchronize")

    def elapsed_ms(self, start: "Event") -> float:
        """Milliseconds from `start` to this event (both recorded, this one completed)."""
        self.synchronize()
        return float(check(driver().cuEventElapsedTime(start.handle, self.handle), "cuEventElapsedTime"))


@functools.lru_cache(maxsize=None)
def _pdl_attrs():
    """The launch attribute list of a programmatic dependent launch (built once)."""
    d = driver()
    attr = d.CUlaunchAttribute()
    attr.id = d.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value.programmaticStreamSerializationAllowed = 1
    return [attr]


PACKED_KEPT = 4096  # argument lists kept per kernel (Kernel._packed_args)
_INT_TYPES = frozenset({int, np.int32, np.int64, np.uint32, np.uint64})  # not bool: _pack refuses it


class Kernel:
    def __init__(self, module: "Module", name: str, handle):
        self.module, self.name, self.handle = module, name, handle
        self.param_sizes = None  # filled at the first launch, for the number of arguments given
        self._smem_limit = None  # dynamic shared memory the kernel may take, once asked (static + dynamic <= 48 KB)
        self._packed: dict[tuple, tuple] = {}  # _pack's result by argument values (plain ints only), see launch()

    def _param_sizes(self, n: int):
        """Byte size of each of the first n kernel parameters (8: pointer, 4: int32), or None where the driver can't
        say. Only indices that exist are asked for, so no driver call fails (compute-sanitizer reports those)."""
        d = driver()
        if not hasattr(d, "cuFuncGetParamInfo"):
            return None
        sizes = []
        for i in range(n):
            res = d.cuFuncGetParamInfo(self.handle, i)
            if res[0] != d.CUresult.CUDA_SUCCESS:
                raise ValueError(f"{self.name} takes {i} parameters, got {n}")
            sizes.append(int(res[2]))
        return sizes

    def attribute(self, attr: str) -> int:
        """e.g. 'NUM_REGS', 'LOCAL_SIZE_BYTES', 'SHARED_SIZE_BYTES', 'MAX_THREADS_PER_BLOCK'."""
        d = driver()
        a = getattr(d.CUfunction_attribute, f"CU_FUNC_ATTRIBUTE_{attr}")
        return int(check(d.cuFuncGetAttribute(a, self.handle), f"cuFuncGetAttribute({attr})"))

    def _packed_args(self, args):
        """_pack(args), kept by the argument values when they are all plain ints (a plan's device addresses and
        sizes): a step launched from Python repeats the same ~370 launches, and packing each argument into its own
        array cost ~26 us a launch on the host (more than the GPU's share of a small kernel). The driver copies the
        parameters at each launch (and a capture into its graph node), so the kept arrays can be passed again."""
        if not _INT_TYPES.issuperset(map(type, args)):
            return self._pack(args)  # buffers, Ptr objects: an address that may not outlive the object
        key = tuple(args)
        packed = self._packed.get(key)
        if packed is None:
            if len(self._packed) >= PACKED_KEPT:
                self._packed.clear()
            packed = self._packed[key] = self._pack(args)
        return packed

    def _pack(self, args):
        if self.param_sizes is None or len(self.param_sizes) != len(args):
            self.param_sizes = self._param_sizes(len(args))
        sizes = self.param_sizes
        vals = []
        for i, a in enumerate(args):
            if sizes is not None:
                pointer = sizes[i] == 8
            else:  # no parameter info: objects and ints beyond int32 (device addresses) are pointers
                pointer = not isinstance(a, (int, np.integer)) or not -(1 << 31) <= int(a) < (1 << 31)
            if pointer:
                vals.append(np.array([_addr(a)], np.uint64))
            else:
                if not isinstance(a, (int, np.integer)) or isinstance(a, bool):
                    raise TypeError(f"{self.name} parameter {i} is an int32, got {type(a).__name__}")
                if not -(1 << 31) <= int(a) < (1 << 31):
                    raise ValueError(f"{self.name} parameter {i}: {a} does not fit int32")
                vals.append(np.array([int(a)], np.int32))
        return vals, np.array([v.ctypes.data for v in vals], np.uint64)

    def launch(self, cfg, args, stream=None, pdl: bool = False):
        """Launch with cfg (kernels.LaunchConfig, int dims) and args in kernel order. With pdl, as a programmatic
        dependent launch: the kernel may be scheduled while the previous kernel on the stream runs, and waits for it
        in its own code (plugins/pdl.cuh; every kernel of plugins/ does)."""
        vals, ptrs = self._packed_args(args)  # `vals` must stay alive through the call
        d = driver()
        (gx, gy, gz), (bx, by, bz) = cfg.grid, cfg.block
        if self._smem_limit is None:  # static + dynamic beyond 48 KB must be asked for (once per size)
            static = check(d.cuFuncGetAttribute(d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES,
                                                self.handle), f"cuFuncGetAttribute({self.name})")
            self._smem_limit = 48 * 1024 - int(static)
        if int(cfg.shared_mem) > self._smem_limit:
            attr = d.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            check(d.cuFuncSetAttribute(self.handle, attr, int(cfg.shared_mem)), f"cuFuncSetAttribute({self.name})")
            self._smem_limit = int(cfg.shared_mem)
        if not pdl:
            check(d.cuLaunchKernel(self.handle, int(gx), int(gy), int(gz), int(bx), int(by), int(bz),
                                   int(cfg.shared_mem), _stream_handle(stream), ptrs.ctypes.data, 0),
                  f"cuLaunchKernel({self.name})")
        else:
            lc = d.CUlaunchConfig()
            lc.gridDimX, lc.gridDimY, lc.gridDimZ = int(gx), int(gy), int(gz)
            lc.blockDimX, lc.blockDimY, lc.blockDimZ = int(bx), int(by), int(bz)
            lc.sharedMemBytes = int(cfg.shared_mem)
            lc.hStream = _stream_handle(stream)
            lc.attrs = _pdl_attrs()
            lc.numAttrs = 1
            check(d.cuLaunchKernelEx(lc, self.handle, ptrs.ctypes.data, 0), f"cuLaunchKernelEx({self.name})")
        del vals

    def launch_op(self, cfg, inputs, outputs, stream=None):
        """The op ABI (docs/ops.md): input pointers, cfg.scalars as int32, output pointers."""
        self.launch(cfg, [*inputs, *cfg.scalars, *outputs], stream)


class Module:
    def __init__(self, image: bytes):
        init()
        if not image.startswith(b"\x7fELF") and not image.endswith(b"\0"):
            image = image + b"\0"  # PTX text must be NUL-terminated
        self._image = image
        self.handle = check(driver().cuModuleLoadData(image), "cuModuleLoadData")
        self._kernels = {}

    def kernel(self, name: str) -> Kernel:
        if name not in self._kernels:
            f = check(driver().cuModuleGetFunction(self.handle, name.encode()), f"cuModuleGetFunction({name})")
            self._kernels[name] = Kernel(self, name, f)
        return self._kernels[name]

    function = kernel


def load_op(op: str, defines: dict | None = None, fmt: str = "cubin", arch: str = "sm_90") -> Kernel:
    """Compile (cached) and load the kernel of `op`."""
    from . import kernels
    return Module(kernels.compile_kernel(op, defines or {}, fmt=fmt, arch=arch)).kernel(kernels.kernel_name(op))
