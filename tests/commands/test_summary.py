"""torchtool summary end to end: formats, MODEL as a factory / file / checkpoint, the graph, a 20B model, errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from torchtool.cli import app
from torchtool.core.models.checkpoint import save_checkpoint

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["summary", *map(str, args)])


def test_table_csv_and_json():
    table = invoke("resnet18", "--depth", "2")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["layer", "type", "output_shape", "params", "trainable", "macs"]
    assert any(re.match(r"\s+layer1\.0\s+BasicBlock\s+\[1, 64, 56, 56\]\s+73,984", line) for line in lines)
    text = table.stdout
    assert "11,689,512" in text and "1.814 G multiply-accumulates" in text and "3.628 G (2 x MACs)" in text
    assert "the meta device" in text and "forward+backward" in text

    csv_out = invoke("resnet18", "--depth", "1", "--format", "csv")
    header, first = csv_out.stdout.splitlines()[:2]
    assert header == "name,depth,type,output_shape,params,trainable,macs"
    assert first == 'conv1,1,Conv2d,"[1, 64, 112, 112]",9408,9408,118013952'

    report = json.loads(invoke("resnet18", "--json").stdout)
    for key in ("total_params", "trainable_params", "non_trainable_params", "macs", "flops", "param_bytes",
                "forward_bytes", "forward_backward_bytes", "layers"):
        assert isinstance(report[key], (int, list)), key
    assert set(report["layers"][0]) == {"name", "depth", "type", "output_shape", "params", "trainable", "macs"}


def _factories(root: Path) -> Path:
    """A package ``zoo`` (zoo.nets:small) and a file nets_file.py importing a helper beside it."""
    (root / "zoo").mkdir()
    (root / "zoo" / "__init__.py").write_text("")
    (root / "zoo" / "nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def small(width=8, classes=3):
            return nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(width, classes))

        def broken():
            return "not a model"

        NUMBER = 3
    """))
    (root / "helper.py").write_text("WIDTH = 16\n")
    (root / "nets_file.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        from helper import WIDTH

        def mlp(hidden=WIDTH):
            return nn.Sequential(nn.Linear(10, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    """))
    (root / "raises.py").write_text("raise RuntimeError('this module refuses to import')\n")
    return root


def test_module_and_file_factories_with_kwargs(tmp_path, monkeypatch):
    root = _factories(tmp_path)
    monkeypatch.syspath_prepend(str(root))
    report = json.loads(invoke("zoo.nets:small", "--kwargs", '{"width": 4}', "--input-size", "3,32,32",
                               "--json").stdout)
    assert report["total_params"] == (3 * 4 * 9 + 4) + (4 * 3 + 3)
    assert report["macs"] == 4 * 30 * 30 * 27 + 4 * 3 and report["output_shape"] == [1, 3]

    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(root)])  # nets_file.py's folder joins it
    result = invoke(str(root / "nets_file.py") + ":mlp", "--input-size", "10", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["total_params"] == (10 * 16 + 16) + (16 * 2 + 2)


def test_a_checkpoint_knows_its_model_and_input_size(tmp_path):
    model = torchvision.models.resnet18(num_classes=7)
    ckpt = save_checkpoint(tmp_path / "best.pth", {
        "arch": "resnet18", "classes": [str(i) for i in range(7)], "model": model.state_dict(),
        "preprocess": {"crop_size": 32, "resize_size": 36, "mean": [0.5] * 3, "std": [0.5] * 3}, "config": {}})
    result = invoke(ckpt, "--json")
    report = json.loads(result.stdout)
    assert report["total_params"] == sum(p.numel() for p in model.parameters())
    # at 32 px layer4's BatchNorm sees one value per channel, which training refuses at the default batch of 1:
    # the training memory is measured at 2, and said so
    assert report["forward_backward_batch_size"] == 2 and report["forward_backward_bytes"] > 0
    assert "forward+backward memory is for a batch of 2" in result.stderr
    assert report["input_size"] == [[3, 32, 32]] and report["output_shape"] == [1, 7]
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    bare = invoke(tmp_path / "bare.pth")
    assert bare.exit_code == 2 and "does not say which architecture" in bare.stderr


def _parse_dot(text: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    nodes = dict(re.findall(r'^\s+(\w+) \[label="((?:[^"\\]|\\.)*)"', text, re.M))
    edges = re.findall(r"^\s+(\w+) -> (\w+);", text, re.M)
    return nodes, edges


def test_graph_dot_names_parameters_and_joins_input_to_output(tmp_path):
    result = invoke("resnet18", "--input-size", "3,32,32", "--graph", tmp_path / "g.dot", "--depth", "0")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "g.dot").read_text()
    assert text.startswith("digraph autograd {") and text.rstrip().endswith("}")
    nodes, edges = _parse_dot(text)
    assert {a for e in edges for a in e} <= set(nodes)  # every edge joins declared nodes
    labels = set(nodes.values())
    for name, p in torchvision.models.resnet18().named_parameters():
        assert f"{name}\\n({', '.join(map(str, p.shape))})" in labels, name
    assert "ConvolutionBackward0" in labels and "AddmmBackward0" in labels
    start = next(n for n, label in nodes.items() if label.startswith("input 0"))
    reach, todo = {start}, [start]
    while todo:
        node = todo.pop()
        for a, b in edges:
            if a == node and b not in reach:
                reach.add(b)
                todo.append(b)
    assert any(nodes[n].startswith("output") for n in reach)  # the path from the input to the output
    if shutil.which("dot"):  # Graphviz's own parser agrees
        assert subprocess.run(["dot", "-Tcanon", str(tmp_path / "g.dot")], capture_output=True).returncode == 0
    again = invoke("resnet18", "--graph", tmp_path / "g.dot")
    assert again.exit_code == 2 and "already exists" in again.stderr


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_graph_svg_is_rendered_by_graphviz(tmp_path):
    result = invoke("squeezenet1_0", "--input-size", "3,64,64", "--graph", tmp_path / "g.svg", "--depth", "0")
    assert result.exit_code == 0, result.output
    assert "<svg" in (tmp_path / "g.svg").read_text() and "features.0.weight" in (tmp_path / "g.svg").read_text()


def test_graph_without_graphviz_writes_the_dot_and_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("torchtool.core.inspect.graph.shutil.which", lambda name: None)
    result = invoke("squeezenet1_0", "--input-size", "3,64,64", "--graph", tmp_path / "g.png", "--depth", "0")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "g.png").exists() and (tmp_path / "g.dot").read_text().startswith("digraph")
    assert "apt install graphviz" in result.stderr and str(tmp_path / "g.dot") in result.stderr


def test_fallback_to_a_real_forward_is_said_on_stderr():
    result = invoke("tests.core.test_summary:DataDependent", "--input-size", "8", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["measured_on"] == "cpu"
    assert "cannot run on the meta device" in result.stderr and "Traceback" not in result.stderr


BIG = textwrap.dedent("""
    import torch.nn as nn

    def transformer():  # 25.4 billion parameters: 101 GB of float32 weights
        return nn.Transformer(d_model=6144, nhead=48, num_encoder_layers=24, num_decoder_layers=24,
                              dim_feedforward=24576, batch_first=True)
""")


# The command as the console script runs it, then its own peak RSS (VmHWM) from /proc. A parent's
# wait4/getrusage would not do: a forked child's maximum includes the (large) pytest process it was forked from.
PEAK_RSS = """
import sys
from torchtool.cli import main
sys.argv = ["torchtool", *sys.argv[1:]]
try:
    main()
except SystemExit as done:
    code = done.code
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("peak_rss_kib", int(hwm.split()[1]), file=sys.stderr)
sys.exit(code)
"""


def test_a_20_billion_parameter_model_in_little_memory(tmp_path, run_python):
    (tmp_path / "big.py").write_text(BIG)
    proc = run_python("-c", PEAK_RSS, "summary", str(tmp_path / "big.py") + ":transformer", "--input-size",
                      "128,6144", "--input-size", "128,6144", "--depth", "1", "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["total_params"] == 25_371_893_760 and report["param_bytes"] == 4 * 25_371_893_760
    assert report["measured_on"] == "meta" and report["macs"] > 3e12
    peak = int(re.search(r"peak_rss_kib (\d+)", proc.stderr).group(1)) * 1024
    assert peak < 2 << 30, f"peak RSS {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("args, message", [
    (["resnet19"], "unknown model 'resnet19'"),
    (["zoo.nets:nothing"], "zoo.nets has no 'nothing'"),
    (["zoo.nets:broken"], "returned a str, not a torch.nn.Module"),
    (["zoo.nets:NUMBER"], "is a int, not a callable"),
    (["nowhere.at.all:f"], "cannot import 'nowhere.at.all'"),
    (["raises.py:f"], "importing raises.py failed: RuntimeError: this module refuses to import"),
    (["missing.py:f"], "no such file: missing.py"),
    (["resnet18", "--input-size", "2,64,64"],
     "in layer conv1 (Conv2d): RuntimeError: Given groups=1, weight of size [64, 3, 7, 7], expected input[1, 2, "
     "64, 64] to have 3 channels"),
    (["resnet18", "--input-size", "3,x,64"], "expected positive integers"),
    (["resnet18", "--input-size", "8:complex"], "unknown dtype 'complex'"),
    (["resnet18", "--kwargs", '{"num_classes": 10'], "--kwargs is not valid JSON"),
    (["resnet18", "--kwargs", "[1, 2]"], "--kwargs must be a JSON object"),
    (["resnet18", "--kwargs", '{"num_class": 10}'], "unexpected keyword argument 'num_class'"),
    (["resnet18", "--graph", "g.txt"], "unknown suffix .txt"),
])
def test_mistakes_are_one_line(tmp_path, monkeypatch, args, message):
    _factories(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code in (1, 2), result.output
    assert message in result.stderr, result.stderr
    assert result.stderr.startswith("torchtool: error: ") and "Traceback" not in result.stderr
    assert result.stdout == ""


CHATTY = textwrap.dedent("""
    import os
    import sys
    import torch.nn as nn

    print("importing chatty")
    os.write(1, b"a C library writes to file descriptor 1\\n")

    def model():
        print("building", file=sys.stdout)
        return nn.Linear(4, 2)

    def leaves():
        sys.exit("no GPU here, giving up")

    def leaves_quietly():
        sys.exit(3)
""")


def test_what_user_code_prints_goes_to_stderr_and_json_stays_clean(tmp_path, run_torchtool):
    (tmp_path / "chatty.py").write_text(CHATTY)
    proc = run_torchtool("summary", str(tmp_path / "chatty.py") + ":model", "--input-size", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total_params"] == 10  # nothing else on stdout
    for said in ("importing chatty", "a C library writes to file descriptor 1", "building"):
        assert said in proc.stderr
    result = invoke(str(tmp_path / "chatty.py") + ":model", "--input-size", "4", "--json")  # in this process
    assert json.loads(result.stdout)["total_params"] == 10 and "building" in result.stderr


@pytest.mark.parametrize("factory, line", [
    ("leaves", "building {}:leaves called sys.exit(1): no GPU here, giving up"),
    ("leaves_quietly", "building {}:leaves_quietly called sys.exit(3)"),
])
def test_a_factory_that_exits_is_reported_in_one_line(tmp_path, factory, line):
    (tmp_path / "chatty.py").write_text(CHATTY)
    spec = str(tmp_path / "chatty.py")
    result = invoke(f"{spec}:{factory}", "--input-size", "4", "--json")
    assert result.exit_code == 1 and result.stdout == ""
    assert "torchtool: error: " + line.format(spec) + "\n" in result.stderr and "Traceback" not in result.stderr


def test_a_module_that_exits_on_import_is_reported(tmp_path):
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(2)\n")
    result = invoke(str(tmp_path / "quits.py") + ":f")
    assert result.exit_code == 1 and "importing " + str(tmp_path / "quits.py") + " called sys.exit(2)" in result.stderr


def test_graph_outputs_are_checked_before_the_model_is_built(tmp_path, monkeypatch):
    (tmp_path / "marked.py").write_text(textwrap.dedent(f"""
        import torch.nn as nn

        def model():
            open({str(tmp_path / "built")!r}, "w").close()
            return nn.Linear(4, 2)
    """))
    spec = str(tmp_path / "marked.py") + ":model"
    (tmp_path / "g.dot").write_text("mine")
    taken = invoke(spec, "--input-size", "4", "--graph", tmp_path / "g.dot")
    assert taken.exit_code == 2 and "already exists" in taken.stderr
    monkeypatch.setattr("torchtool.core.inspect.graph.shutil.which", lambda name: None)
    fallback = invoke(spec, "--input-size", "4", "--graph", tmp_path / "g.svg")  # without dot, g.dot is written
    assert fallback.exit_code == 2 and f"{tmp_path / 'g.dot'} already exists" in fallback.stderr
    assert not (tmp_path / "built").exists() and (tmp_path / "g.dot").read_text() == "mine"


def test_the_benchmark_exits_1_when_a_goal_is_not_met(monkeypatch, capsys):
    """benchmarks/summary.py's verdict reaches its exit status (its measurements replaced by given figures)."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).parents[2] / "benchmarks"))
    bench = importlib.import_module("summary")
    monkeypatch.setattr(sys, "argv", ["summary.py", "--rounds", "1"])
    fast = {"torchtool": (1.0, 100), "torchinfo": (2.0, 300), "floor": (0.9, 100)}  # (seconds, peak RSS)

    def measure(argv):
        kind = "torchtool" if argv[0] == bench.torchtool_exe() else "torchinfo" if "torchinfo" in argv[-1] else "floor"
        return fast[kind]

    monkeypatch.setattr(bench, "measure", measure)
    bench.main()  # goals met: returns
    assert "goals met" in capsys.readouterr().out
    fast["torchtool"] = (3.0, 100)  # slower than torchinfo
    with pytest.raises(SystemExit) as done:
        bench.main()
    assert done.value.code == 1 and "goals NOT met" in capsys.readouterr().out


def test_a_graph_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, run_python):
    limited = textwrap.dedent("""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # a full disk, for this process only
        from torchtool.cli import main
        sys.argv = ["torchtool", *sys.argv[1:]]
        main()
    """)
    proc = run_python("-c", limited, "summary", "squeezenet1_0", "--input-size", "3,64,64", "--depth", "0",
                      "--graph", str(tmp_path / "g.dot"), env={"PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"torchtool: error: file too large while writing {tmp_path / 'g.dot'}" in proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []
