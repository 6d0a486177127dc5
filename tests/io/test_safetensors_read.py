"""Reading tensors from safetensors files: mapped (the default) and with positioned reads give the same
values, for whole tensors and row ranges at any offset; a mapped tensor written to leaves the file alone; a
file shorter than its header says is an error naming the file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mergesmith.io import safetensors_format
from mergesmith.io.safetensors_format import SafetensorsFormatError, read_header, read_tensor


@pytest.fixture
def stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, generator=g),  # a tensor at the data's start, the others at offsets of no page size
        "b": torch.randn(1001, 77, generator=g).to(torch.bfloat16),
        "c": torch.randn(300, 1500, generator=g),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    headers, _ = read_header(path)
    return tensors, headers, path


@pytest.mark.parametrize("mapped", [True, False])
def test_whole_tensors_and_row_ranges_read_back_equal(stored, monkeypatch, mapped):
    tensors, headers, _ = stored
    monkeypatch.setattr(safetensors_format, "MAP_READS", mapped)
    for name, tensor in tensors.items():
        assert torch.equal(read_tensor(headers[name]), tensor)
    for rows in [(0, 1), (17, 400), (999, 1001)]:
        assert torch.equal(read_tensor(headers["b"], rows), tensors["b"][rows[0] : rows[1]])
    assert torch.equal(read_tensor(headers["c"], (123, 299)), tensors["c"][123:299])


def test_a_mapped_tensor_is_a_private_copy_of_the_file(stored):
    tensors, headers, path = stored
    before = path.read_bytes()
    tensor = read_tensor(headers["c"])
    tensor.zero_()  # copy on write: the file keeps its bytes, a second read sees them
    assert path.read_bytes() == before
    assert torch.equal(read_tensor(headers["c"]), tensors["c"])


@pytest.mark.parametrize("mapped", [True, False])
def test_a_file_shorter_than_its_header_says_is_an_error_naming_it(stored, monkeypatch, mapped):
    _, headers, path = stored
    monkeypatch.setattr(safetensors_format, "MAP_READS", mapped)
    data = path.read_bytes()
    path.write_bytes(data[: headers["c"].start + 1000])  # "c" is cut short
    with pytest.raises(SafetensorsFormatError, match="model.safetensors: file ends inside tensor data"):
        read_tensor(headers["c"])
