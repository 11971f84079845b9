"""profile's report as people read it: the headline figures, the compare matrix, the sweep, the top operators."""

from __future__ import annotations

from typing import Any

from torchtool.core.files import human_bytes


def _latency(rec: dict[str, Any]) -> dict[str, str]:
    memory = rec["peak_memory_bytes"]
    return {"latency": f"{rec['median_ms']:.4g} ms median (IQR {rec['iqr_ms']:.2g} ms over {rec['blocks']} timed "
                       f"blocks, {rec['runs']} runs)",
            "throughput": f"{rec['samples_per_s']:.1f} samples/s",
            "peak memory": "not measured" if memory is None else human_bytes(memory)}


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """Model, device and the forward's (and training step's) latency, throughput and memory."""
    shapes = ", ".join("x".join(map(str, [report["batch_size"], *s])) for s in report["input_size"])
    where = "CUDA max_memory_allocated" if report["device"].startswith("cuda") else "peak RSS growth"
    cpu = f"{report['cpu']}, " if report.get("cpu") else ""
    head: dict[str, Any] = {"model": report["model"], "device": f"{report['device']} ({cpu}{report['threads']} threads)",
                            "input": shapes, f"forward (no_grad; memory: {where})": _latency(report["forward"])}
    if report["training_step"]:
        head["training step (forward, backward, SGD step)"] = _latency(report["training_step"])
    if report["bottleneck"]:
        head["bottleneck"] = report["bottleneck"]
    if report["trace"]:
        head["trace"] = report["trace"]
    return head


def compare_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The matrix with speed-ups as 1.42x (and the range the quartiles allow), the verdict, the tolerance check."""
    shown = []
    for r in rows:
        if r.get("skipped"):
            shown.append({"tip": r["tip"], "median_ms": "-", "speedup": "-", "verdict": "-", "max_rel_error": "-",
                          "same_outputs": f"skipped: {r['skipped']}"})
            continue
        note = f" (compiled in {r['compile_s']:.1f} s)" if "compile_s" in r else ""
        spread = f" ({r['speedup_low']:.2f}-{r['speedup_high']:.2f})" if r["verdict"] != "baseline" else ""
        shown.append({"tip": r["tip"], "median_ms": f"{r['median_ms']:.2f}", "speedup": f"{r['speedup']:.2f}x{spread}",
                      "verdict": r["verdict"], "max_rel_error": f"{r['max_rel_error']:.1e}",
                      "same_outputs": ("yes" if r["within_tolerance"] else "NO") + f" (tol {r['tolerance']:g}){note}"})
    return shown


def sweep_rows(loading: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per loader setting, the fastest marked."""
    fastest = loading["fastest"]
    return [{"workers": r["workers"], "batch_size": r["batch_size"], "pin_memory": "yes" if r["pin_memory"] else "no",
             "images_per_s": f"{r['images_per_s']:.1f}", "fastest": "<-" if r is fastest else ""}
            for r in loading["rows"]]


def ops_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operator table with milliseconds to 3 decimals."""
    return [{k: (f"{v:.3f}" if k.endswith("_ms") else f"{v:.1f}" if k == "self_percent"
                 else human_bytes(v) if k.endswith("_bytes") else v) for k, v in r.items()} for r in rows]


def script_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """cProfile's table with seconds to 4 decimals."""
    return [{k: (f"{v:.4f}" if k.endswith("_s") else v) for k, v in r.items()} for r in rows]


def records(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows --format csv/jsonl prints: the compare matrix, else the sweep, else the operators, else the forward."""
    if "script" in report:
        return report["python_top"]
    if report.get("compare"):
        return report["compare"]
    if report.get("dataloader"):
        return report["dataloader"]["rows"]
    if report.get("top_ops"):
        return report["top_ops"]
    return [{"model": report["model"], "device": report["device"], "threads": report["threads"],
             "batch_size": report["batch_size"], **report["forward"]}]
