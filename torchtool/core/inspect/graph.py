"""The autograd graph of one forward pass as Graphviz DOT (what pytorchviz's make_dot draws), rendered by ``dot``.

Operations are the backward nodes autograd recorded (``ConvolutionBackward0``...), leaves are
the parameters (name and shape) and the inputs; edges run from the inputs to the output.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

from torchtool.core.files import atomic_write, atomic_write_text, check_writable
from torchtool.core.output import Failure, UsageError

GRAPH_SUFFIXES = (".dot", ".gv", ".svg", ".png", ".pdf")
INSTALL_GRAPHVIZ = "install Graphviz to render it (apt install graphviz, brew install graphviz, conda install graphviz)"


def check_graph_path(path: str, overwrite: bool) -> Path:
    """``--graph`` must end in a suffix we can write, and be writable (the .dot written instead too,
    where Graphviz is missing), before any model is built."""
    target = Path(path)
    if target.suffix.lower() not in GRAPH_SUFFIXES:
        raise UsageError(f"--graph {path}: unknown suffix {target.suffix or '(none)'}",
                         hint=f"use one of {', '.join(GRAPH_SUFFIXES)}")
    check_writable(target, overwrite, what="--graph")
    if target.suffix.lower() not in (".dot", ".gv") and shutil.which("dot") is None:
        check_writable(target.with_suffix(".dot"), overwrite, what="--graph")
    return target


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _shape(tensor: Any) -> str:
    return "(" + ", ".join(map(str, tensor.shape)) + ")"


def autograd_dot(outputs: list[Any], names: dict[int, str], title: str = "") -> str:
    """DOT text of the graph behind ``outputs``; ``names`` maps id(tensor) -> its name (parameters, inputs)."""
    lines = ["digraph autograd {", '  graph [rankdir=TB, fontname="Helvetica"' + (f", label={_quote(title)}]"
                                                                              if title else "]"),
             '  node [shape=box, style=filled, fillcolor="#eeeeee", fontname="Helvetica", fontsize=10];']
    ids: dict[Any, str] = {}
    edges: list[tuple[str, str]] = []
    todo = []

    def node_id(fn: Any) -> str:
        if fn not in ids:
            ids[fn] = f"n{len(ids)}"
            variable = getattr(fn, "variable", None)  # AccumulateGrad: a leaf tensor
            if variable is not None:
                label = f"{names.get(id(variable), 'tensor')}\n{_shape(variable)}"
                color = "#cfe2ff" if id(variable) in names and names[id(variable)].startswith("input") else "#d8f0d0"
            else:
                label, color = type(fn).__name__, "#eeeeee"
            lines.append(f"  {ids[fn]} [label={_quote(label)}, fillcolor={_quote(color)}];")
            todo.append(fn)
        return ids[fn]

    for i, out in enumerate(outputs):
        if getattr(out, "grad_fn", None) is None:
            continue
        head, label = f"out{i}", f"output {i}" if len(outputs) > 1 else "output"
        label = _quote(label + "\n" + _shape(out))
        lines.append(f'  {head} [label={label}, shape=ellipse, fillcolor="#fff3c4"];')
        edges.append((node_id(out.grad_fn), head))
    while todo:
        fn = todo.pop()
        for child, _ in getattr(fn, "next_functions", ()):
            if child is not None:
                edges.append((node_id(child), ids[fn]))
    lines += [f"  {a} -> {b};" for a, b in dict.fromkeys(edges)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_graph(dot: str, path: Path) -> tuple[Path, str | None]:
    """Write ``dot`` to ``path``: as DOT, or rendered by Graphviz for .svg/.png/.pdf.

    Without Graphviz the DOT goes beside it (``path`` with .dot) and the note says how to install
    it. Returns (the file written, a note or None).
    """
    suffix = path.suffix.lower()
    if suffix in (".dot", ".gv"):
        atomic_write_text(path, dot)
        return path, None
    program = shutil.which("dot")
    if program is None:
        fallback = path.with_suffix(".dot")
        atomic_write_text(fallback, dot)
        return fallback, f"Graphviz's dot program is not installed: wrote the graph as {fallback}; {INSTALL_GRAPHVIZ}"
    # dot renders to its stdout and the file is written here: a full disk is then our OSError, said in one line
    done = subprocess.run([program, f"-T{suffix[1:]}"], input=dot.encode(), capture_output=True, timeout=600)
    if done.returncode != 0 or not done.stdout:
        why = done.stderr.decode(errors="replace").strip().splitlines()[:1]
        raise Failure(f"Graphviz's dot could not render {path}: {why[0] if why else f'exit {done.returncode}'}",
                      hint="write --graph FILE.dot and render it yourself")
    with atomic_write(path, "wb") as fh:
        fh.write(done.stdout)
    return path, None
