"""PackedLinear (fast_linear.py): a vision linear whose bf16 weight is held in oneDNN's blocked layout gives
F.linear's very bits, keeps nn.Linear's state-dict keys and values, and falls back to the reference elsewhere."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qwenvl.fast_linear import FastLinear, PackedLinear, packable, use_fast_vision_linears

BF16 = torch.bfloat16


def linear(n_in: int, n_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).to(BF16)


PACKS_HERE = packable(nn.Linear(8, 8).to(BF16))              # (no seeding at import)
needs_packing = pytest.mark.skipif(not PACKS_HERE, reason="no bf16 matmul instructions / oneDNN here")


@needs_packing
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("shape,bias", [((64, 96), True), ((80, 48), False), ((1280, 256), True)])
def test_the_same_bits_as_f_linear(rows, shape, bias):
    lin = linear(*shape, bias=bias)
    x = torch.randn(rows, shape[0]).to(BF16)
    want = F.linear(x, lin.weight, lin.bias)
    with torch.no_grad():
        got = PackedLinear(lin)(x)
    assert got.dtype == BF16 and torch.equal(got, want)


@needs_packing
def test_leading_dimensions_are_kept():
    lin = linear(32, 16)
    x = torch.randn(2, 5, 32).to(BF16)
    with torch.no_grad():
        assert torch.equal(PackedLinear(lin)(x), F.linear(x, lin.weight, lin.bias))


@needs_packing
def test_state_dict_is_nn_linears():
    lin = linear(48, 24)
    packed = PackedLinear(lin)
    want, got = lin.state_dict(), packed.state_dict()
    assert list(got) == list(want) == ["weight", "bias"]
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(packed.weight, lin.weight)


@needs_packing
def test_load_state_dict_packs_the_new_weight():
    packed, other = PackedLinear(linear(48, 24, seed=0)), linear(48, 24, seed=1)
    packed.load_state_dict(other.state_dict())
    x = torch.randn(9, 48).to(BF16)
    with torch.no_grad():
        assert torch.equal(packed(x), F.linear(x, other.weight, other.bias))
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        packed.load_state_dict(linear(40, 24).state_dict())
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        packed.load_state_dict({"bias": other.bias})
    with pytest.raises(RuntimeError, match="Unexpected key.*scale"):             # only `weight` is taken as known
        packed.load_state_dict({**other.state_dict(), "scale": other.bias})


@needs_packing
def test_other_inputs_take_the_reference_path():
    lin = linear(16, 8)
    packed = PackedLinear(lin)
    x = torch.randn(4, 16).to(BF16).requires_grad_()
    y = packed(x)                                        # gradients wanted: F.linear on the plain copy
    assert torch.equal(y, F.linear(x, lin.weight, lin.bias))
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with pytest.raises(RuntimeError):                    # float32 input: F.linear's own dtype error, as unpacked
        packed(torch.randn(4, 16))


def test_use_fast_vision_linears_packs_only_where_it_applies():
    model = nn.Sequential(linear(16, 32), nn.GELU(), linear(32, 8), nn.Linear(8, 4))       # the last: float32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fast_vision_linears(model) == 3
    kinds = [type(model[i]) for i in (0, 2, 3)]
    expected = PackedLinear if PACKS_HERE else FastLinear
    assert kinds == [expected, expected, FastLinear]
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
