"""Checkpoint loading: every supported layout gives the same model; bad checkpoints are refused by name."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenvl.config import QWenConfig
from qwenvl.weights import CheckpointError, load_model, resolve_dtype

TINY = Path(__file__).parent / "fixtures" / "qwen_vl_tiny"


@pytest.fixture(scope="module")
def state():
    return load_file(str(TINY / "model.safetensors"))


def _dir_with(tmp_path: Path, files: dict[str, dict], index_name: str | None = None) -> Path:
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    weight_map = {}
    for name, tensors in files.items():
        if name.endswith(".safetensors"):
            save_file(tensors, str(tmp_path / name))
        else:
            torch.save(tensors, tmp_path / name)
        weight_map.update({k: name for k in tensors})
    if index_name:
        (tmp_path / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path


def _same_as_reference(model, state) -> None:
    ours = model.state_dict()
    assert set(ours) == set(state)
    for k, v in state.items():
        assert torch.equal(ours[k], v), k


def _shards(state):
    keys = sorted(state)
    half = len(keys) // 2
    return {k: state[k] for k in keys[:half]}, {k: state[k] for k in keys[half:]}


def test_single_safetensors(state):
    _same_as_reference(load_model(TINY, "float32"), state)


def test_sharded_safetensors_with_index(tmp_path, state):
    a, b = _shards(state)
    d = _dir_with(tmp_path, {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b},
                  "model.safetensors.index.json")
    _same_as_reference(load_model(d, "float32"), state)


def test_pytorch_bin_and_sharded_bin(tmp_path, state):
    (tmp_path / "one").mkdir()
    _same_as_reference(load_model(_dir_with(tmp_path / "one", {"pytorch_model.bin": state}), "float32"), state)
    a, b = _shards(state)
    (tmp_path / "two").mkdir()
    d = _dir_with(tmp_path / "two", {"pytorch_model-00001-of-00002.bin": a, "pytorch_model-00002-of-00002.bin": b},
                  "pytorch_model.bin.index.json")
    _same_as_reference(load_model(d, "float32"), state)


def test_bin_with_code_in_the_pickle_is_refused(tmp_path, state):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = _dir_with(tmp_path, {})
    torch.save({"x": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_model(d)


@pytest.mark.parametrize("problem, match", [
    ("missing", r"missing: lm_head\.weight"),
    ("unexpected", r"unexpected: transformer\.extra\.weight"),
    ("misshaped", r"mis-shaped: transformer\.ln_f\.weight: checkpoint \(7,\) vs model \(128,\)"),
])
def test_bad_checkpoints_are_refused_by_name(tmp_path, state, problem, match):
    bad = dict(state)
    if problem == "missing":
        del bad["lm_head.weight"]
    elif problem == "unexpected":
        bad["transformer.extra.weight"] = torch.zeros(2)
    else:
        bad["transformer.ln_f.weight"] = torch.zeros(7)
    with pytest.raises(CheckpointError, match=match):
        load_model(_dir_with(tmp_path, {"model.safetensors": bad}))


def test_wrong_folders_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"a": "gone.safetensors"}}')
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path)


def test_config_with_unknown_or_inconsistent_fields_is_refused():
    raw = json.loads((TINY / "config.json").read_text())
    with pytest.raises(ValueError, match="does not know"):
        QWenConfig.from_dict({**raw, "mystery_knob": 3})
    with pytest.raises(ValueError, match="output_dim"):
        QWenConfig.from_dict({**raw, "hidden_size": 64})


def test_bf16_loading_and_default_dtype(tiny_cases):
    model = load_model(TINY, "bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    case = tiny_cases["text_only"]
    ref = load_model(TINY, "float32")
    ids = torch.tensor(case["input_ids"])
    with torch.no_grad():
        assert (model(ids).float() - ref(ids)).abs().max() < 0.5
    cfg = QWenConfig.from_dict(json.loads((TINY / "config.json").read_text()))
    assert resolve_dtype("auto", cfg) == torch.float32
    cfg.torch_dtype = "bfloat16"
    assert resolve_dtype("auto", cfg) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", cfg)


def test_presets_have_the_official_shapes():
    cfg = QWenConfig.from_name("Qwen-VL-Chat")
    assert (cfg.hidden_size, cfg.ffn_dim, cfg.visual.mlp_width, cfg.visual.grid_size) == (4096, 11008, 8192, 32)
    with torch.device("meta"):
        from qwenvl.model import QWenLMHeadModel
        n = sum(p.numel() for p in QWenLMHeadModel(cfg).parameters())
    assert 9.6e9 < n < 9.7e9, n


def test_safetensors_reader_matches_safetensors_for_every_dtype(tmp_path):
    from qwenvl.weights import iter_tensors

    state = {"f32": torch.randn(3, 5), "bf16": torch.randn(4).bfloat16(), "f16": torch.randn(2, 2).half(),
             "i64": torch.arange(7), "i8": torch.tensor([-3, 4], dtype=torch.int8), "u8": torch.tensor([255], dtype=torch.uint8),
             "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    read = dict(iter_tensors(path))
    assert read.keys() == state.keys()
    for key, tensor in state.items():
        assert read[key].dtype == tensor.dtype and torch.equal(read[key], tensor), key


def test_a_truncated_safetensors_file_is_a_checkpoint_error(tmp_path):
    from qwenvl.weights import iter_tensors

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="ends inside tensor data"):
        list(iter_tensors(path))


def test_atomic_write_leaves_an_ordinary_readable_file_and_no_temporary(tmp_path):
    from qwenvl.weights import atomic_write
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "config.json", lambda p: p.write_text("{}"))
    finally:
        os.umask(umask)
    assert (tmp_path / "config.json").read_text() == "{}"
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o644      # mkstemp alone gives 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


@pytest.mark.parametrize("make, fragment", [
    (lambda good: (2**62).to_bytes(8, "little") + b"{}", "header length 4,611,686,018,427,387,904 does not fit"),
    (lambda good: b"", "header length 0 does not fit in the file of 0 bytes"),
    (lambda good: (2).to_bytes(8, "little") + b"[]", "the header is a JSON list"),
    (lambda good: _with_header(good, lambda info: {**info, "data_offsets": [8, 0]}), "bad data_offsets [8, 0]"),
    (lambda good: _with_header(good, lambda info: {**info, "shape": [1000]}), "shape [1000] of F32 is 4000 bytes"),
])
def test_a_garbage_safetensors_header_is_a_checkpoint_error_not_a_crash(tmp_path, make, fragment):
    from qwenvl.weights import iter_tensors

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(2, 2)}, str(path))
    path.write_bytes(make(path.read_bytes()))
    with pytest.raises(CheckpointError, match=fragment.replace("[", r"\[")):
        list(iter_tensors(path))


def _with_header(data: bytes, edit) -> bytes:
    """The safetensors file `data` with its one tensor's header entry edited (data unchanged)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["w"] = edit(header["w"])
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


@pytest.mark.parametrize("change, fragment", [
    ({"visual": None}, "'visual' must be an object"),
    ({"visual": {"zzz": 1}}, "'visual' has keys this Qwen-VL implementation does not know: ['zzz']"),
    ({"num_hidden_layers": -1}, "num_hidden_layers must be a positive int, got -1"),
    ({"hidden_size": "big"}, "hidden_size must be a positive int, got 'big'"),
    ({"layer_norm_epsilon": None}, "layer_norm_epsilon must be a positive number, got None"),
])
def test_config_values_of_the_wrong_type_or_sign_are_refused_by_name(change, fragment):
    raw = json.loads((TINY / "config.json").read_text())
    if isinstance(change.get("visual"), dict):
        change = {"visual": {**raw["visual"], **change["visual"]}}
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        QWenConfig.from_dict({**raw, **change})


def test_config_json_that_is_not_an_object_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{tmp_path}/config.json must hold a JSON object"):
        QWenConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_bytes(b"\xff{}")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        QWenConfig.from_json(tmp_path / "config.json")
