"""torchtool profile: self-consistent statistics, the compare matrix, the loader sweep, traces, script mode, errors.

No timing is asserted: only how the figures relate to each other (throughput = batch / median,
quartiles around the median), which rows exist, and what the tolerance check says.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from torchtool.cli import app
from torchtool.core.inspect.tips import relative_error

runner = CliRunner()
TINY = "tests.commands.test_profile:tiny_cnn"
FAST = ["--input-size", "3,32,32", "--device", "cpu", "--max-time", "0.05", "--quiet"]


def tiny_cnn(width: int = 8):
    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.BatchNorm2d(width), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 5))


def failing_factory():
    raise RuntimeError("the factory is broken")


def invoke(*args):
    return runner.invoke(app, ["profile", *map(str, args)])


def _json(*args):
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_statistics_are_self_consistent():
    threads = torch.get_num_threads()
    report = _json(TINY, "--batch-size", "4", "--backward", "--threads", "1", *FAST)
    assert report["threads"] == 1 and report["device"] == "cpu" and report["input_size"] == [[3, 32, 32]]
    assert torch.get_num_threads() == threads  # put back after the run
    for key in ("forward", "training_step"):
        rec = report[key]
        assert rec["samples_per_s"] == pytest.approx(4 / (rec["median_ms"] / 1e3), rel=1e-9)
        assert rec["q1_ms"] <= rec["median_ms"] <= rec["q3_ms"]
        assert rec["iqr_ms"] == pytest.approx(rec["q3_ms"] - rec["q1_ms"])
        assert rec["runs"] >= 1 and isinstance(rec["peak_memory_bytes"], int) and rec["peak_memory_bytes"] >= 0
    table = invoke(TINY, "--batch-size", "4", *FAST)
    assert "latency" in table.stdout and "samples/s" in table.stdout and "peak memory" in table.stdout


def test_compare_matrix_rows_and_tolerance_flags(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    report = _json(TINY, "--batch-size", "2", "--compare", *FAST)
    rows = {r["tip"]: r for r in report["compare"]}
    assert list(rows) == ["fp32 baseline", "channels_last", "bf16", "fp16", "cudnn_benchmark", "compile",
                          "inference_mode", "fold_bn"]
    assert rows["fp32 baseline"]["speedup"] == 1.0 and rows["fp32 baseline"]["max_rel_error"] == 0.0
    assert rows["fp16"]["skipped"] == "fp16 autocast is for CUDA" and rows["cudnn_benchmark"]["skipped"]
    assert rows["compile"]["skipped"] == "cannot run here: RuntimeError: no C++ compiler found"
    for tip in ("channels_last", "inference_mode", "fold_bn"):  # float32 all the way: the same outputs
        assert rows[tip]["within_tolerance"] and rows[tip]["max_rel_error"] < 1e-5, tip
        assert rows[tip]["tolerance"] == 1e-3
    assert rows["bf16"]["tolerance"] == 5e-2 and 0 < rows["bf16"]["max_rel_error"] < 5e-2
    for row in rows.values():
        if not row["skipped"]:
            base = rows["fp32 baseline"]["median_ms"]
            assert row["speedup"] == pytest.approx(base / row["median_ms"])
    only = _json(TINY, "--compare", "--tips", "fold_bn", *FAST)["compare"]
    assert [r["tip"] for r in only] == ["fp32 baseline", "fold_bn"]
    csv_out = invoke(TINY, "--compare", "--tips", "inference_mode", *FAST, "--format", "csv").stdout.splitlines()
    assert csv_out[0].startswith("tip,what,median_ms") and len(csv_out) == 3


def test_relative_error_flags_a_wrong_output():
    ref = torch.tensor([[1.0, -2.0], [4.0, 0.5]])
    assert relative_error(ref.clone(), ref) == 0.0
    assert relative_error(ref + torch.tensor([[0.0, 0.4], [0.0, 0.0]]), ref) == pytest.approx(0.1)
    assert relative_error(ref[:1], ref) == float("inf")  # another shape is never "the same outputs"


def test_dataloader_sweep(photos_dir):
    from torchtool.core.runtime import available_cpus

    report = _json(TINY, "--batch-size", "2", "--dataloader", photos_dir, *FAST)
    loading = report["dataloader"]
    workers = sorted({r["workers"] for r in loading["rows"]})
    assert workers[0] == 0 and workers[-1] == available_cpus()
    assert sorted({r["batch_size"] for r in loading["rows"]}) == [1, 2, 4]
    assert all(r["images"] == 8 and r["pin_memory"] is False for r in loading["rows"])  # pin_memory: CUDA only
    assert loading["fastest"]["images_per_s"] == max(r["images_per_s"] for r in loading["rows"])
    assert loading["crop_size"] == 224  # a factory's model is fed ImageNet's 224 px crops
    assert "bottleneck at batch size 2" in report["bottleneck"]
    table = invoke(TINY, "--batch-size", "2", "--dataloader", photos_dir, "--dataloader-images", "3", *FAST)
    assert "<-" in table.stdout and "bottleneck" in table.stdout


def test_trace_and_top_operators(tmp_path):
    trace = tmp_path / "trace.json"
    report = _json(TINY, "--trace", trace, "--top", "5", "--backward", "--batch-size", "2", *FAST)
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert "aten::convolution" in names or "aten::conv2d" in names
    assert any(e.get("args", {}).get("Input Dims") for e in events)  # shapes recorded
    assert len(report["top_ops"]) == 5 and report["trace"] == str(trace)
    ops = report["top_ops"]
    assert [r["self_cpu_ms"] for r in ops] == sorted((r["self_cpu_ms"] for r in ops), reverse=True)
    assert all(r["op"] and r["calls"] >= 1 for r in ops)
    again = invoke(TINY, "--trace", trace, *FAST)
    assert again.exit_code == 2 and "already exists" in again.stderr


SCRIPT = textwrap.dedent("""
    import sys
    import torch

    def heavy_matmul(n):
        a = torch.randn(n, n)
        return (a @ a).sum()

    print("script says hi", sys.argv[1:])
    for _ in range(3):
        heavy_matmul(int(sys.argv[1]))
    if len(sys.argv) > 2 and sys.argv[2] == "fail":
        raise ValueError("the script failed on purpose")
    sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
