"""Checkpoint files: the only module that knows file formats and the official key names.

Our module tree uses the official names (`transformer.wte.weight`, `transformer.h.N.attn.c_attn.weight`,
`transformer.visual.attn_pool.pos_embed`, `lm_head.weight`, ...; qwen_vl.md §3.2), so a state dict
loads as is. The model is built on the meta device and each tensor is materialised once, in the target
dtype, straight from the file (read, not mapped): peak memory is the model plus one tensor.

Supported layouts: `model.safetensors`; sharded safetensors with `model.safetensors.index.json`;
`pytorch_model.bin` and its sharded index (read with `weights_only=True`, never unpickling code).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import GenerationConfig, QWenConfig
from .heap import TrimEvery
from .model import QWenLMHeadModel
from .quantize import quantized_swap

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """The files in a checkpoint directory do not make a model this code can load."""


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory, in the order their index lists them."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory (expected a checkpoint folder with config.json)")
    for index, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        if (d / index).is_file():
            return _files_from_index(d, d / index)
        if (d / single).is_file():
            return [d / single]
    raise CheckpointError(f"no weights in {d}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")


def _files_from_index(d: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index} is not a valid index (needs a 'weight_map'): {e}") from None
    files = [d / name for name in dict.fromkeys(weight_map.values())]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index.name} lists shards that are missing: {missing}")
    return files


def iter_tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(key, tensor) pairs of one weight file, one at a time (safetensors) or memory-mapped (.bin)."""
    if path.suffix == ".safetensors":
        yield from _read_safetensors(path)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a bad pickle; name the file
        raise CheckpointError(f"cannot read {path} as a weights-only PyTorch file: {e}") from None
    yield from state.items()


TRIM_BYTES = 256 << 20          # _read_safetensors trims the heap once per this many bytes read
SAFE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool}


def _read_safetensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """Each tensor of a safetensors file read into its own memory by plain reads (8-byte header length, JSON
    header, raw little-endian data). Not through safe_open's memory map: every page of a mapped file that was read
    stays resident as long as any tensor of the file lives, so converting a bf16 file to float32 held both
    (1.5x the model), and fusing projections (fused_projections.py) kept the unfused pages too. The heap is trimmed
    every 256 MB read: the caller's conversions free each tensor as read, and the holes would stay resident."""
    trim = TrimEvery(TRIM_BYTES)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:        # before reading: a garbage length would allocate up to 2**64 bytes
                raise ValueError(f"the header length {n:,} does not fit in the file of {size:,} bytes")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
            for key, info in header.items():
                if key != "__metadata__":
                    tensor = _read_one(f, 8 + n, info, size)
                    yield key, tensor
                    trim.add(tensor.nbytes)
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CheckpointError(f"cannot read {path} as safetensors: {type(e).__name__}: {e}") from None


def _read_one(f, base: int, info: dict, size: int) -> Tensor:
    begin, end = info["data_offsets"]
    dtype = SAFE_DTYPES[info["dtype"]]
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
        raise ValueError(f"bad data_offsets {info['data_offsets']!r}")
    if base + end > size:
        raise ValueError(f"the file ends inside tensor data ({begin}..{end})")
    n_bytes = math.prod(info["shape"]) * dtype.itemsize
    if n_bytes != end - begin:
        raise ValueError(f"shape {info['shape']} of {info['dtype']} is {n_bytes} bytes, data_offsets say {end - begin}")
    raw = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(base + begin)
    if f.readinto(raw.numpy()) != end - begin:
        raise ValueError(f"the file ends inside tensor data ({begin}..{end})")
    return raw.view(dtype).reshape(info["shape"])


def resolve_dtype(dtype: str | torch.dtype | None, config: QWenConfig) -> torch.dtype:
    """The compute dtype: explicit, else float32 for float32 checkpoints and bfloat16 for half ones.

    float16 checkpoints run in bfloat16 by default on CPU (fp16 matmuls are slow there and overflow-prone).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if config.torch_dtype in ("float32", "fp32") else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


def config_path(model_dir: str | Path, family: str = "Qwen-VL") -> Path:
    """`model_dir/config.json`, or a CheckpointError saying what is wrong with the folder."""
    if not Path(model_dir).is_dir():
        raise CheckpointError(f"{model_dir} is not a directory (expected a checkpoint folder with config.json)")
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir} has no config.json: is this a {family} checkpoint folder?")
    return path


def load_config(model_dir: str | Path) -> QWenConfig:
    return QWenConfig.from_json(config_path(model_dir))


def load_generation_config(model_dir: str | Path) -> GenerationConfig:
    path = Path(model_dir) / "generation_config.json"
    return GenerationConfig.from_json(path) if path.is_file() else GenerationConfig()


def load_model(model_dir: str | Path, dtype: str | torch.dtype | None = "auto") -> QWenLMHeadModel:
    """Build the model on the meta device and fill it from the checkpoint, checking every tensor."""
    config = load_config(model_dir)
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
        if config.quantization_config:
            quantized_swap(model, config.quantization_config)   # quantized shells with the stored names
    load_into(model, checkpoint_files(model_dir), dtype)
    return model.eval()


def load_into(model: nn.Module, files: list[Path], dtype: torch.dtype) -> None:
    """Materialise `model`'s (meta) parameters from `files`; refuse missing/unexpected/mis-shaped keys."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state: dict[str, Tensor] = {}
    unexpected, misshaped = [], []
    for path in files:
        for key, tensor in iter_tensors(path):
            if key not in expected:
                unexpected.append(key)
            elif tensor.shape != expected[key]:
                misshaped.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[key])}")
            else:
                state[key] = tensor.to(dtype) if tensor.is_floating_point() and not _keep_stored(key) else tensor
    missing = sorted(set(expected) - set(state) - set(unexpected))
    raise_if_mismatched(files[0].parent, missing, unexpected, misshaped)
    model.load_state_dict(state, strict=True, assign=True)
    _restore_frozen(model)


