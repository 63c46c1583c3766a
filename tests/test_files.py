"""Reading a model folder's files: a damaged one is named in the error, with what is wrong in it."""
import pytest
import torch
from safetensors.torch import save_file

from packformer.files import ModelFileError, read_json, read_safetensors


def test_json_is_read_and_bad_json_names_its_file(tmp_path):
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"a": [1, 2]}')
    bad.write_text('{"a": ')
    assert read_json(good) == {"a": [1, 2]}
    with pytest.raises(ModelFileError, match=rf"{bad} is not valid JSON: Expecting value"):
        read_json(bad)
    bad.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ModelFileError, match="is not valid JSON"):
        read_json(bad)


def test_a_truncated_safetensors_file_is_named(tmp_path):
    f = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(600.0)}, str(f))
    assert torch.equal(read_safetensors(f)["w"], torch.arange(600.0))
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ModelFileError, match=rf"{f} is not a readable safetensors file"):
        read_safetensors(f)
    assert issubclass(ModelFileError, ValueError)
