"""profile's trace: a trace cut short by a failed write is never taken for a whole one."""

from __future__ import annotations

import json

import pytest
import torch

from torchtool.core.inspect.trace import _whole, export_trace, profiler


def test_a_trace_cut_short_is_not_whole(tmp_path):
    with profiler(torch.device("cpu")) as prof:
        torch.randn(16, 16) @ torch.randn(16, 16)
    export_trace(prof, tmp_path / "t.json")
    data = (tmp_path / "t.json").read_bytes()
    assert json.loads(data)["traceEvents"] and _whole(str(tmp_path / "t.json"))
    cut = tmp_path / "cut.json"
    for size in (0, 1, len(data) // 3, len(data) // 2, len(data) - 3):  # where a full disk may stop a write
        cut.write_bytes(data[:size])
        assert not _whole(str(cut)), size


@pytest.mark.parametrize("text, whole", [('{"traceEvents": []}', True), ('{"traceEvents": [', False)])
def test_a_trace_that_ends_otherwise_is_parsed(tmp_path, text, whole):
    (tmp_path / "t.json").write_text(text)
    assert _whole(str(tmp_path / "t.json")) is whole
