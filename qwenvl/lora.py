"""LoRA as a module swap: each targeted linear becomes `LoRALinear(base)`, the model class is untouched.

    y = base(x) + scaling * B(A(dropout(x)))      A: [r, in] (Kaiming-uniform), B: [out, r] (zeros)
    scaling = alpha / r  (alpha / sqrt(r) with rsLoRA)

The base may be a float `nn.Linear` or `FastLinear` (LoRA) or a frozen quantized linear (`Int4Linear`, `GPTQLinear`,
`Int8Linear`: Q-LoRA); only A and B train. Attribute names follow PEFT (`base_layer`, `lora_A`,
`lora_B`, `lora_dropout`), so a module path here is the path PEFT saves under (see peft_format.py).

The official fine-tune script (qwen_vl.md §9.3) targets `c_attn`, `attn.c_proj`, `w1`, `w2` with r=64,
alpha=16, dropout 0.05, and also trains full copies of `wte` and `lm_head` ("modules to save") when the
base (non-chat) model is tuned, because it has never seen the ChatML tokens. Targets match like PEFT's:
a module whose dotted path equals a target or ends with `.` + target (a single string is a regex that
must match the whole path). In Qwen-VL they hit only the LLM: the ViT's linears are `in_proj`,
`out_proj`, `c_fc` and `mlp.c_proj` (which `attn.c_proj` does not match).
"""
from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .fast_linear import FastLinear

OFFICIAL_TARGETS = ("c_attn", "attn.c_proj", "w1", "w2")
BASE_MODEL_MODULES_TO_SAVE = ("wte", "lm_head")


@dataclass
class LoraSpec:
    """What to adapt and how (the fields of PEFT's LoraConfig that change the computation)."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = OFFICIAL_TARGETS
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    extra: dict = field(default_factory=dict)      # other adapter_config.json fields, written back unchanged

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank {self.r=} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA {self.dropout=} must be in [0, 1)")
        if not 0 < abs(self.alpha) < math.inf:
            raise ValueError(f"LoRA {self.alpha=} must be a finite non-zero number (0 scales every update to 0)")
        if not isinstance(self.target_modules, str):
            self.target_modules = tuple(self.target_modules)
        self.modules_to_save = tuple(self.modules_to_save or ())

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) for rsLoRA. Official: 16 / 64 = 0.25."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def matches(path: str, targets: tuple[str, ...] | str) -> bool:
    """PEFT's target rule. Example: "transformer.h.0.attn.c_proj" matches ("attn.c_proj",); the MLP's
    "transformer.h.0.mlp.c_proj" does not; the regex "transformer\\.h\\.0\\..*w1" matches "transformer.h.0.mlp.w1"."""
    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


class LoRALinear(nn.Module):
    """A frozen linear plus a trainable low-rank update; `merge()` folds the update into a float base."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = scaling
        device = _device_of(base)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        base.requires_grad_(False)
        self.reset_lora()

    @torch.no_grad()
    def reset_lora(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default init: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zeros, so the update starts at 0."""
        bound = 1 / math.sqrt(self.in_features)    # kaiming_uniform_(a=sqrt(5)) gives exactly this bound
        if self.lora_A.weight.device.type != "meta":
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)                                                   # [..., out]
        if self.merged:
            return y
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))     # [..., r] -> [..., out]
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """scaling * B @ A in float32: [out, r] @ [r, in] -> [out, in]."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        w = self._float_weight()
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self._float_weight()
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    def _float_weight(self) -> Tensor:
        if not isinstance(self.base_layer, (nn.Linear, FastLinear)):     # FastLinear: a model loaded for inference
            raise ValueError(f"cannot merge LoRA into a quantized {type(self.base_layer).__name__}: merge into the "
                             "float model instead (as the official README does for Q-LoRA adapters)")
        return self.base_layer.weight


def apply_lora(model: nn.Module, spec: LoraSpec, generator: torch.Generator | None = None,
               every_target: bool = True) -> list[str]:
    """Freeze `model`, swap each targeted linear for a LoRALinear, unfreeze the modules to save.

    Returns the swapped module paths; raises if nothing matched (a typo in the targets must not train nothing),
    and with `every_target` if any one target in a list matched nothing (a typo must not drop a target silently;
    loading someone else's adapter passes False, as PEFT accepts targets a model lacks).
    """
    model.requires_grad_(False)
    paths = [name for name, mod in model.named_modules() if matches(name, spec.target_modules) and _is_linear(mod)]
    if not paths:
        raise ValueError(f"no linear module matches the LoRA targets {spec.target_modules!r}")
    unmatched = [] if isinstance(spec.target_modules, str) or not every_target else \
        [t for t in spec.target_modules if not any(matches(p, (t,)) for p in paths)]
    if unmatched:                                  # a typo among several targets must not be dropped silently
        raise ValueError(f"LoRA targets {unmatched} match no linear module of the model "
                         f"(targets {spec.target_modules!r})")
    for path in paths:
        wrapped = LoRALinear(model.get_submodule(path), spec.r, spec.scaling, spec.dropout)
        wrapped.reset_lora(generator)
        _set_submodule(model, path, wrapped)
    for path in modules_to_save_paths(model, spec.modules_to_save):
        model.get_submodule(path).requires_grad_(True)
    return paths


def modules_to_save_paths(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Module paths matching the modules-to-save names (same suffix rule as the targets)."""
    if not names:
        return []
    paths = [n for n, _ in model.named_modules() if n and matches(n, tuple(names))]
    missing = [t for t in names if not any(matches(p, (t,)) for p in paths)]
    if missing:
        raise ValueError(f"modules_to_save {missing} name no module of the model")
    return paths


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            yield name, mod


def merge_lora(model: nn.Module) -> None:
    """Fold every update into its base weight (outputs unchanged up to rounding); `unmerge_lora` undoes it."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def unwrap_lora(model: nn.Module) -> None:
    """Merge, then put the plain base linears back: the module tree (and state dict) of the original model."""
    for path, layer in list(lora_layers(model)):
        layer.merge()
        _set_submodule(model, path, layer.base_layer)


@torch.no_grad()
def resize_token_rows(model: nn.Module, n_rows: int) -> None:
    """Give `transformer.wte` and `lm_head` `n_rows` vocabulary rows (config.vocab_size follows).

    Kept rows are copied; new rows start at the mean of the old ones (a neutral start for new tokens).
    Example: 1024 -> 1088 rows keeps rows 0..1023 and fills 1024..1087 with the row mean.
    """
    wte, head = model.transformer.wte, model.lm_head
    old = wte.weight.shape[0]
    if n_rows == old:
        return
    new_wte = nn.Embedding(n_rows, wte.embedding_dim, dtype=wte.weight.dtype, device=wte.weight.device)
    new_head = nn.Linear(head.in_features, n_rows, bias=False, dtype=head.weight.dtype, device=head.weight.device)
    for new, w in ((new_wte.weight, wte.weight), (new_head.weight, head.weight)):
        keep = min(old, n_rows)
        new[:keep] = w[:keep]
        new[keep:] = w.mean(0, keepdim=True)
        new.requires_grad_(w.requires_grad)
    model.transformer.wte, model.lm_head = new_wte, new_head
    model.config.vocab_size = n_rows


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear or one of the quantized linears (anything with in/out features and no submodules)."""
    return isinstance(module, nn.Linear) or (
        hasattr(module, "in_features") and hasattr(module, "out_features") and not list(module.children()))


def _device_of(module: nn.Module) -> torch.device:
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
