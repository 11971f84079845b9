"""Rendering, error lines and progress bars in torchtool.core.output."""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from torchtool.core import output

ROWS = [
    {"path": "a.jpg", "label": 3, "score": 0.25, "ok": True},
    {"path": "b c.jpg", "label": 10, "score": float("nan"), "ok": False},
]
RECORD = {"torch": {"version": "2.4.0", "cuda_build": None}, "cores": 8, "ratio": 1.5, "gpus": [], "env": {}}


class FakeTTY(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


# --- render ----------------------------------------------------------------------


def test_json_keeps_numbers_and_turns_nan_into_null():
    data = json.loads(output.render(ROWS, "json"))
    assert data[0] == {"path": "a.jpg", "label": 3, "score": 0.25, "ok": True}
    assert data[1]["score"] is None
    assert isinstance(data[1]["label"], int)


def test_json_of_a_record_with_infinities_and_paths(tmp_path):
    text = output.render({"loss": float("inf"), "out": tmp_path, "nested": {"x": -math.inf}}, "json")
    assert json.loads(text) == {"loss": None, "out": str(tmp_path), "nested": {"x": None}}
    assert "NaN" not in text and "Infinity" not in text


def test_jsonl_is_one_object_per_line():
    lines = output.render(ROWS, "jsonl").splitlines()
    assert [json.loads(line)["label"] for line in lines] == [3, 10]
    assert json.loads(lines[1])["score"] is None
    assert json.loads(output.render(RECORD, "jsonl")) == RECORD


def test_csv_rows_have_a_header_and_quote_what_needs_it():
    parsed = list(csv.reader(io.StringIO(output.render(ROWS, "csv"))))
    assert parsed[0] == ["path", "label", "score", "ok"]
    assert parsed[1] == ["a.jpg", "3", "0.25", "True"]
    assert parsed[2][0] == "b c.jpg" and parsed[2][1] == "10"


def test_csv_of_one_record_flattens_nested_keys():
    header, row = csv.reader(io.StringIO(output.render(RECORD, "csv")))
    assert dict(zip(header, row)) == {"torch.version": "2.4.0", "torch.cuda_build": "", "cores": "8",
                                      "ratio": "1.5", "gpus": ""}


def test_table_is_aligned_with_a_header():
    lines = output.render(ROWS, "table", columns=["label", "path"]).splitlines()
    assert lines[0].split() == ["label", "path"]
    assert lines[1].split() == ["3", "a.jpg"]
    assert lines[2].split() == ["10", "b", "c.jpg"]
    # the second column starts at the same place on every line
    assert {line.index(word) for line, word in zip(lines, ["path", "a.jpg", "b c.jpg"])} == {7}


def test_table_of_a_record_shows_sections():
    text = output.render(RECORD, "table")
    lines = text.splitlines()
    assert lines[0] == "torch:"
    assert lines[1].split() == ["version", "2.4.0"] and lines[1].startswith("  ")
    assert any(line.split() == ["cores", "8"] for line in lines)
    assert any(line.split() == ["ratio", "1.5"] for line in lines)


def test_unknown_format_is_a_usage_error():
    with pytest.raises(output.UsageError) as info:
        output.render(ROWS, "yaml")
    assert info.value.exit_code == output.EXIT_USAGE == 2
    assert "table, json, jsonl, csv" in info.value.hint


def test_emit_writes_data_to_stdout_only(capsys):
    output.emit(ROWS, "jsonl")
    captured = capsys.readouterr()
    assert [json.loads(line)["path"] for line in captured.out.splitlines()] == ["a.jpg", "b c.jpg"]
    assert captured.err == ""


def test_json_flag_is_shorthand_for_format_json():
    assert output.pick_format("csv", True) == "json"
    assert output.pick_format("csv", False) == "csv"
    assert output.pick_format(None) == "table"


# --- errors and colour -------------------------------------------------------------


def test_error_line_with_and_without_hint(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert output.error_line("no such file: x.jpg") == "torchtool: error: no such file: x.jpg"
    assert output.error_line("no GPU", "use --device cpu") == "torchtool: error: no GPU\n  hint: use --device cpu"


def test_error_line_is_red_on_a_terminal_unless_no_color(monkeypatch):
    monkeypatch.setattr("sys.stderr", FakeTTY())
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert output.error_line("x").startswith("\033[1;31mtorchtool: error:\033[0m")
    monkeypatch.setenv("NO_COLOR", "1")
    assert output.error_line("x") == "torchtool: error: x"
    assert not output.use_color(FakeTTY())
    monkeypatch.delenv("NO_COLOR")
    assert output.use_color(FakeTTY())
    assert not output.use_color(io.StringIO())


def test_errors_carry_their_exit_codes():
    assert output.UsageError("bad").exit_code == 2
    assert output.Failure("no GPU", hint="h").exit_code == 1
    assert output.Failure("no GPU", hint="h").hint == "h"
    assert output.EXIT_PARTIAL == 3


@pytest.mark.parametrize(("value", "enabled"), [("1", True), ("yes", True), ("", False), ("0", False),
                                                ("false", False), (None, False)])
def test_debug_enabled(monkeypatch, value, enabled):
    if value is None:
        monkeypatch.delenv("TORCHTOOL_DEBUG", raising=False)
    else:
        monkeypatch.setenv("TORCHTOOL_DEBUG", value)
    assert output.debug_enabled() is enabled


def test_warn_goes_to_stderr(capsys):
    output.warn("2 images could not be read")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "torchtool: 2 images could not be read\n"


# --- progress ------------------------------------------------------------------------


def test_progress_is_silent_when_stderr_is_not_a_terminal(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    bar = output.progress(range(5), desc="images")
    assert bar.disable
    assert list(bar) == [0, 1, 2, 3, 4]
    assert stream.getvalue() == ""


def test_progress_is_silent_when_quiet(monkeypatch):
    stream = FakeTTY()
    monkeypatch.setattr("sys.stderr", stream)
    bar = output.progress(range(3), quiet=True)
    assert bar.disable
    assert list(bar) == [0, 1, 2]
    assert stream.getvalue() == ""


def test_progress_draws_on_a_terminal_stderr(monkeypatch, capsys):
    stream = FakeTTY()
    monkeypatch.setattr("sys.stderr", stream)
    bar = output.progress(range(3), desc="images", unit="img")
    assert not bar.disable
    assert list(bar) == [0, 1, 2]
    bar.close()
    assert "images" in stream.getvalue()
    assert capsys.readouterr().out == ""


def test_table_columns_stay_aligned_with_wide_characters_and_newlines():
    from rich.cells import cell_len

    rows = [{"name": "猫の写真.jpg", "n": 1}, {"name": "line\nbreak\tand tab.jpg", "n": 22}, {"name": "🙂.png", "n": 3}]
    lines = output.render_table(rows).splitlines()
    assert len(lines) == 4  # one line per row: a newline in a name does not start a new row
    assert "line\\nbreak\\tand tab.jpg" in lines[2]
    # the second column starts at the same terminal cell on every line
    starts = {cell_len(line[:line.rindex(" ") + 1]) for line in lines}
    assert len(starts) == 1, lines


def test_a_record_value_with_a_newline_stays_on_its_line():
    text = output.render_mapping({"model": "a\nb", "classes": 3})
    assert text.splitlines() == ["model    a\\nb", "classes  3"]
