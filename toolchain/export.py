"""`qtrt export`: layer_XX.onnx for every layer plus model.onnx, all referencing one weights.bin.

The raw GGUF blocks are written once, in name order at 64-byte aligned offsets, and every graph points into that file
(ONNX external data), so the per-layer graphs and the whole model share the bytes and two exports are identical.
The directory is written under a temporary name and renamed into place: no half-written export survives.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx

from .errors import UserError
from .gguf_model import GGUFModel, load_gguf
from .graph import attach_initializers, build_layer_graph, build_model_graph, op_histogram

WEIGHTS_FILE = "weights.bin"
ALIGN = 64


def write_weights(arrays: dict, path: Path) -> dict:
    """Write every array into one file; return {name: (location, offset)} for attach_initializers."""
    where, off = {}, 0
    with open(path, "wb") as f:
        for name in sorted(arrays):
            pad = -off % ALIGN
            f.write(b"\0" * pad)
            off += pad
            data = arrays[name].tobytes()
            f.write(data)
            where[name] = (WEIGHTS_FILE, off)
            off += len(data)
    return where


def to_dot(model: onnx.ModelProto) -> str:
    """Graphviz text of a graph (render with `dot -Tpng`): people look at graphs rather than read them."""
    inits = {t.name for t in model.graph.initializer}
    lines = ["digraph layer {", "  rankdir=TB; node [shape=box, style=rounded, fontname=Helvetica];"]
    for i in model.graph.input:
        lines.append(f'  "{i.name}" [shape=ellipse];')
    for n in model.graph.node:
        lines.append(f'  "{n.name}" [label="{n.op_type}\\n{n.name}"];')
    producer = {o: n.name for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        for i in n.input:
            if i in inits:
                continue
            lines.append(f'  "{producer.get(i, i)}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def export_model(gguf_path, out_dir, progress: bool = True) -> dict:
    t0 = time.perf_counter()
    model = gguf_path if isinstance(gguf_path, GGUFModel) else load_gguf(gguf_path)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another -o")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        summary = _export_into(model, tmp, progress)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    if progress:
        print_summary(summary, out)
    return summary


def _export_into(model: GGUFModel, out: Path, progress: bool) -> dict:
    from tqdm import tqdm

    c = model.config
    graph, arrays = build_model_graph(model)
    where = write_weights(arrays, out / WEIGHTS_FILE)
    per_layer = []
    for i in tqdm(range(c.n_layers), desc="export layers", disable=not progress):
        g, a = build_layer_graph(model, i)
        attach_initializers(g, a, where)
        onnx.save(g, out / f"layer_{i:02d}.onnx")
        onnx.checker.check_model(str(out / f"layer_{i:02d}.onnx"), full_check=True)
        per_layer.append(len(g.graph.node))
        if i == 0:
            (out / "layer_00.dot").write_text(to_dot(g))
    attach_initializers(graph, arrays, where)
    onnx.save(graph, out / "model.onnx")
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    by_type = Counter()
    for name in arrays:
        t = model.tensors.get(name)
        by_type[t.ggml_type if t else "F32 (zero bias)"] += arrays[name].nbytes
    return {"model": os.path.basename(model.path), "layers": c.n_layers, "nodes_per_layer": per_layer,
            "model_nodes": len(graph.graph.node), "op_histogram": op_histogram(graph),
            "weight_bytes_by_type": dict(sorted(by_type.items()))}


def print_summary(s: dict, out: Path):
    npl = sorted(set(s["nodes_per_layer"]))
    print(f"exported {s['model']} -> {out} in {s['seconds']} s")
    print(f"  {s['layers']} layer graphs, nodes per layer: {npl}; model.onnx: {s['model_nodes']} nodes")
    print("  ops: " + ", ".join(f"{k} {v}" for k, v in s["op_histogram"].items()))
    print("  weights: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in s["weight_bytes_by_type"].items()))
    total = sum(s["files"].values())
    print(f"  {len(s['files'])} files, {total / 2**20:.1f} MiB")