def _keep_stored(key: str) -> bool:
    # Quantization scales stay as stored (GPTQ: float16; ours: float32): dequantising in float32 is then
    # exact, where a cast to bf16 would lose bits.
    return key.endswith(".scales")


def raise_if_mismatched(d: Path, missing: list[str], unexpected: list[str], misshaped: list[str]) -> None:
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {d} does not match its config.json — " + "; ".join(problems))


def _restore_frozen(model: nn.Module) -> None:
    # assign=True replaces Parameters with the loaded tensors' requires_grad; keep the table frozen.
    for name, p in model.named_parameters():
        if name.endswith("attn_pool.pos_embed"):
            p.requires_grad_(False)


def own_storage(t: Tensor) -> Tensor:
    """t, or a copy of it when it is a view into a larger tensor (fused_projections): safetensors refuses to write
    tensors that share memory."""
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def save_checkpoint(model: QWenLMHeadModel, out_dir: str | Path, generation_config: GenerationConfig | None = None,
                    dtype: torch.dtype | None = None) -> Path:
    """Write config.json (+ generation_config.json) and model.safetensors in the official layout, atomically."""
    return write_checkpoint(model.state_dict(), model.config, out_dir, generation_config, dtype)


def write_checkpoint(state: dict[str, Tensor], config: QWenConfig, out_dir: str | Path,
                     generation_config: GenerationConfig | None = None, dtype: torch.dtype | None = None) -> Path:
    """save_checkpoint for a state dict that is not a module's (e.g. one gathered from sharded ranks)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: own_storage((v.to(dtype) if dtype and v.is_floating_point() else v).contiguous())
             for k, v in state.items()}
    config_dict = config.to_dict()
    if dtype is not None:
        config_dict["torch_dtype"] = str(dtype).removeprefix("torch.")
    atomic_write(out / SAFE_SINGLE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(out / "config.json", lambda p: p.write_text(json.dumps(config_dict, indent=2, ensure_ascii=False)))
    if generation_config is not None:
        text = json.dumps(generation_config.to_dict(), indent=2)
        atomic_write(out / "generation_config.json", lambda p: p.write_text(text))
    return out


def check_new_checkpoint_dir(out: Path, source: Path) -> None:
    """Refuse (before any work) an output folder that is a file, lies under one, is the `source` checkpoint or
    already holds a checkpoint: writing there would lose it. The folder itself is made when the result is written.

    Example: check_new_checkpoint_dir(Path("m"), Path("m")) -> "--out m is the input checkpoint ..."."""
    out, source = Path(out), Path(source)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the input checkpoint: writing there would replace its weights")
    held = [n for n in ("config.json", SAFE_SINGLE, "model.safetensors.index.json") if (out / n).exists()]
    if held:
        raise ValueError(f"--out {out} already holds a checkpoint ({', '.join(held)}): choose another --out or "
                         "delete it")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {out}: cannot create the folder ({parent} is a file)")


def make_out_dir(out: Path) -> None:
    """Create an --out folder, or a ValueError saying why it cannot be one (a file, or a file on the way to it).
    Example: make_out_dir(Path("notes.txt")) for an existing file -> "--out notes.txt is a file, not a folder ..."."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise ValueError(f"--out {out}: cannot create the folder ({e.strerror}: {e.filename})") from None


def atomic_write(path: Path, write) -> None:
    """write(tmp) into a temporary file beside `path`, then rename it over `path`: a reader sees the old file or
    the whole new one. The file gets the permissions of an ordinary new file (mkstemp's are owner-only)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_random_checkpoint(config: QWenConfig, out_dir: str | Path, seed: int = 0,
                           generation_config: GenerationConfig | None = None) -> Path:
    """A randomly initialised model written in the official layout (demos, tests, benchmarks)."""
    model = QWenLMHeadModel(config)
    model.init_weights(torch.Generator().manual_seed(seed))
    return save_checkpoint(model, out_dir, generation_config or GenerationConfig())
