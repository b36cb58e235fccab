"""The `cuda` backend: executes the decode-step ONNX graph with our kernels through cuda-python, no TensorRT.

Loading uploads the raw GGUF blocks once and turns the (fused) graph into a *plan*: one kernel launch per node with
its grid and argument pointers resolved. Every activation buffer is allocated for the largest step (`max_tokens`)
and reused, so the plan for m = 1 can be captured into one CUDA graph: embedding, all layers, final norm, lm_head,
argmax and `decode_advance` (which writes the argmax into the token input and increments the positions). Replaying
that graph is a whole decode step that advances itself; the host only reads the new token for streaming.

Decode steps (m < GEMM_MIN_M) are tuned (`TUNING`; docs/perf-notes.md has the measurements, scripts/decode_tuning.py
times the variants):
- pdl: every launch after the first is a programmatic dependent launch (plugins/pdl.cuh): a kernel is scheduled in
  the previous kernel's tail and has its first weights in flight before it waits for its input.
- qmv1: the batch-1 plan runs the fused projections with Q4_K / Q6_K weights on the decode core
  (plugins/qmv1.cuh, kernels.decode_core), with its own launch configuration; plain: the Q4_K / Q6_K plain
  matmuls (lm_head) on the decode core too.
- m1: the other projections of the batch-1 plan use the decode builds of the general core (QMV_M1: less code).
- batched: steps of 1 < m < SKINNY_MIN_M tokens (batched decode, short prompt pieces) run their projections on the
  decode core too, a block computing up to 8 tokens from one load of each weight (kernels.decode_tokens, QMV1_MT);
  without it they take the general core, whose blocks reload the weights for every 4 tokens.
- skinny_min_m: the step size from which the projections (fused ones too) run as tensor-core GEMMs for few tokens
  (SKINNY_MIN_M, plugins/quant_gemm_skinny.cu: Q4_K / Q6_K weights; others stay on the decode core);
  skinny_min_m >= gemm_min_m turns them off. skinny_skip: ops (or op@k) that stay on the decode core there.
- xmerge: in the batch-1 plan for long contexts, each attention hands its cluster partials to the o projection that
  reads its output, which merges them while it loads x (plugins/rope_kv_attention.cu ATTN_XMERGE, plugins/qmv1.cuh
  QMV1_XMERGE): the attention no longer ends with a fence, an atomic and a last cluster's merge
  (kernels.xmerge_defines). The step is captured twice, and each replay takes the graph of its position: within
  one attention cluster's keys the plain one (the pair's merge code costs the o projection 0.5-2% there), beyond
  them the xmerge one (+5-7% at context 4096; docs/perf-notes.md v8).
- attn_kv_grid: the attention launches one cluster per (token, kv head) (plugins/rope_kv_attention.cu ATTN_KVGRID)
  wherever that is all it uses: steps of more than ATTN_MSCR tokens, and steps whose furthest row is within one
  cluster's keys (ATTN_CLUSTER_KEYS; beyond them the long-context plan keeps the full grid, its clusters spread over
  the context). The full grid launches a cluster per query head there (n_heads / n_kv_heads of them per kv head),
  all but one leaving at once. The same bits either way.
- attn_one_block_keys: steps of more than ATTN_MSCR tokens whose furthest row is within this many keys run the
  attention as one block per (token, kv head) without a cluster (the ATTN_KVGRID build with ATTN_CLUSTER=0; 0: off):
  with that many tokens the grid fills the GPU anyway, and a short context leaves a cluster's 8 blocks a few key
  steps each and a merge (H100, m = 32: +13% over the one-cluster grid at context 128, +4% at 4096; m = 16 at 128:
  -2.4%, fewer tokens lose more, so not below MSCR; docs/perf-notes.md). Other bits than the cluster plans (another
  partition of the keys), as precise.
- gemm_min_m: the step size from which the projections run as tensor-core GEMMs (GEMM_MIN_M; `qtrt bench`
  times both sides of it for each batched m).
- defines ({op: {define: value}}) and pdl_skip (ops launched without PDL): experiments.
- skip (ops, or parts of node names such as 'down_proj', not launched at all): a timing diagnostic (what a family
  costs inside the step); results are wrong.
- share_activations: the intermediate values live in one pool, values never alive at the same time sharing bytes
  (toolchain/buffer_plan.py: 58 MB instead of 2.3 GB for the 1.5B at max_tokens 512). Safe by plugins/pdl.cuh's
  contract (every kernel writes only after its pdl_wait, so a kernel's writes follow every earlier kernel's reads;
  tests/test_kernels_compile.py checks the SASS); off until the GPU suite has run with it (QTRT_SHARE_ACTIVATIONS=1
  turns it on: `QTRT_SHARE_ACTIVATIONS=1 STAGES="tests sanitizer" scripts/device_check.sh`).

Prompt (prefill) steps, m >= gemm_min_m, also have tunings of their own (gemm_wgmma, gemm_xh, concurrent_projections,
prefill_kv_splits, xh_by_producer: see plan() and the perf notes), and:
- gemm_swiglu: where those GEMMs run their wgmma build (compute capability 9.0), the gate and up projections and
  their SwiGLU as one GEMM (fusion.fuse_gate_up_swiglu, plugins/quant_gemm.cu q4k_gemm_swiglu): the gate and up
  outputs never reach memory and the swiglu launch goes; the same bits with gemm_swiglu_split 2. Its launch is the
  op q4k_gemm_swiglu (tuning defines go there, not to q4k_gemm) on the node named after the swiglu (a skip of
  'swiglu' skips it, of 'gate_proj' nothing).
- gemm_swiglu_split: that GEMM's k split over its cluster pair (2: the sums of the plain split GEMMs, so the bits of
  GEMM, GEMM, swiglu) or none (1, the default: each CTA all of k, one chain of sums, other bits, as precise; half the
  CTAs, each twice as long, no exchange: H100, prompts of 512 / 4,096 / 16,384 tokens +6.6 / +3.9 / +3.9%,
  bench/results/device-2026-12-06h).
- add_rms_norm: each residual Add and the RMSNorm of its sum as one launch (fusion.fuse_add_rms_norm,
  plugins/rms_norm.cu add_rms_norm; the final norm stays): the same bits, one launch and one read of the sum less
  (H100: +2.1% on prompts of 512 and 4,096 tokens, +2.3% on the 512-token step).
- prefill_pdl (off): the prompt step's launches as programmatic dependent launches too (tuning pdl's,
  plugins/pdl.cuh), but for the step's first, the ones on side streams (concurrent_projections) and the first after
  such a group joins back; a prefill GEMM then issues its first weight copies in the previous kernel's tail. The same
  bits, but slower on the H100 (512-token step -4.8%, prompts of 512 / 4,096 / 16,384 tokens -4.8 / -2.7 / 0%; not
  profiled), so off.
- chunks_ahead: step_tokens of a prompt chunk that wants no token yet (the engine's chunks of a prompt alone) returns
  while the step runs, at most one such step ahead of the host (step's `wait`): the GPU has the next chunk queued
  while the engine schedules the one after, instead of idling through the host's bookkeeping and launches.
- piece_graphs: such a chunk of the step's full size (max_tokens), and a prompt's last one where it is, replays the
  captured graph forward's pieces replay (prompt_graph; with the device sampler's passes where it wants a token).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import onnx

from . import buffer_plan, cuda_runtime as cr
from .errors import UserError, check_step, check_token_ids
from .fusion import fuse, fuse_add_rms_norm, fuse_gate_up_swiglu
from .gguf_model import GGUFModel
from .device_sampler import parse_logprobs
from .graph import build_model_graph, node_attrs
from .kernels import (ATTN_CLUSTER_KEYS, ATTN_MSCR, ATTN_ONE_BLOCK_KEYS, ATTN_SPLITS, ATTN_THREADS, FUSED_OPS,
                      GEMM_OPS, GEMM_SWIGLU_OF, GEMM_SWIGLU_OPS, LOGPROB_WORDS, MATMUL_OPS,
                      PREFILL_KV_SPLITS, XMERGE_CLUSTER_KEYS, decode_build, decode_tokens, defines_for,
                      gemm_wgmma_defines, launch_config, prefill_attention_scratch, qmv1_dims,
                      SKINNY_OPS, SSQ_CONSUMERS, resident_blocks, skinny_dims, skinny_of, xmerge_defines,
                      xmerge_slot_floats)
from .sampling import Tail

# ONNX op_type -> kernel op (standard ops map to our kernels; custom ops share their names).
KERNEL_OF = {"RMSNormalization": "rms_norm", "Add": "add", "ArgMax": "argmax"}
# Tensor-core GEMMs for prompt prefill: same ABI as the matvec ops, chosen from GEMM_MIN_M tokens. Below it, from
# SKINNY_MIN_M tokens, the tensor-core GEMMs for few tokens (kernels.skinny_of, plugins/quant_gemm_skinny.cu; fused ops
# too); below that, the decode core. Measured in one run (H200, bench/results/device-2026-12-06a/skinny-h200, us per
# step at context 128, decode core / few-token GEMMs / prefill GEMMs): m = 4: 1,711 / 2,370 / 8,309; m = 8: 3,075 /
# 2,322 / 8,421; m = 16: 5,663 / 2,438 / 8,619; m = 32: 11,031 / 4,311 / 9,037. m = 5..7 run the decode core's
# 8-token build, the one timed at m = 8, so the few-token GEMMs take them too. Above 32 (H100, `qtrt bench`
# bench-20261206-115328, few-token / prefill GEMMs): m = 40: 3,658 / 5,456; 48: 3,621 / 5,313; 64: 4,327 / 5,158;
# 96: 5,958 / 4,973 (docs/perf-notes.md "The prefill GEMMs from 65 tokens").
GEMM_OF = {"q4k_matmul": "q4k_gemm", "q6k_matmul": "q6k_gemm"}
# ... and the GEMM of gate, up and SwiGLU at once for the matmuls of each type (fusion.fuse_gate_up_swiglu)
GATE_UP_SWIGLU = {mm: GEMM_SWIGLU_OF[g] for mm, g in GEMM_OF.items()}
GEMM_MIN_M = 65
SKINNY_MIN_M = 5
# Nodes after the last layer: a prompt prefill needs their result for its last token only.
HEAD_NODES = ("final_norm", "lm_head", "argmax")
F32 = np.float32
PROMPT_CHUNK = 512  # the engine's chunk of a prompt (at most the step's rows)
TUNING = {"pdl": True, "m1": True, "qmv1": True, "plain": True, "batched": True, "xmerge": True, "defines": {},
          "pdl_skip": (), "skip": (), "share_activations": os.environ.get("QTRT_SHARE_ACTIVATIONS") == "1",
          "clusters": True, "cache_by_address": False, "gemm_min_m": GEMM_MIN_M,
          "skinny_min_m": SKINNY_MIN_M, "attn_kv_grid": True, "attn_one_block_keys": ATTN_ONE_BLOCK_KEYS,
          "skinny_skip": (), "gemm_wgmma": True, "gemm_xh": True,
          "concurrent_projections": True, "prefill_kv_splits": PREFILL_KV_SPLITS, "xh_by_producer": True,
          "gemm_swiglu": True, "gemm_swiglu_split": 1, "prefill_pdl": False, "add_rms_norm": True,
          "head_rows": True, "attn_narrow": True, "chunks_ahead": True, "piece_graphs": True, "ssq_by_producer": True}
# The kernels TensorRT's plugins get (toolchain/trt/plugins.py, issue 16), run here to prove them on the GPU: no
# thread-block cluster launch (so no cluster k-split, no xmerge pair and no prefill GEMM, whose split-K is a cluster),
# the attention with the caches by address (rope_kv_attention_addr), the general matvec core at every m. With
# fused=False the step is then the TensorRT export's kernel for kernel (the argmax, a standard op there, stays ours).
TENSORRT_BUILDS = {"clusters": False, "cache_by_address": True, "qmv1": False, "m1": False, "xmerge": False}
# Kernels that can write a prefill GEMM's fp16 input themselves (built with XH_OUT=1, plugins/xh_store.cuh): op ->
# the index of their float32 output among their launch arguments (CudaBackend._fold_x_f16). The gate/up/SwiGLU GEMMs
# write it instead of their float32 output, which only the down projection's GEMM reads
# (fusion.fuse_gate_up_swiglu).
XH_PRODUCERS = {"rms_norm": -1, "add_rms_norm": -1, "swiglu": -1, "prefill_attention": -3,
                **{op: -1 for op in GEMM_SWIGLU_OPS}}
# Prefill GEMMs that read an input x (so as the GEMM_XH build's fp16 copy)
X_GEMMS = GEMM_OPS + GEMM_SWIGLU_OPS


def prefill_graphs(graph: onnx.ModelProto) -> dict[tuple[bool, bool], onnx.ModelProto]:
    """The prompt steps' graphs, by (gemm_swiglu, add_rms_norm) (the tunings): the unfused graph, so each projection
    can be a tensor-core GEMM; with each layer's gate, up and SwiGLU as one node (fusion.fuse_gate_up_swiglu); with
    each residual Add and the RMSNorm of its sum as one (fusion.fuse_add_rms_norm, the final norm left alone: a
    last-only plan runs it on one row); with both. Their values' lifetimes all count in the shared activation pool."""
    swiglu = fuse_gate_up_swiglu(graph, GATE_UP_SWIGLU)
    return {(False, False): graph, (True, False): swiglu,
            (False, True): fuse_add_rms_norm(graph, "add_rms_norm", keep=HEAD_NODES[:1]),
            (True, True): fuse_add_rms_norm(swiglu, "add_rms_norm", keep=HEAD_NODES[:1])}


