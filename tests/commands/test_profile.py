"""torchtool profile: self-consistent statistics, the compare matrix, the loader sweep, traces, script mode, errors.

No timing is asserted: only how the figures relate to each other (throughput = batch / median,
quartiles around the median), which rows exist, and what the tolerance check says.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

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
        assert rec["runs"] >= rec["blocks"] >= 5  # never one timed run presented as a statistic
        assert isinstance(rec["peak_memory_bytes"], int) and rec["peak_memory_bytes"] >= 0
    table = invoke(TINY, "--batch-size", "4", *FAST)
    assert "latency" in table.stdout and "samples/s" in table.stdout and "peak memory" in table.stdout
    assert "timed blocks" in table.stdout


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
    assert "job.py ended with exit code 4" in code.stderr
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


class ModeDependent(torch.nn.Module):
    """A model whose outputs change under torch.inference_mode(): that tip is wrong for it, however fast."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = self.fc(x)
        return y * 2 if torch.is_inference_mode_enabled() else y


def test_a_tip_whose_outputs_differ_is_flagged_not_a_speedup():
    args = ["tests.commands.test_profile:ModeDependent", "--input-size", "8", "--device", "cpu", "--max-time", "0.05",
            "--quiet", "--compare", "--tips", "inference_mode"]
    row = _json(*args)["compare"][1]
    assert row["tip"] == "inference_mode" and row["max_rel_error"] == pytest.approx(1.0)
    assert row["within_tolerance"] is False and row["verdict"] == "outputs differ"
    assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"]
    table = invoke(*args).stdout
    line = next(line for line in table.splitlines() if line.startswith("inference_mode"))
    assert "outputs differ" in line and "NO (tol" in line and "faster" not in line


def test_threads_above_the_cpus_get_one_note():
    from torchtool.core.runtime import available_cpus

    result = invoke(TINY, "--threads", available_cpus() + 1, *FAST)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("oversubscribe") == 1


def test_undecodable_images_are_a_failure_not_a_fastest_setting(tmp_path):
    for name in ("a.jpg", "b.png", "c.jpg"):
        (tmp_path / name).write_bytes(b"not an image at all" * 10)
    result = invoke(TINY, "--dataloader", tmp_path, "--dataloader-images", "3", *FAST)
    assert result.exit_code == 1 and result.stdout == ""
    assert f"--dataloader {tmp_path}: none of the 3 images could be decoded" in result.stderr
    assert "Traceback" not in result.stderr


BUILT_MARK = textwrap.dedent("""
    import torch.nn as nn

    def model():
        open({mark!r}, "w").close()
        return nn.Linear(1000, 1000)
""")


def test_trace_is_checked_before_the_model_is_built(tmp_path):
    (tmp_path / "marked.py").write_text(BUILT_MARK.format(mark=str(tmp_path / "built")))
    (tmp_path / "t.json").write_text("mine")
    result = invoke(str(tmp_path / "marked.py") + ":model", "--trace", tmp_path / "t.json", *FAST)
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert not (tmp_path / "built").exists() and (tmp_path / "t.json").read_text() == "mine"


def test_a_model_too_large_for_half_the_free_memory_is_not_built(tmp_path, monkeypatch):
    (tmp_path / "marked.py").write_text(BUILT_MARK.format(mark=str(tmp_path / "built")))
    monkeypatch.setattr("torchtool.core.inspect.bounds.available_memory", lambda: 6 << 20)  # 4 MB of weights
    result = invoke(str(tmp_path / "marked.py") + ":model", "--input-size", "1000", *FAST)
    assert result.exit_code == 1 and result.stdout == ""
    assert "weights (4.0 MB) are too large for a real forward here (6.3 MB free)" in result.stderr
    assert (tmp_path / "built").exists()  # built once, on the meta device, to know its size


FORKS = textwrap.dedent("""
    import os
    import torch

    torch.randn(32, 32) @ torch.randn(32, 32)
    child = os.fork()
    if child == 0:
        print("the child returns")
    else:
        os.waitpid(child, 0)
""")


def test_a_forked_child_never_prints_the_tables(tmp_path, run_torchtool):
    (tmp_path / "forks.py").write_text(FORKS)
    proc = run_torchtool("profile", str(tmp_path / "forks.py"), "--top", "3")
    assert proc.returncode == 0, proc.stderr
    assert "the child returns" in proc.stderr
    assert proc.stdout.count("function") == 1 and proc.stdout.count("self_cpu_ms") == 1  # once: the parent's


def test_ctrl_c_in_a_script_prints_what_was_gathered(tmp_path):
    (tmp_path / "interrupted.py").write_text(textwrap.dedent("""
        import signal
        import torch

        def work():
            return (torch.randn(64, 64) @ torch.randn(64, 64)).sum()

        work()
        signal.raise_signal(signal.SIGINT)  # what Ctrl-C sends: KeyboardInterrupt at once
        raise SystemExit("the SIGINT was not delivered")  # (it is ignored in a process started with `&`)
    """))
    result = runner.invoke(app, ["profile", str(tmp_path / "interrupted.py"), "--top", "5"])
    assert result.exit_code == 130
    assert "work" in result.stdout and "aten::mm" in result.stdout  # the tables up to the interrupt
    assert "KeyboardInterrupt (Ctrl-C)" in result.stderr


def test_a_script_exit_message_is_reported(tmp_path):
    (tmp_path / "quits.py").write_text("import sys\nsys.exit('missing --data')\n")
    result = runner.invoke(app, ["profile", str(tmp_path / "quits.py")])
    assert result.exit_code == 1 and "function" in result.stdout
    assert "quits.py ended with exit code 1: SystemExit: missing --data" in result.stderr


# A full disk, without root: a file-size limit (EFBIG) for the process, or /dev/full, written through.
FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
from torchtool.cli import main
sys.argv = ["torchtool", *sys.argv[1:]]
main()
"""


def test_a_trace_that_cannot_be_written_is_a_failure(tmp_path, run_python):
    args = ["profile", TINY, "--trace", str(tmp_path / "t.json"), *FAST, "--json"]
    proc = run_python("-c", FSIZE, *args, env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert "torchtool: error: torch.profiler could not write the whole trace" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no trace, no temporary file
    if Path("/dev/full").exists():
        full = runner.invoke(app, ["profile", TINY, "--trace", "/dev/full", *FAST])
        assert full.exit_code == 1 and "no space left on device while writing /dev/full" in full.stderr


def test_a_models_prints_never_reach_stdout(tmp_path, run_torchtool):
    (tmp_path / "noisy.py").write_text(textwrap.dedent("""
        import os
        import torch

        class Noisy(torch.nn.Linear):
            def forward(self, x):
                print("forward says hi")
                os.write(1, b"and so does C\\n")
                return super().forward(x)

        def model():
            return Noisy(4, 2)
    """))
    proc = run_torchtool("profile", str(tmp_path / "noisy.py") + ":model", "--input-size", "4", "--device", "cpu",
                         "--max-time", "0.05", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["forward"]["runs"] >= 5
    assert "forward says hi" in proc.stderr and "and so does C" in proc.stderr