""")


def test_script_mode(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    result = runner.invoke(app, ["profile", str(script), "--json", "--", "64"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # the script's print went to stderr: stdout stays JSON
    assert "script says hi ['64']" in result.stderr
    assert report["exit_code"] == 0 and report["exception"] is None and report["args"] == ["64"]
    assert any("heavy_matmul" in r["function"] for r in report["python_top"])
    assert any(r["op"] in ("aten::mm", "aten::matmul") for r in report["torch_top"])

    code = runner.invoke(app, ["profile", str(script), "--", "32", "4"])
    assert code.exit_code == 4 and "function" in code.stdout  # tables printed, the script's exit code kept
    failed = runner.invoke(app, ["profile", str(script), "--", "32", "fail"])
    assert failed.exit_code == 1
    assert "ValueError: the script failed on purpose" in failed.stderr and "Traceback" in failed.stderr


@pytest.mark.parametrize("args, message", [
    (["tests.commands.test_profile:failing_factory"], "building tests.commands.test_profile:failing_factory failed: "
     "RuntimeError: the factory is broken"),
    ([TINY, "--input-size", "4,32,32"], "in layer 0 (Conv2d): RuntimeError: Given groups=1"),
    ([TINY, "--dataloader", "EMPTY"], "no images found"),
    ([TINY, "--dataloader", "nowhere"], "--dataloader nowhere: no such folder"),
    (["missing_script.py"], "no such script: missing_script.py"),
    ([TINY, "--compare", "--tips", "warp_speed"], "unknown tip 'warp_speed'"),
    ([TINY, "--trace", "t.txt"], "a trace is written as .json"),
    ([TINY, "--", "extra"], "arguments after MODEL (extra"),
    ([TINY, "--backward", "--batch-size", "1", "--input-size", "3,1,1"], "--backward: the training step"),
    (["resnet19"], "unknown model 'resnet19'"),
])
def test_mistakes_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "EMPTY").mkdir()
    result = invoke(*args, "--device", "cpu", "--max-time", "0.05")
    assert result.exit_code in (1, 2), result.output
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