@dataclass
class Launch:
    node: str
    op: str
    kernel: object
    cfg: object
    args: list
    source: int = 0  # a prefill GEMM's input as the graph has it (args[0] may be its fp16 copy): sibling_projections
    defines: dict | None = None  # what its kernel was built from (None: made elsewhere, e.g. the device sampler's)


def sibling_projections(launches: list[Launch]) -> list[list[Launch]]:
    """The launches in order, grouped: consecutive prefill GEMMs that read the same input (q, k and v; gate and up
    where they are not one GEMM, gemm_swiglu) form one group, every other launch is a group of its own. The members
    of a group only read that input and their own weights and write outputs nobody else in the group reads, so they
    may run side by side. (The matvec ops of a long step, e.g. the 0.5B's Q5_0 / Q8_0 projections, could too; not
    measured, so not grouped.)"""
    groups: list[list[Launch]] = []
    for launch in launches:
        last = groups[-1][-1] if groups else None
        if launch.op in GEMM_OPS and last is not None and last.op in GEMM_OPS and last.source == launch.source:
            groups[-1].append(launch)
        else:
            groups.append([launch])
    return groups


class CudaBackend:
    name = "cuda"

    def __init__(self, model: GGUFModel, max_context: int, n_slots: int = 1, max_tokens: int = 64,
                 fused: bool = True, tuning: dict | None = None, progress=None,
                 prepare: bool = False, prepare_sampled: Tail | None = None,
                 weights_upload: cr.BackgroundUpload | None = None):
        """`weights_upload`: the model's tensor data already on its way to the GPU (upload_weights(), started by
        the caller before its other start-up work); by default it starts here, beside the graph building."""
        self.model, self.cfg = model, model.config
        upload = weights_upload or cr.upload_weights(model)
        self.max_context, self.n_slots, self.max_tokens = max_context, n_slots, max_tokens
        # the engine's prompt chunk on this backend (toolchain/engine.py DEVICE_PREFILL_CHUNK has its measurements):
        # its whole chunks replay a captured graph too (_piece_graph), whatever the step's size
        self.prompt_chunk = min(PROMPT_CHUNK, max_tokens)
        self.tuning = {**TUNING, **(tuning or {})}
        self._cc: tuple[int, int] | None = None  # the GPU's compute capability, asked once (_gemm_wgmma)
        from .progress import quiet

        progress = progress or quiet()
        with progress.stage("starting CUDA"):
            cr.init()
        self.stream = cr.Stream()
        self._fork, self._side = cr.Event(), []  # side streams of _launch_side_by_side, made when first needed
        with progress.stage("building the step graphs"):
            graph, arrays = build_model_graph(model)
            self.onnx = fuse(graph) if fused else graph  # decode steps: few launches per layer
            self.prefill_graphs = prefill_graphs(graph)  # many tokens: so each projection can be a tensor-core GEMM
        with progress.stage("uploading weights"):
            self.weights, region = self._weights_on_device(arrays, upload)
        if upload is not None:
            progress.times["weights copy (beside the above)"] = upload.seconds
        c = self.cfg
        cache_shape = (n_slots, c.n_kv_heads, max_context, c.head_dim)
        self.buffers: dict[str, cr.DeviceBuffer] = dict(self.weights)
        if region is not None:
            self.buffers["weights.region"] = region  # freed by close()
        for i in range(c.n_layers):
            for kind in "kv":
                buf = cr.DeviceBuffer.zeros(cache_shape, np.float16)
                self.buffers[f"{kind}_cache.{i}"] = buf
                self.buffers[f"L{i}.{kind}_cache_out"] = buf  # the attention op updates the cache in place
        # the step's inputs in one allocation, so one copy sets them (_set_inputs); the last two: the positions and
        # slots of a gathered head's rows (plan head_last), which its device sampler reads
        inputs = ("token_ids", "positions", "slots", "head.positions", "head.slots")
        self.buffers["step_inputs"] = cr.DeviceBuffer.zeros((len(inputs), max_tokens), np.int32)
        for k, name in enumerate(inputs):
            self.buffers[name] = cr.DeviceView(self.buffers["step_inputs"], 4 * k * max_tokens, 4 * max_tokens,
                                               (max_tokens,), np.int32)
        self._host_inputs = np.zeros((len(inputs), max_tokens), np.int32)
        with progress.stage("shape inference"):
            self.widths = self._value_widths()
        self.buffers["prefill.q_rot"] = cr.DeviceBuffer.zeros((max_tokens, c.q_dim), np.float32)
        # a prefill GEMM's input as fp16 (gemm_x_f16, for the wgmma GEMMs' GEMM_XH build), two buffers taken in turn:
        # the gate/up/SwiGLU GEMM reads one while it writes the down projection's input into the other
        for name in ("prefill.x_f16", "prefill.x_f16.b"):
            self.buffers[name] = cr.DeviceBuffer.zeros((max_tokens, max(c.hidden, c.q_dim, c.ffn)), np.float16)
        # prefill_attention's split keys: partials and a counter per row block (the largest split count asked for),
        # where a prefill plan can run it (prefill steps on the cluster builds; not TensorRT's)
        prefill = self.tuning["clusters"] and max_tokens >= self.tuning["gemm_min_m"]
        self._pa_splits = max(PREFILL_KV_SPLITS, int(self.tuning["prefill_kv_splits"])) if prefill else 0
        if prefill:
            part, count = prefill_attention_scratch(max_tokens, c.n_heads, c.n_kv_heads, c.head_dim, self._pa_splits)
            self.buffers["prefill.attn_part"] = cr.DeviceBuffer.zeros((part,), np.float32)
            self.buffers["prefill.attn_count"] = cr.DeviceBuffer.zeros((count,), np.int32)
        # the sums of x^2 per 16 columns that a few-token matmul_add writes for the fused GEMM after it
        # (ssq_by_producer), two buffers taken in turn
        for name in ("skinny.ssq", "skinny.ssq.b"):
            self.buffers[name] = cr.DeviceBuffer.zeros((max_tokens, -(-c.hidden // 16)), np.float32)
        # the attention's cluster partials for its consumer (xmerge): one slot per cluster of a kv head
        self.buffers["attn.xpart"] = cr.DeviceBuffer.zeros(
            (c.n_heads // c.n_kv_heads, xmerge_slot_floats(c.n_heads, c.head_dim)), np.float32)
        self._allocate_activations()
        self._modules: dict = {}
        self._resident: dict = {}  # blocks of a build resident at once (_narrow_attention)
        self._plans: dict[int, list[Launch]] = {}
        self._graphs: dict[tuple, object] = {}
        self._sampler = None
        self._pinned, self._pinned_lp, self._pin_next = None, None, 0  # launch_decode's two host buffers of tokens
        # (and of logprob records)
        self._ahead, self._ahead_next = [cr.Event(), cr.Event()], 0  # step(wait=False): the last two such steps
        self.pos = 0
        if prepare:
            with progress.stage("loading kernels and capturing the decode step"):
                self.decode_graph(1)
                if prepare_sampled:  # the step with the device sampler, before the first token's clock starts
                    self.decode_graph(1, tail=prepare_sampled)
            with progress.stage("loading kernels and capturing the prompt step"):
                self.prepare_prompt_steps()

    def prepare_prompt_steps(self):
        """Do at start-up what a first prompt through forward (qtrt generate, chat) would otherwise pay before its
        first token (a fresh `qtrt generate` of a 3,482-token prompt took ~45 ms more than the warm figure on the
        H100, bench/results/device-2026-12-06h): capture the whole piece's graph (forward's pieces of max_tokens)
        and load the modules of the shorter pieces' three kernel paths (a prompt's last piece, a chat's next turn):
        the prefill GEMMs, the GEMMs for few tokens, the decode core's batched builds. Their plans are built too; a
        plan is per m (and per sampler tail), so other remainders and the engine's steps (qtrt serve: the same
        modules) build theirs on first use, host work only."""
        for m in {self.max_tokens, self.prompt_chunk} - {1}:  # (pieces of one token are decode steps)
            for long in {False, self._prompt_long_context(m, True)}:
                self.prompt_graph(m, long)
        lo, hi = self.tuning["skinny_min_m"], self.tuning["gemm_min_m"]
        # the decode core's 2- and 4-token builds, the GEMMs for few tokens up to and beyond ATTN_MSCR tokens (the
        # attention's grids differ), the prefill GEMMs
        for m in sorted({2, lo - 1, lo, ATTN_MSCR + 1, hi}):
            if 1 < m < self.max_tokens:
                for long in (False, True):  # the decode attention's two grids (one plan on the prefill GEMMs)
                    self.plan(m, last_only=True, long_context=long)

    def prompt_graph(self, m: int, long_context: bool = False, tail: Tail | None = None):
        """The captured graph of a prompt piece of m tokens, the head on its last row (forward's whole pieces; `qtrt
        bench` times the same; the engine's whole chunks of a prompt alone, with the device sampler's passes `tail`
        on that row where it wants a token: tuning piece_graphs). Its slot and positions are the step's inputs, read
        on the device. Its plan is built first, outside the capture (module loads)."""
        long_context = self._prompt_long_context(m, long_context)
        key = ("prompt", m, long_context, tail)
        if key not in self._graphs:
            sampled = 1 if tail else 0
            self.plan(m, last_only=True, long_context=long_context, tail=tail, sampled=sampled)
            self._graphs[key] = cr.capture(
                self.stream, lambda: self.run_plan(m, last_only=True, long_context=long_context, tail=tail,
                                                   sampled=sampled))
        return self._graphs[key]

    def _piece_graph(self, piece: bool, m: int) -> bool:
        """Whether a step replays prompt_graph: a prompt piece alone (_prompt_piece) of the step's full size or of
        the engine's chunk, the engine's whole chunks of a prompt while nothing decodes beside it (tuning
        piece_graphs), instead of its ~370 launches from Python (an idle engine's 512-token prompt took 9.4 ms to its
        first token that way, 7.7 replayed, forward's graph 6.6: H100, bench/results/device-2026-12-07). The graph
        with the device sampler's passes is captured at the first such chunk that wants a token (host work, once
        per sampler tail)."""
        return piece and m in (self.max_tokens, self.prompt_chunk) and self.tuning["piece_graphs"]

    def _prompt_long_context(self, m: int, long_context: bool) -> bool:
        """long_context as a prompt piece's plan sees it: a piece on the prefill GEMMs runs the prefill attention,
        whatever its depth (long_context only chooses the decode attention's grid), so it has one plan, not a
        second one captured half way into a long prompt."""
        return long_context and not (self.tuning["clusters"] and not self._below_gemm(m))

    @staticmethod
    def _weights_on_device(arrays: dict, upload) -> tuple[dict, object]:
        """Device buffers of the graph's weights: views into the uploaded region for the arrays that lie in it at a
        16-byte multiple (kernels load 16 bytes at a time), their own copies for the rest (e.g. zero biases).
        Returns them and the region's buffer (None without an upload)."""
        region = upload.result() if upload is not None else None
        out = {}
        for name, a in arrays.items():
            off = a.ctypes.data - upload.host.ctypes.data if region is not None else -1
            if 0 <= off and off + a.nbytes <= upload.host.nbytes and off % 16 == 0 and a.flags.c_contiguous:
                out[name] = cr.DeviceView(region, off, a.nbytes, a.shape, a.dtype)
            else:
                out[name] = cr.DeviceBuffer.from_numpy(a)
        return out, region

    def _allocate_activations(self):
        """A buffer of max_tokens rows for every value of the graphs not allocated yet; with the tuning's
        share_activations, the intermediate ones as views into one pool (toolchain/buffer_plan.py)."""
        rows = self.max_tokens
        todo = {n: wd for n, wd in self.widths.items() if n not in self.buffers}
        sizes = {n: rows * w * np.dtype(d).itemsize for n, (w, d) in todo.items()}
        offsets = {}
        if self.tuning["share_activations"]:
            total, offsets = buffer_plan.share([self.onnx.graph] + [g.graph for g in self.prefill_graphs.values()],
                                               sizes)
            self.buffers["activations"] = pool = cr.DeviceBuffer.zeros((total,), np.uint8)
            for n, at in offsets.items():
                self.buffers[n] = cr.DeviceView(pool, at, sizes[n], (rows, todo[n][0]), todo[n][1])
        for n, (width, dtype) in todo.items():
            if n not in offsets:  # graph outputs (logits, next_token): read after the step
                self.buffers[n] = cr.DeviceBuffer.zeros((rows, width), dtype)

    # -- planning ---------------------------------------------------------------------------------------------
    def _value_widths(self) -> dict[str, tuple[int, type]]:
        """Row width and dtype of every activation the graph produces (from ONNX shape inference)."""
        out = {}
        values = []
        unfused = self.prefill_graphs[False, False]  # every other graph's values are among these two's
        for g in {id(self.onnx): self.onnx, id(unfused): unfused}.values():
            inferred = onnx.shape_inference.infer_shapes(g)
            values += list(inferred.graph.value_info) + list(inferred.graph.output)
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_value for d in t.shape.dim]
            if len(dims) == 2 and dims[1]:
                out[v.name] = (dims[1], onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
            elif len(dims) == 1:
                out[v.name] = (1, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        return out

    def _kernel(self, op: str, defines: dict):
        key = (op, tuple(sorted(defines.items())))
        if key not in self._modules:
            self._modules[key] = cr.load_op(op, defines)
        return self._modules[key]

    def _dims(self, node, op, attrs, m) -> dict:
        c = self.cfg
        dims = dict(attrs, m=m)
        if op in ("rms_norm", "add_rms_norm"):
            dims["hidden"] = c.hidden
        elif op in ("add", "swiglu"):
            dims["numel"] = m * self.widths[node.output[0]][0]
        elif op == "argmax" or op.endswith("_gather"):
            dims["vocab"] = c.vocab
        elif op.endswith("_matmul") or op == "matmul_add" or op in GEMM_SWIGLU_OPS:
            dims["n"], dims["k"] = attrs["out_features"], attrs["in_features"]
        elif op == "rope_kv_attention":
            dims.update(n_slots=self.n_slots, max_seq=self.max_context)
        elif op in ("rms_norm_qkv", "rms_norm_swiglu"):
            dims["hidden"] = c.hidden
        return dims

    def _xmerge_keys(self) -> int:
        """Keys per attention cluster in the xmerge pair: the tuning's attention define, else the pair's default."""
        return int(self.tuning["defines"].get("rope_kv_attention", {}).get("ATTN_CLUSTER_KEYS", XMERGE_CLUSTER_KEYS))

    def _attention_keys(self) -> int:
        """Keys per attention cluster in the plans without the xmerge pair: the tuning's define, else the build's."""
        return int(self.tuning["defines"].get("rope_kv_attention", {}).get("ATTN_CLUSTER_KEYS", ATTN_CLUSTER_KEYS))

    def _kv_grid(self) -> bool:
        """Whether the tuning launches the attention as one cluster per (token, kv head) where that is all it uses
        (ATTN_KVGRID: steps of more than ATTN_MSCR tokens, and steps within one cluster's keys)."""
        return bool(self.tuning["attn_kv_grid"]) and bool(self.tuning["clusters"])

    def _narrow_attention(self, m: int, defines: dict) -> bool:
        """Whether an attention launch of m tokens as one cluster per (token, kv head) (the ATTN_KVGRID build of
        `defines`) takes clusters of 4 blocks (tuning attn_narrow, the ATTN_GX=4 build): where its clusters of 8
        would not all be resident at once, by the build's registers (the 1.5B's, ~210 a thread: one 256-thread block
        per SM, so 16 tokens x 2 kv heads x 8 blocks are two waves on an H100's 132 SMs, one wave in 4-block clusters;
        the 0.5B's 128: two blocks per SM)."""
        if not self.tuning["attn_narrow"]:
            return False
        key = tuple(sorted(defines.items()))
        if key not in self._resident:
            kern = self._kernel("rope_kv_attention", defines)
            self._resident[key] = resident_blocks(kern.attribute("NUM_REGS"), ATTN_THREADS, cr.sm_count(),
                                                  kern.attribute("SHARED_SIZE_BYTES"))
        return m * self.cfg.n_kv_heads * ATTN_SPLITS > self._resident[key]

    def _one_block_keys(self) -> int:
        """Tuning attn_one_block_keys where the attention may be launched without clusters (0: not)."""
        return int(self.tuning["attn_one_block_keys"]) if self.tuning["clusters"] else 0

    def long_context(self, position: int, m: int = 1) -> bool:
        """Whether a step of m tokens whose furthest row is at `position` takes its plan for long contexts. For m = 1
        (tuning xmerge) that plan pairs the attention's clusters with the o projection; for m <= ATTN_MSCR (tuning
        attn_kv_grid) the short plan launches one cluster per (token, kv head) instead of the full grid, whose other
        clusters would leave at once (the same bits); for more tokens (tuning attn_one_block_keys) the short plan
        runs one block per (token, kv head) without a cluster. Without those tunings, one plan: False."""
        keys = [self._xmerge_keys()] if m == 1 and self._xmerge() else []
        keys += [self._attention_keys()] if m <= ATTN_MSCR and self._kv_grid() else []
        keys += [self._one_block_keys()] if m > ATTN_MSCR and self._one_block_keys() else []
        return bool(keys) and position + 1 > min(keys)

    def _xmerge(self) -> bool:
        """Whether the tuning pairs attention and o projection (only the cluster builds have the partials)."""
        return bool(self.tuning["xmerge"]) and bool(self.tuning["clusters"])

    def _gemm_wgmma(self) -> bool:
        """Whether the prefill GEMMs run their wgmma build: the tuning asks for it, the split-K cluster is allowed, and
        the GPU is compute capability 9.0 (the build is sm_90a: it loads nowhere else)."""
        if not (self.tuning["gemm_wgmma"] and self.tuning["clusters"]):
            return False
        if self._cc is None:
            self._cc = cr.compute_capability()
        return self._cc == (9, 0)

    def plan(self, m: int, last_only: bool = False, long_context: bool = False, tail: Tail | None = None,
             sampled: int = 0, piece_from: int | None = None, head_rows: int = 0,
             head_last: bool = False) -> list[Launch]:
        """Resolve every node of the graph into a launch for a step of m tokens (cached). With last_only (prompt
        prefill), the head (final norm, lm_head, argmax) runs on the last token's row only: logits row 0. With
        long_context (see long_context()): for m = 1 the xmerge pairs, for m <= ATTN_MSCR the attention's full grid
        (without it, where the tuning has attn_kv_grid: one cluster per (token, kv head)), for more tokens one
        cluster per (token, kv head) (without it, where the tuning has attn_one_block_keys: one block). With a
        `tail`, its device sampler passes at the argmax (toolchain/device_sampler.py; the draw replaces it) for the
        first `sampled` entries of its row list (default: m). With piece_from = d (a step on the prefill GEMMs):
        rows d .. m - 1 are one slot's prompt piece (consecutive positions, a slot no earlier row has), whose
        attention runs as the prefill pair, the rows before it as the decode attention (the engine's decode rows
        beside a prompt chunk); last_only implies d = 0. With head_rows = h (0 < h < m, not last_only): the head runs
        on the step's first h rows only (logits and tokens rows 0 .. h - 1), as a step of h tokens picks its kernels:
        the engine's decode rows beside a prompt chunk whose last row is not wanted yet need no head over the chunk's
        hundreds of rows (an lm_head GEMM over the vocabulary, and its logits written and read). With head_last too,
        the head's last row is the step's row m - 1 (its others rows 0 .. h - 2): the final norm gathers it (a second
        launch of one row) and the device sampler reads the head's rows' positions and slots from head.positions /
        head.slots (_set_inputs): the decode rows beside a prompt's last chunk."""
        gemm = not self._below_gemm(m) and self.tuning["clusters"]
        if last_only:
            long_context = self._prompt_long_context(m, long_context)
            piece_from = 0
        if not gemm or piece_from is not None and not 0 <= piece_from < m - 1:
            piece_from = None  # (only the prefill GEMMs' steps have the prefill attention; a piece has 2+ rows)
        xmerge = m == 1 and long_context and self._xmerge()
        kv_grid = self._kv_grid() and (m > ATTN_MSCR or not long_context)
        one_block = self._one_block_keys() > 0 and m > ATTN_MSCR and not long_context
        head_rows = head_rows if self.tuning["head_rows"] else 0  # (tuning head_rows off: every row, as before)
        head_m = 1 if last_only else head_rows if 0 < head_rows < m else m  # the head's rows
        head_rows = head_m if head_m < m and not last_only else 0
        head_last = bool(head_last and head_rows)
        sampled = (sampled or head_m) if tail else 0
        if sampled > head_m:
            raise ValueError(f"{sampled} rows sampled of a head of {head_m}")
        key = (m, last_only, xmerge, kv_grid, one_block, tail, sampled, head_rows, head_last, piece_from)
        if tail and last_only and sampled != 1:
            raise ValueError("a prompt piece's plan (last_only) samples its last row alone (sampled=1)")
        if key in self._plans:
            return self._plans[key]
        clusters = self.tuning["clusters"]
        swiglu_split = int(self.tuning["gemm_swiglu_split"])
        if swiglu_split not in (1, 2):
            raise ValueError(f"tuning gemm_swiglu_split={swiglu_split}: 2 (the k split) or 1 (none)")
        graph = self.onnx
        if gemm:  # gate, up and SwiGLU as one GEMM where its wgmma build runs, Add + RMSNorm as one launch (tunings)
            graph = self.prefill_graphs[bool(self.tuning["gemm_swiglu"] and self._gemm_wgmma()),
                                        bool(self.tuning["add_rms_norm"])]
        nodes = []  # (node, op, attrs, dims, defines, head) of every node, then the launches
        for node in graph.graph.node:
            head = last_only and node.name in HEAD_NODES  # reads the step's last row
            node_m = head_m if node.name in HEAD_NODES else m
            node_gemm = gemm and not head and (node_m == m or not self._below_gemm(node_m))
            op = KERNEL_OF.get(node.op_type, node.op_type)
            attrs = {k: v for k, v in node_attrs(node).items() if k != "plugin_namespace"}
            if node.op_type in ("RMSNormalization", "add_rms_norm"):
                attrs = {"epsilon": attrs["epsilon"]}
            elif node.op_type == "ArgMax":
                attrs = {}
            dims = self._dims(node, op, attrs, node_m)
            if node_gemm and op in GEMM_OF:
                op = GEMM_OF[op]
            elif (self._skinny(node_m) and not head and not self._stays_on_decode_core(op, dims)
                  and (twin := skinny_of(op, attrs))):  # the fused ops too, where their types allow
                op, attrs = twin, dict(attrs, hidden=self.cfg.hidden)
            if op == "rope_kv_attention" and self.tuning["cache_by_address"]:
                op = "rope_kv_attention_addr"
            defines = defines_for(op, attrs, clusters)
            if op in X_GEMMS and self._gemm_wgmma():  # the prefill GEMM on Hopper's warpgroup MMA
                defines = defines | gemm_wgmma_defines(bool(self.tuning["gemm_xh"]))
                if op in GEMM_SWIGLU_OPS and swiglu_split == 1:
                    defines |= {"GEMM_SPLIT": 1}
            k = dims.get("k", dims.get("hidden"))
            # decode builds: a step of one token, one row of the head, batched decode (below the GEMM's threshold)
            if (dims["m"] == 1 or (self.tuning["batched"] and not node_gemm)) and op in MATMUL_OPS + FUSED_OPS:
                defines = decode_build(op, attrs, k, self.tuning["qmv1"], self.tuning["m1"], self.tuning["plain"],
                                       clusters, decode_tokens(dims["m"]))
            # tuning defines per op, or per op@k for one projection shape only (e.g. matmul_add@1536)
            defines |= self.tuning["defines"].get(op, {}) | self.tuning["defines"].get(f"{op}@{k}", {})
            if "QMV1" in defines:
                dims |= qmv1_dims(defines)
            if op in SKINNY_OPS:  # its stages (tuning defines) decide its shared memory
                dims |= skinny_dims(defines)
            if defines.get("GEMM_WGMMA"):  # its build (tuning defines included) decides its tile and shared memory
                dims |= {"gemm_wgmma": 1, "gemm_xh": int(bool(defines.get("GEMM_XH"))),
                         "gemm_split": int(defines.get("GEMM_SPLIT", 2))}
            # one cluster per (token, kv head) where that is all the attention uses: steps of more than ATTN_MSCR
            # tokens, and short contexts (long_context; the same bits: plugins/rope_kv_attention.cu ATTN_KVGRID)
            if op == "rope_kv_attention" and (kv_grid or one_block):  # one block: the build without clusters
                defines = (defines_for(op, attrs, clusters=False) if one_block else defines) | {"ATTN_KVGRID": 1}
                dims["attn_kv_grid"] = 1
                # clusters of 4 blocks where 8-block ones of the launch's tokens (a mixed step's: its decode rows)
                # would not all be resident at once (tuning attn_narrow)
                if not one_block and self._narrow_attention(m if piece_from is None else piece_from, defines):
                    defines |= {"ATTN_GX": 4}
                    dims["attn_gx"] = 4
            nodes.append((node, op, attrs, dims, defines, head))
        extra = self._link_xmerge(nodes) if xmerge else {}
        launches, converted = [], None  # converted: the GEMM input now in fp16 in xh_bufs[xh_next ^ 1]
        xh_bufs, xh_next = [self.buffers["prefill.x_f16"].ptr, self.buffers["prefill.x_f16.b"].ptr], 0
        for node, op, attrs, dims, defines, head in nodes:
            kern = self._kernel(op, defines)
            cfg = launch_config(op, dims, clusters=clusters and defines.get("ATTN_CLUSTER", 1) != 0)
            ins = [self.buffers[i].ptr for i in node.input]
            if op not in X_GEMMS:  # buffers are reused across tensors: a conversion serves the GEMMs right after it
                converted = None
            source = ins[0] if ins else 0
            if defines.get("GEMM_XH"):  # x as fp16 in the fragments' order: made once per input (q, k, v share it)
                if converted != ins[0]:  # into the other buffer than the last input's (read by its producer)
                    launches.append(self._x_f16(node.input[0], ins[0], dims["m"], dims["k"], xh_bufs[xh_next]))
                    converted, xh_next = ins[0], xh_next ^ 1
                ins[0] = xh_bufs[xh_next ^ 1]
            if head and node.name == HEAD_NODES[0]:  # read the last token's hidden row
                width, dtype = self.widths[node.input[0]]
                ins[0] += (m - 1) * width * np.dtype(dtype).itemsize
            outs = [self.buffers[o].ptr for o in node.output]
            if head_last and node.name == HEAD_NODES[0]:  # rows 0 .. h - 2, then row m - 1 into the head's row h - 1
                if op != "rms_norm":
                    raise ValueError(f"a gathered head needs the final norm alone (node {node.name} is {op})")
                row_in, row_out = (self.widths[x][0] * np.dtype(self.widths[x][1]).itemsize
                                   for x in (node.input[0], node.output[0]))
                for rows, at, to in ((head_m - 1, 0, 0), (1, (m - 1) * row_in, (head_m - 1) * row_out)):
                    if rows:
                        part = launch_config(op, dims | {"m": rows})
                        launches.append(Launch(node.name + (".last" if at else ""), op, kern, part,
                                               [ins[0] + at, *ins[1:], *part.scalars, outs[0] + to],
                                               ins[0] + at, defines))
                continue
            if op == "rope_kv_attention_addr":  # q, k, v, the caches' addresses, positions, slots -> out
                ins, outs = ins[:3] + [self._cache_addresses(node.input[3], node.input[4])] + ins[5:], outs[:1]
            if op == "rope_kv_attention" and piece_from is not None:  # one slot's prompt: the tiled prefill pair
                d = piece_from
                if d:  # the rows before the piece: the decode attention over their own slots
                    dec = launch_config(op, dims | {"m": d}, clusters=clusters and defines.get("ATTN_CLUSTER", 1) != 0)
                    launches.append(Launch(node.name + ".decode", op, kern, dec, ins + list(dec.scalars) + outs,
                                           source, defines))
                rows = [d * self.widths[x][0] * np.dtype(self.widths[x][1]).itemsize
                        for x in (*node.input[:3], node.output[0])]
                ins = [ins[0] + rows[0], ins[1] + rows[1], ins[2] + rows[2], *ins[3:5], ins[5] + 4 * d, ins[6] + 4 * d]
                launches += self._prefill_attention(node, attrs, dims | {"m": m - d}, ins, [outs[0] + rows[3]])
                continue
            args = ins + list(cfg.scalars) + outs + extra.get(node.name, [])
            if tail and op == "argmax":  # penalties on the logits before it, the draw and logprobs after it
                b = self.buffers
                # last_only: the head's row 0 is the step's row m - 1 (its slot, and its position for the draw); a
                # gathered head: its rows' own (head_last)
                last = 4 * (m - 1) if last_only else 0
                slots, positions = ((b["head.slots"].ptr, b["head.positions"].ptr) if head_last
                                    else (b["slots"].ptr + last, b["positions"].ptr + last))
                before, after = self.sampler.launches(sampled, b["logits"].ptr, b["next_token"].ptr, slots,
                                                      positions, tail)
                # the draw takes the argmax itself (greedy rows: the same bits): this launch goes, where it runs
                launches += [Launch(*x) for x in before]
                if not tail.draw:
                    launches.append(Launch(node.name, op, kern, cfg, args, defines=defines))
                launches += [Launch(*x) for x in after]
                continue
            launches.append(Launch(node.name, op, kern, cfg, args, source, defines))
        advance = self._kernel("decode_advance", {})
        cfg = launch_config("decode_advance", {"m": m})
        launches.append(Launch("advance", "decode_advance", advance, cfg,
                               [self.buffers["next_token"].ptr, *cfg.scalars, self.buffers["token_ids"].ptr,
                                self.buffers["positions"].ptr], defines={}))
        if self.tuning["xh_by_producer"]:
            launches = self._fold_x_f16(launches)
        if self.tuning["ssq_by_producer"]:
            launches = self._link_ssq(launches)
        self._plans[key] = launches
        return launches

    def _cache_addresses(self, k_cache: str, v_cache: str) -> int:
        """Device address of an int64 [2] holding the two caches' addresses (rope_kv_attention_addr's input, as the
        TensorRT runner keeps one per layer)."""
        name = f"{k_cache}+{v_cache}.addr"
        if name not in self.buffers:
            addr = np.array([self.buffers[k_cache].ptr, self.buffers[v_cache].ptr], np.uint64)
            self.buffers[name] = cr.DeviceBuffer.from_numpy(addr)
        return self.buffers[name].ptr

    def _link_xmerge(self, nodes) -> dict[str, list]:
        """Batch-1 plan: pair each attention with the o projection that alone reads its output, where that one runs
        on the decode core (matmul_add with QMV1); both builds get their xmerge defines (in place, with
        _xmerge_keys() keys per cluster). Returns the extra arguments of
        the paired nodes by name: the partials buffer, and for the o projection the step's positions too."""
        readers: dict[str, list] = {}
        for rec in nodes:
            for i in rec[0].input:
                readers.setdefault(i, []).append(rec)
        extra, outputs = {}, {o.name for o in self.onnx.graph.output}
        xpart, positions = self.buffers["attn.xpart"].ptr, self.buffers["positions"].ptr
        for node, op, attrs, _, defines, _ in nodes:
            if op != "rope_kv_attention" or node.output[0] in outputs:
                continue
            users = readers.get(node.output[0], [])
            if len(users) == 1 and users[0][1] == "matmul_add" and "QMV1" in users[0][4]:
                attn, o_proj = xmerge_defines(attrs, self._xmerge_keys())
                defines.update(attn)
                users[0][4].update(o_proj)
                extra[node.name], extra[users[0][0].name] = [xpart], [xpart, positions]
        return extra

    def _x_f16(self, name: str, x: int, m: int, k: int, xh: int) -> Launch:
        """The launch that writes GEMM input x (tensor `name`, m x k floats) as fp16 in the fragments' order into
        xh (one of the prefill.x_f16 buffers), for the wgmma GEMMs' GEMM_XH build (plugins/quant_gemm.cu gemm_x_f16).
        Named after the tensor, not a GEMM, so that a tuning's skip of one projection leaves its siblings' input in
        place."""
        cfg = launch_config("gemm_x_f16", {"m": m, "k": k})
        defines = gemm_wgmma_defines(True)
        return Launch(name + ".x_f16", "gemm_x_f16", self._kernel("gemm_x_f16", defines), cfg,
                      [x, *cfg.scalars, xh], defines=defines)

    def _rebuilt(self, launch: Launch, defines: dict, args: list) -> Launch:
        """`launch` on the build of its op with `defines` added, `args` appended to its arguments (an extra output or
        input that build takes)."""
        built = launch.defines | defines
        return replace(launch, kernel=self._kernel(launch.op, built), args=launch.args + args, defines=built)

    def _fold_x_f16(self, launches: list[Launch]) -> list[Launch]:
        """The plan with each gemm_x_f16 conversion folded into the launch right before it where that one produced
        the converted tensor and can write the fp16 copy itself (XH_PRODUCERS: the same build, its Launch.defines,
        with XH_OUT=1 and the fp16 buffer as one more output; the same bits, plugins/xh_store.cuh): one launch and
        one read of the activation less per GEMM input. Nothing runs between the producer and the GEMMs either
        way."""
        out: list[Launch] = []
        for launch in launches:
            prev = out[-1] if out else None
            if (launch.op == "gemm_x_f16" and prev is not None and prev.op in XH_PRODUCERS
                    and prev.defines is not None and prev.args[XH_PRODUCERS[prev.op]] == launch.args[0]):
                out[-1] = self._rebuilt(prev, {"XH_OUT": 1}, [launch.args[-1]])
                continue
            out.append(launch)
        return out

    def _link_ssq(self, launches: list[Launch]) -> list[Launch]:
        """The plan with each fused GEMM for few tokens (rms_norm_qkv_skinny, rms_norm_swiglu_skinny) that reads the
        output of the matmul_add_skinny right before it taking its RMSNorm's sums of x^2 from that one: the producer
        built with SK_SSQ_OUT=1 writes them (per 16 columns, one more output), the consumer with SK_SSQ_IN=1 reads them
        (one more input) instead of a pass over x (plugins/quant_gemm_skinny.cu). Two buffers in turn (one would do: a
        producer writes after its pdl_wait, when the consumer before it has finished; the second keeps that from
        resting on every kernel in between waiting too). Every other launch stays as it is: layer 0's QKV (it reads
        the embedding), builds other than 8-warp tiles (SK_WARPS=16 stores 8 columns a warp), launches a tuning's
        `skip` leaves out (a consumer would read sums nobody wrote)."""
        out: list[Launch] = []
        bufs, turn = [self.buffers["skinny.ssq"].ptr, self.buffers["skinny.ssq.b"].ptr], 0
        rows = self.buffers["skinny.ssq"].shape[0]
        hidden = self.cfg.hidden
        for launch in launches:
            prev = out[-1] if out else None
            if (launch.op in SSQ_CONSUMERS and prev is not None and prev.op == "matmul_add_skinny"
                    and prev.defines is not None and launch.defines is not None
                    and not {"SK_SSQ_OUT", "SK_SSQ_IN"} & (prev.defines.keys() | launch.defines.keys())
                    and skinny_dims(prev.defines)["sk_warps"] == 8
                    and not self._skipped(prev) and not self._skipped(launch)
                    and prev.args[-1] == launch.args[0] and hidden % 16 == 0
                    and prev.cfg.scalars[:2] == (launch.cfg.scalars[0], hidden) and launch.cfg.scalars[0] <= rows):
                out[-1] = self._rebuilt(prev, {"SK_SSQ_OUT": 1}, [bufs[turn]])
                launch = self._rebuilt(launch, {"SK_SSQ_IN": 1}, [bufs[turn]])
                turn ^= 1
            out.append(launch)
        return out

    def _prefill_attention(self, node, attrs, dims, ins, outs) -> list[Launch]:
        """The attention node of a single-slot prompt as two kernels: RoPE + cache append for all m tokens, then
        causal attention over tiles of queries (plugins/prefill_attention.cu). Same semantics as the node."""
        q, k, v, k_cache, v_cache, positions, slots = ins
        q_rot = self.buffers["prefill.q_rot"].ptr
        defines = defines_for("rope_kv_append", attrs)
        splits = int(self.tuning["prefill_kv_splits"])
        if not 1 <= splits <= self._pa_splits:
            raise ValueError(f"tuning prefill_kv_splits={splits}: this backend made split scratch for at most "
                             f"{self._pa_splits} (for its tuning at construction)")
        a = launch_config("rope_kv_append", dims)
        b = launch_config("prefill_attention", dims | {"pa_splits": splits})
        tuned = defines | self.tuning["defines"].get("prefill_attention", {})  # e.g. PA_SPLIT_TILES
        return [Launch(node.name + ".append", "rope_kv_append", self._kernel("rope_kv_append", defines), a,
                       [q, k, v, positions, slots, *a.scalars, q_rot, k_cache, v_cache], defines=defines),
                Launch(node.name, "prefill_attention", self._kernel("prefill_attention", tuned), b,
                       [q_rot, k_cache, v_cache, positions, slots, *b.scalars, outs[0],
                        self.buffers["prefill.attn_part"].ptr, self.buffers["prefill.attn_count"].ptr], defines=tuned)]

    def run_plan(self, m: int, advance: bool = False, last_only: bool = False, long_context: bool = False,
                 tail: Tail | None = None, sampled: int = 0, piece_from: int | None = None, head_rows: int = 0,
                 head_last: bool = False):
        """Enqueue the plan on self.stream as programmatic dependent launches (tuning pdl; prompt steps with tuning
        prefill_pdl), all but the first, which starts after everything before the step: that lets kernels read the
        step's inputs and the KV-cache rows of earlier steps before their pdl_wait() (plugins/pdl.cuh). In prompt
        steps the launches on side streams (concurrent_projections) and the first after they join back are ordinary
        launches: each waits on the other streams' events, not on one kernel before it."""
        pdl = self.tuning["pdl"] and (self._below_gemm(m) or self.tuning["prefill_pdl"])
        launches = [x for x in self.plan(m, last_only, long_context, tail, sampled, piece_from, head_rows, head_last)
                    if (advance or x.op != "decode_advance") and not self._skipped(x)]
        groups = ([[x] for x in launches] if self._below_gemm(m) or not self.tuning["concurrent_projections"]
                  else sibling_projections(launches))
        for j, group in enumerate(groups):
            # not the step's first launch, nor the first after a group joined back (it waits on other streams)
            self._launch_side_by_side(group, pdl=pdl and j > 0 and len(groups[j - 1]) == 1
                                      and group[0].op not in self.tuning["pdl_skip"])

    def _launch_side_by_side(self, group: list[Launch], pdl: bool = False):
        """Launch a group of independent launches (sibling_projections) at once: the first on self.stream, the others
        on side streams forked from it and joined back, so the GPU runs them side by side (captured: parallel branches
        of the graph). q, k and v of a prefill step are 96 + 16 + 16 CTAs of the wgmma GEMM: one after another each
        leaves most SMs idle. pdl: the first one as a programmatic dependent launch (the side streams' never: they
        start from an event)."""
        if len(group) == 1:
            group[0].kernel.launch(group[0].cfg, group[0].args, self.stream, pdl=pdl)
            return
        while len(self._side) < len(group) - 1:
            self._side.append((cr.Stream(), cr.Event()))
        self._fork.record(self.stream)
        for launch, (side, _) in zip(group[1:], self._side):
            side.wait(self._fork)
            launch.kernel.launch(launch.cfg, launch.args, side)
        group[0].kernel.launch(group[0].cfg, group[0].args, self.stream, pdl=pdl)
        for _, (side, joined) in zip(group[1:], self._side):
            joined.record(side)
            self.stream.wait(joined)

    def _skipped(self, launch: Launch) -> bool:
        return any(s == launch.op or s in launch.node for s in self.tuning["skip"])

    def decode_graph(self, m: int = 1, long_context: bool = False, tail: Tail | None = None, advance: bool = True):
        """The whole decode step for m tokens captured once into a CUDA graph (advancing itself, unless not
        `advance`); one graph per plan (long_context: see long_context()). tail: the device sampler's passes over all
        m rows (None: the argmax alone)."""
        key = (m, long_context, tail, advance)
        if key not in self._graphs:
            if tail:
                self.sampler.set_rows(np.arange(m), self.stream)
            # warm-up outside capture (module loads, lazy init): it recomputes what the step will, but its draws
            # write the penalty rings one entry ahead, so those are put back
            rings = self.sampler.history.download(self.stream) if tail and tail.draw else None
            self.run_plan(m, advance=False, long_context=key[1], tail=tail)
            self.stream.synchronize()
            if rings is not None:
                self.sampler.history.upload(rings, self.stream)
            self._graphs[key] = cr.capture(
                self.stream, lambda: self.run_plan(m, advance=advance, long_context=key[1], tail=tail))
        return self._graphs[key]

    @property
    def sampler(self):
        """The device sampler (created at first use: a greedy-only decoder never loads its kernels)."""
        if self._sampler is None:
            from .device_sampler import DeviceSampler

            self._sampler = DeviceSampler(self.cfg.vocab, self.n_slots, self.max_tokens)
        return self._sampler

    def close(self):
        """Free device memory now (buffers are shared between aliases, so free each once), after the work still
        queued on the stream (a prompt chunk launched ahead)."""
        self.stream.synchronize()
        if self._sampler is not None:
            self._sampler.free()
        for p in (self._pinned or []) + (self._pinned_lp or []):
            p.free()
        self._pinned = self._pinned_lp = None
        for buf in {id(b): b for b in self.buffers.values()}.values():
            buf.free()
        self.buffers.clear()
        self._graphs.clear()

    # -- the backend interface (toolchain/decoder.py) ------------------------------------------------------------
    def reset(self, pos: int = 0):
        """Continue at `pos` (slot 0): cache rows from there on are overwritten by what is fed next."""
        self.pos = pos

    def _set_inputs(self, ids, positions, slots, head=None):
        """One copy of the step's token ids, positions and slots (rows beyond len(ids) are never read), and with
        `head` (the step rows of a gathered head, _head) those rows' positions and slots, ordered on the stream; the
        host array lives on, so nothing waits for it. It must stay pageable memory: the driver stages such a copy
        before the call returns, so the next step may refill it while this one is still queued (step's wait=False)."""
        h, m = self._host_inputs, len(ids)
        h[0, :m], h[1, :m], h[2, :m] = ids, positions, slots
        if head is not None:
            h[3, :len(head)], h[4, :len(head)] = h[1, head], h[2, head]
        self.buffers["step_inputs"].upload(h, self.stream, wait=False)

    def _set_checked_inputs(self, ids, positions, slots, head=None) -> int:
        """_set_inputs after the checks every step needs: no kernel may index outside its tensors because of a
        request (token ids, positions, slots). Returns m."""
        m = len(ids)
        if m > self.max_tokens:
            raise ValueError(f"{m} tokens exceed max_tokens={self.max_tokens}")
        ids = check_step(ids, positions, slots, self.cfg.vocab, self.max_context, self.n_slots)
        self._set_inputs(ids, positions, slots, head)
        return m

    def bind_thread(self):
        """Make the backend's CUDA context current on the calling thread (the engine's loop runs in its own)."""
        cr.init()

    @staticmethod
    def _piece_from(positions, slots) -> int | None:
        """The first row of the step's prompt piece: its last rows when they are 2+ consecutive positions of one slot
        that no earlier row has (the engine's order: decode rows, then a prompt chunk), else None. On the prefill
        GEMMs those rows run the prefill attention over their slot's cache instead of each token's decode
        attention (plan's piece_from)."""
        p, s = np.asarray(positions), np.asarray(slots)
        if len(p) < 2:
            return None
        breaks = np.flatnonzero((s[:-1] != s[-1]) | (np.diff(p) != 1))  # row j + 1 does not continue row j
        d = int(breaks[-1]) + 1 if len(breaks) else 0
        return d if len(p) - d >= 2 and not np.any(s[:d] == s[-1]) else None

    @staticmethod
    def _prompt_piece(piece_from: int | None, rows, m: int) -> bool:
        """Whether a step of m rows whose piece starts at piece_from (_piece_from) is a prompt piece alone wanting
        no logits but its last row's. Such a step (the engine's prompt chunks while no stream decodes beside them)
        runs as forward's pieces do, the head (final norm, lm_head, argmax or draw) on its last row alone (plan's
        last_only)."""
        return piece_from == 0 and rows is not None and set(rows) <= {m - 1}

    @staticmethod
    def _head(rows, m: int) -> tuple[int, bool, list[int] | None]:
        """The head of a step of m rows wanting `rows` (None: all): (head_rows, head_last, gathered) for plan, with
        gathered the step row of each head row where the head gathers (else None, the head's row r is the step's
        row r). The head runs on rows 0 .. the last wanted one (head_rows; 0 = all m), and when row m - 1 is wanted
        beside rows before it, on rows 0 .. the last other wanted one plus row m - 1 (head_last). The engine puts
        its decode rows first: a mixed step runs the head on its decode rows, and its prompt chunk's last row where
        that prompt wants its first token, not on the chunk's hundreds of rows."""
        if rows is None or not len(rows):
            return (0 if rows is None or m == 1 else 1), False, None
        top = max(rows) + 1
        if top < m:
            return top, False, None
        others = [r for r in rows if r != m - 1]
        h = max(others, default=-1) + 2  # rows 0 .. the last other one, and the last row
        return (h, True, list(range(h - 1)) + [m - 1]) if h < m else (0, False, None)

    def _head_rows_of(self, rows, m: int, gathered) -> list[int]:
        """Where each of the step rows `rows` lands in the head's rows (_head): their own index, or with a gathered
        head the last row m - 1 at the head's last."""
        if not self.tuning["head_rows"] or gathered is None:
            return list(rows)
        return [len(gathered) - 1 if r == m - 1 else r for r in rows]

    def _begin_step(self, ids, positions, slots, rows):
        """What step and step_tokens both do first: the head's rows (_head), the checked inputs set on the stream,
        the prompt piece (_piece_from, _prompt_piece) and which context's plan. Returns (m, head_rows, head_last,
        gathered, piece_from, piece, long)."""
        head_rows, head_last, gathered = self._head(rows, len(ids))
        m = self._set_checked_inputs(ids, positions, slots, gathered)
        piece_from = self._piece_from(positions, slots)
        piece = self._prompt_piece(piece_from, rows, m)  # a piece alone: its head's row 0 is its row m - 1
        return m, head_rows, head_last, gathered, piece_from, piece, self.long_context(int(np.max(positions)), m)

    def step(self, ids, positions, slots, rows=None, wait: bool = True) -> np.ndarray:
        """Run one step of len(ids) tokens (any slots/positions) and return the logits of `rows` (default all).
        With rows=[] and not `wait` (the engine's prompt chunks that want no token yet), return while the step runs,
        at most one such step ahead: the one before it is waited for. So the GPU has the next chunk queued while the
        host schedules the one after, and a request arriving meanwhile waits for two chunks at most. Until the
        next synchronizing call, read or write device memory only in order on self.stream; a fault of such a step is
        reported by that later call."""
        m, head_rows, head_last, gathered, piece_from, piece, long = self._begin_step(ids, positions, slots, rows)
        if m == 1:
            self.decode_graph(1, long).launch(self.stream)
        elif self._piece_graph(piece, m):
            self.prompt_graph(m, long).launch(self.stream)
        else:
            self.run_plan(m, last_only=piece, long_context=long, piece_from=piece_from, head_rows=head_rows,
                          head_last=head_last)
        if rows is not None and not len(rows):
            if wait:
                self.stream.synchronize()
            else:
                self._ahead[self._ahead_next].record(self.stream)
                self._ahead_next ^= 1
                self._ahead[self._ahead_next].synchronize()  # the step before this one (a no-op if never recorded)
            return np.zeros((0, self.cfg.vocab), np.float32)
        if piece:  # the last row's logits are the head's row 0
            return self.buffers["logits"].download(self.stream, rows=1)
        at = list(range(m)) if rows is None else self._head_rows_of(rows, m, gathered)
        logits = self.buffers["logits"].download(self.stream, rows=max(at) + 1)  # up to the last row asked for
        return logits if rows is None else logits[at]

    def set_sampling(self, slot: int, sampling, seed: int, tokens, position: int):
        """The request now in `slot` samples on the device with these settings (DeviceSampler.set_slot)."""
        self.sampler.set_slot(slot, sampling, seed, tokens, position, self.stream)

    def step_tokens(self, ids, positions, slots, rows, tail: Tail | None = Tail()) -> np.ndarray:
        """step() with the draw on the device: the sampled next token of each of `rows` (int64), by the settings
        set_sampling gave each row's slot, with `tail`'s passes (None: the argmax alone). A step whose every row is
        sampled (decode rows only) and m < GEMM_MIN_M replays a captured graph per m."""
        rows = [int(r) for r in rows]
        if not rows:  # a prompt chunk that wants no token yet: nothing to read, the host goes on (tuning chunks_ahead)
            return self.step(ids, positions, slots, rows, wait=not self.tuning["chunks_ahead"]).astype(np.int64)[:, 0]
        m, head_rows, head_last, gathered, piece_from, piece, long = self._begin_step(ids, positions, slots, rows)
        at = [0] if piece else self._head_rows_of(rows, m, gathered)  # the rows' places in the head (a piece: row 0)
        if tail:
            self.sampler.set_rows(at, self.stream)
        if rows == list(range(m)) and self._below_gemm(m):
            self.decode_graph(m, long, tail, advance=False).launch(self.stream)
        elif self._piece_graph(piece, m):
            self.prompt_graph(m, long, tail).launch(self.stream)
        else:
            self.run_plan(m, last_only=piece, long_context=long, tail=tail, sampled=len(rows), piece_from=piece_from,
                          head_rows=head_rows, head_last=head_last)
        toks = self.buffers["next_token"].download(self.stream, rows=max(at) + 1).reshape(-1)
        return toks[at]

    def last_logprobs(self, tokens, tops) -> list[dict]:
        """The log-probability records (sampling.token_logprobs' form) of the last step_tokens' rows, computed on
        the device (its tail had logprobs): their drawn tokens and how many alternatives each asks for."""
        return self.sampler.read_logprobs(tokens, tops, self.stream)

    def can_pipeline(self, m: int) -> bool:
        """Whether a decode step of m rows can run as launch_decode (a captured, self-advancing graph)."""
        return self._below_gemm(m)

    def _skinny(self, m: int) -> bool:
        """Whether a step of m tokens runs its projections as the GEMMs for few tokens (tuning skinny_min_m; they
        split k over a cluster, so not in the cluster-free builds)."""
        return self.tuning["clusters"] and self.tuning["skinny_min_m"] <= m and self._below_gemm(m)

    def _stays_on_decode_core(self, op: str, dims: dict) -> bool:
        """Whether the tuning keeps this projection on the decode core in steps that run the others as GEMMs for few
        tokens (skinny_skip: ops, or op@k for one projection shape, e.g. matmul_add@1536, the o projection)."""
        k = dims.get("k", dims.get("hidden"))
        return op in self.tuning["skinny_skip"] or f"{op}@{k}" in self.tuning["skinny_skip"]

    def _below_gemm(self, m: int) -> bool:
        """Whether a step of m tokens is below the GEMMs' threshold (tuning gemm_min_m): a decode step, whose plan
        runs the decode graph one launch after another (no side streams)."""
        return m < self.tuning["gemm_min_m"]

    def launch_decode(self, m: int, position: int, ids=None, positions=None, slots=None,
                      tail: Tail | None = Tail()):
        """Enqueue a decode step of m rows, every row sampled on the device, and an asynchronous copy of its tokens;
        returns a ticket for read_tokens. With ids/positions/slots the step's inputs are set (the first step of a
        run); without, the step is fed by the one before it on the device (decode_advance: each row's drawn token,
        its position + 1), so it can be launched before the host has read that one. `position`: the furthest
        row's (which graph: long_context). tail: the step's sampler passes; None: every row is greedy without
        penalties or logprobs, the plain argmax graph. With logprobs in it, the rows' records are copied too
        (read_logprobs)."""
        if ids is not None:
            self._set_checked_inputs(ids, positions, slots)
            self.sampler.set_rows(list(range(m)), self.stream)
        elif position >= self.max_context:
            raise ValueError(f"position {position} is beyond the context of {self.max_context}")
        self.decode_graph(m, self.long_context(position, m), tail).launch(self.stream)
        if self._pinned is None:
            self._pinned = [cr.PinnedArray((self.max_tokens,), np.int64) for _ in range(2)]
            self._pinned_lp = [cr.PinnedArray((self.max_tokens, LOGPROB_WORDS), np.int32) for _ in range(2)]
            self._pinned_events = [cr.Event(), cr.Event()]
        k = self._pin_next
        self._pin_next ^= 1
        self._pinned[k].copy_from_device(self.buffers["next_token"].ptr, m * 8, self.stream)
        lp = bool(tail and tail.logprobs)
        if lp:
            self._pinned_lp[k].copy_from_device(self.sampler.logprobs.ptr, m * LOGPROB_WORDS * 4, self.stream)
        self._pinned_events[k].record(self.stream)
        return k, m, lp

    def read_tokens(self, ticket) -> np.ndarray:
        """The tokens of a launch_decode step (waits for it)."""
        k, m, _ = ticket
        self._pinned_events[k].synchronize()
        return self._pinned[k].array[:m].copy()

    def read_logprobs(self, ticket, tokens, tops) -> list[dict]:
        """The log-probability records of a launch_decode step whose tail had logprobs (after read_tokens), one per
        row: its drawn token and how many alternatives it asks for."""
        k, m, lp = ticket
        if not lp:
            raise ValueError("this step was launched without logprobs")
        words = self._pinned_lp[k].array[:m]
        return [parse_logprobs(w, t, n) for w, t, n in zip(words, tokens, tops)]

    def forward(self, ids) -> np.ndarray:
        ids = check_token_ids(ids, self.cfg.vocab)
        if self.pos + len(ids) > self.max_context:
            raise UserError(f"{self.pos + len(ids)} tokens do not fit the context of {self.max_context}")
        logits = None
        for s in range(0, len(ids), self.max_tokens):  # prompt prefill in pieces of max_tokens
            chunk = ids[s:s + self.max_tokens]
            if len(chunk) == 1:
                logits = self.step(chunk, [self.pos], [0])[0]
            else:
                self._set_inputs(chunk, np.arange(self.pos, self.pos + len(chunk)), np.zeros(len(chunk)))
                long = self.long_context(self.pos + len(chunk) - 1, len(chunk))
                if len(chunk) == self.max_tokens:  # a whole piece: one captured graph (as `qtrt bench` times it)
                    self.prompt_graph(len(chunk), long).launch(self.stream)
                else:
                    self.run_plan(len(chunk), last_only=True, long_context=long)
                if s + len(chunk) == len(ids):  # only the last piece's logits: no wait between pieces
                    logits = self.buffers["logits"].download(self.stream, rows=1)[0]
            self.pos += len(chunk)
        return logits

    def greedy(self, first_token: int, n: int):
        """Yield n greedy tokens after `first_token`: each is one replay of the self-advancing CUDA graph; the host
        only reads the 8-byte argmax to stream it."""
        return self._replay(first_token, n, None)

    def _replay(self, first_token: int, n: int, tail: Tail | None):
        """Yield n tokens after `first_token` (slot 0), each one replay of the self-advancing graph (with the device
        sampler's passes `tail`, or without); the host reads only the 8-byte token to stream it."""
        self._set_inputs([first_token], [self.pos], [0])
        for _ in range(n):
            self.decode_graph(1, self.long_context(self.pos), tail).launch(self.stream)
            tok = int(self.buffers["next_token"].download(self.stream, rows=1).reshape(-1)[0])
            self.pos += 1
            yield tok

    def sampled(self, first_token: int, n: int, sampling, seed: int, tokens):
        """Yield n tokens sampled on the device after `first_token` (the last of `tokens`, the sequence so far):
        each is one replay of the self-advancing graph with the device sampler (slot 0; its penalty pass only if
        the settings have penalties)."""
        self.set_sampling(0, sampling, seed, tokens, self.pos)
        self.sampler.set_rows([0], self.stream)
        return self._replay(first_token, n, Tail(penalties=sampling.penalized))
