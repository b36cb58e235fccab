"""`qtrt export`: layer_XX.onnx for every layer plus model.onnx, all referencing one weights.bin.

The raw GGUF blocks are written once, in name order at 64-byte aligned offsets, and every graph points into that file
(ONNX external data), so the per-layer graphs and the whole model share the bytes and two exports are identical.
The directory is written under a temporary name and renamed into place: no half-written export survives. A manifest
(qtrt-export.json) marks the directory as ours: a later export replaces our files only, and a directory holding
anything else is refused, never emptied.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx

from . import __version__
from .errors import UserError
from .gguf_model import GGUFModel, load_gguf
from .graph import attach_initializers, build_layer_graph, build_model_graph, op_histogram
from .progress import Progress, quiet

WEIGHTS_FILE = "weights.bin"
ALIGN = 64


def write_weights(arrays: dict, path: Path, progress: Progress | None = None) -> dict:
    """Write every array into one file; return {name: (location, offset)} for attach_initializers."""
    where, off = {}, 0
    with open(path, "wb") as f:
        for name in (progress or quiet()).bar(sorted(arrays), text="writing weights.bin", unit="tensor"):
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


MANIFEST = "qtrt-export.json"  # marks a directory as an export of ours, and lists the files we own in it


def previous_export(out: Path) -> list[str] | None:
    """The files a previous `qtrt export` wrote into `out` (from its manifest), or None if it is not one of ours.
    Only plain file names count: a manifest can never make us touch anything outside `out`."""
    try:
        m = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("tool") != "qtrt" or not isinstance(m.get("files"), list):
        return None
    return [f for f in m["files"] if isinstance(f, str) and f == os.path.basename(f) and f not in ("", ".", "..")]


def export_model(gguf_path, out_dir, progress: bool = True) -> dict:
    """Export into `out_dir`: a new directory, an empty one, or a previous export of ours (whose files alone are
    replaced). A directory holding anything else is refused: the tool never deletes what it did not write."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another -o")
    ours = previous_export(out) if out.is_dir() else None
    if out.is_dir() and ours is None and any(out.iterdir()):
        raise UserError(f"{out}: the directory holds files that qtrt did not write (it has no {MANIFEST}); "
                        "choose a new or empty directory with -o")
    model = gguf_path if isinstance(gguf_path, GGUFModel) else load_gguf(gguf_path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as e:
        raise UserError(f"{out}: cannot create it ({e.strerror or e}); choose a writable -o") from None
    try:
        tmp.chmod(0o755)
        summary = _export_into(model, tmp, Progress(None if progress else False))
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({"tool": "qtrt", "version": __version__,
                                                "model": os.path.basename(model.path), "files": files}, indent=1))
        if not out.exists():
            os.replace(tmp, out)  # one atomic rename: the export appears whole or not at all
        else:  # empty, or ours: replace our files one by one (each rename atomic), the manifest last
            for name in files:
                os.replace(tmp / name, out / name)
            for name in set(ours or ()) - set(files) - {MANIFEST}:
                stale = out / name
                if stale.is_file() and not stale.is_symlink():
                    stale.unlink()
            os.replace(tmp / MANIFEST, out / MANIFEST)
            tmp.rmdir()
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{out}: writing the export failed ({e.strerror or e}); nothing was left half-written") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name in files}
    if progress:
        print_summary(summary, out)
    return summary


def _export_into(model: GGUFModel, out: Path, progress: Progress) -> dict:
    c = model.config
    with progress.stage("building the model graph"):
        graph, arrays = build_model_graph(model)
    where = write_weights(arrays, out / WEIGHTS_FILE, progress)
    per_layer = []
    for i in progress.bar(range(c.n_layers), text="layer graphs (write + check)", unit="layer"):
        g, a = build_layer_graph(model, i)
        attach_initializers(g, a, where)
        onnx.save(g, out / f"layer_{i:02d}.onnx")
        onnx.checker.check_model(str(out / f"layer_{i:02d}.onnx"), full_check=True)
        per_layer.append(len(g.graph.node))
        if i == 0:
            (out / "layer_00.dot").write_text(to_dot(g))
    with progress.stage("model.onnx (write + check)"):
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
