"""Loading weights files safely: what torch's loader says is said once, in our words, on one line."""

from __future__ import annotations

import warnings

import pytest
import torch

from torchtool.core.models.checkpoint import load_checkpoint
from torchtool.core.output import Failure


@pytest.fixture
def state():
    return {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_newer_pickle_protocol_is_named_not_called_code(tmp_path, state, protocol, capsys):
    path = tmp_path / "w.pth"
    torch.save(state, path, pickle_protocol=protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's raw UserWarning must not escape
        with pytest.raises(Failure, match=f"saved with pickle protocol {protocol}, which torch's safe loader") as info:
            load_checkpoint(path)
    assert "torch.save(state_dict, path)" in info.value.hint and "needs code" not in info.value.message
    assert capsys.readouterr().err == ""


def test_a_torchscript_archive_is_named(tmp_path):
    path = tmp_path / "m.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.save's own deprecation note
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Failure, match=r"m\.pt is a TorchScript archive \(torch\.jit\.save\), not a weights file$"):
            load_checkpoint(path)


def test_the_default_protocol_loads_without_a_word(tmp_path, state, capsys):
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_checkpoint(path)
    assert torch.equal(loaded["w"], state["w"]) and capsys.readouterr().err == ""
