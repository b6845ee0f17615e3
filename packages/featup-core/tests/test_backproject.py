"""featup.core.backproject: the separable back-projection step against its definition."""

from __future__ import annotations

import pytest
import torch

from featup.core.backproject import backproject, backproject_reference

CASES = [
    ((2, 3, 4, 4), (64, 64)),
    ((1, 5, 7, 5), (109, 83)),
    ((1, 2, 14, 14), (224, 224)),
    ((1, 1, 3, 2), (3, 4)),
]


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
@pytest.mark.parametrize(("lr_shape", "size"), CASES)
def test_equals_pool_interpolate_definition(lr_shape, size, mode):
    gen = torch.Generator().manual_seed(0)
    lr = torch.randn(*lr_shape, generator=gen, dtype=torch.float64)
    out = torch.randn(*lr_shape[:2], *size, generator=gen, dtype=torch.float64)
    ref = backproject_reference(out, lr, mode)
    torch.testing.assert_close(backproject(out.clone(), lr, mode), ref, rtol=1e-10, atol=1e-10)
    # float32: no further from the float64 result than the definition in float32
    ours32 = backproject(out.float(), lr.float(), mode).double()
    ref32 = backproject_reference(out.float(), lr.float(), mode).double()
    assert (ours32 - ref).abs().max() <= 2 * (ref32 - ref).abs().max() + 1e-6


def test_in_place_without_autograd_and_the_result_pools_back_closer():
    gen = torch.Generator().manual_seed(1)
    lr = torch.randn(1, 4, 8, 8, generator=gen)
    out = torch.nn.functional.interpolate(lr, size=(64, 64), mode="bilinear", align_corners=False)
    before = (torch.nn.functional.adaptive_avg_pool2d(out, (8, 8)) - lr).abs().mean()
    ptr = out.data_ptr()
    with torch.no_grad():
        result = backproject(out, lr)
    assert result.data_ptr() == ptr  # no second output-sized buffer
    after = (torch.nn.functional.adaptive_avg_pool2d(result, (8, 8)) - lr).abs().mean()
    assert after < 0.5 * before
    kept = out.clone()
    assert backproject(kept, lr, inplace=False).data_ptr() != kept.data_ptr()


def test_gradients_equal_the_definitions():
    gen = torch.Generator().manual_seed(2)
    lr = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    out = torch.randn(2, 3, 20, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 20, 16, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (backproject, backproject_reference):
        g = torch.autograd.grad((fn(out, lr) * weight).sum(), (out, lr))
        grads.append(g)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_bad_arguments_say_what_was_expected():
    lr, out = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="same B and C"):
        backproject(out, lr[:, :2])
    with pytest.raises(ValueError, match="no larger than out"):
        backproject(lr, out)
    with pytest.raises(ValueError, match="mode"):
        backproject(out, lr, "nearest")
    with pytest.raises(ValueError, match="one dtype"):
        backproject(out, lr.double())
