"""ImplicitUpsampler: eq. 7 encoding, architecture, chunked rendering, shared call, checkpoints, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from featup.core.checkpoint import CheckpointError, save_checkpoint
from featup.core.implicit import ImplicitUpsampler, pixel_coordinates
from featup.core.pca import PCA


def make_model(
    feat_dim: int = 6, size=(9, 13), seed: int = 0, **kw
) -> tuple[ImplicitUpsampler, torch.Tensor]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 3, *size, generator=gen)
    feats = torch.randn(1, feat_dim, 5, 7, generator=gen)
    kw.setdefault("pca_dim", 4)
    kw.setdefault("hidden_dim", 16)
    kw.setdefault("n_freqs", 5)
    model = ImplicitUpsampler(feat_dim, size, **kw)
    model.set_image(image)
    model.set_pca(PCA(feat_dim, model.pca_dim).fit(feats))
    return model.eval(), image


def test_fourier_encoding_matches_eq7():
    model, _ = make_model(n_freqs=30)
    freqs = torch.exp(torch.linspace(-2, 10, 30))
    torch.testing.assert_close(model.freqs, freqs)
    coords = torch.tensor([[-0.5, 0.25], [0.9, -1.0]])
    colors = torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, 0.5]])
    enc = model.encode(coords, colors)
    assert enc.shape == (2, 2 * 5 * 30 + 3)
    z = torch.cat([coords, colors], 1)  # (y, x, r, g, b)
    for n in range(2):
        for c in range(5):
            for f in (0, 7, 29):
                i = c * 30 + f
                arg = z[n, c] * freqs[f]
                torch.testing.assert_close(
                    enc[n, i], torch.sin(arg + model.phases[0, c, f]), atol=2e-3, rtol=0
                )
                torch.testing.assert_close(
                    enc[n, 150 + i], torch.cos(arg + model.phases[1, c, f]), atol=2e-3, rtol=0
                )
    torch.testing.assert_close(enc[:, -3:], colors)
    assert model.phases.requires_grad


def test_architecture_is_three_layer_relu_mlp_with_layernorm_and_dropout():
    model = ImplicitUpsampler(384, (224, 224))
    linears = [m for m in model.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(303, 128), (128, 128), (128, 128)]
    assert sum(isinstance(m, nn.LayerNorm) for m in model.mlp) == 3
    assert [m.p for m in model.mlp if isinstance(m, nn.Dropout)] == [0.1] * 3
    assert sum(isinstance(m, nn.ReLU) for m in model.mlp) == 2
    # over two orders of magnitude smaller than an explicit 224x224x384 feature buffer (paper Section 3.2)
    assert sum(p.numel() for p in model.parameters()) * 100 < 224 * 224 * 384
    assert ImplicitUpsampler(64, (8, 8)).pca_dim == 64  # clipped to the feature dimension


def test_pixel_coordinates_are_resolution_consistent():
    c = pixel_coordinates((2, 4))
    torch.testing.assert_close(c[:, 0], torch.tensor([-0.5] * 4 + [0.5] * 4))
    torch.testing.assert_close(c[:, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75] * 2))
    torch.testing.assert_close(pixel_coordinates((5, 3), 4, 9), pixel_coordinates((5, 3))[4:9])


def test_render_at_image_size_equals_compressed_forward_unprojected():
    model, image = make_model()
    z = model.forward_compressed(image)
    assert z.shape == (1, 4, 9, 13)
    out = model.render()
    assert out.shape == (1, 6, 9, 13)
    torch.testing.assert_close(out, model.pca.inverse_transform(z), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.render(compressed=True), z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(37, 53), (1, 1), (20, 7)])
def test_chunked_render_equals_unchunked(size):
    model, _ = make_model()
    whole = model.render(size, chunk_pixels=10**7)
    for chunk in (1, 97, 512):
        torch.testing.assert_close(model.render(size, chunk_pixels=chunk), whole, atol=1e-6, rtol=1e-6)


def test_render_2048_is_bounded_by_chunks():
    model, _ = make_model(feat_dim=3, pca_dim=2, hidden_dim=4, n_freqs=2, size=(16, 16))
    seen: list[int] = []
    # the last layer sees every chunk on both paths (the grid path folds LayerNorm into the first layer)
    handle = model.mlp[-1].register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        out = model.render((2048, 2048), chunk_pixels=262144)
    finally:
        handle.remove()
    assert out.shape == (1, 3, 2048, 2048) and torch.isfinite(out).all()
    assert max(seen) <= 262144 and sum(seen) == 2048 * 2048 and len(seen) == 16


def test_render_is_deterministic_and_keeps_training_mode():
    model, _ = make_model()
    model.train()
    a = model.render((11, 5))
    b = model.render((11, 5))
    assert model.training
    assert torch.equal(a, b)
    assert a.is_inference()


def test_gradients_reach_every_parameter():
    model, image = make_model()
    model.train()
    model.forward_compressed(image).square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradcheck_float64():
    # moderate frequencies: with exp(10) the finite differences themselves would be the inaccurate side
    model, _ = make_model(size=(3, 4), n_freqs=3, hidden_dim=6, log_freq_range=(-2.0, 2.0))
    model = model.double().eval()
    image = torch.rand(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model.forward_compressed, (image,))
    phases = model.phases.detach().clone().requires_grad_()

    def with_phases(ph: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {"phases": ph}, (image.detach(),), strict=False)

    model.forward = model.forward_compressed  # functional_call goes through forward
    try:
        assert torch.autograd.gradcheck(with_phases, (phases,))
    finally:
        del model.forward


def test_fits_a_target_in_pca_space():
    """A few optimiser steps reduce the error to a fixed compressed target (the field is trainable)."""
    model, image = make_model(size=(12, 12), hidden_dim=32)
    target = torch.sin(3 * image.sum(1, keepdim=True)).expand(1, 4, 12, 12)
    opt = torch.optim.NAdam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = (model.forward_compressed(image) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_shared_call_sizes_and_checks():
    model, image = make_model()
    lr = torch.randn(1, 6, 3, 4)
    assert model(lr).shape == (1, 6, 9, 13)  # defaults to image_size
    assert model(lr, image).shape == (1, 6, 9, 13)
    assert model(lr, torch.rand(1, 3, 18, 26)).shape == (1, 6, 18, 26)
    assert model(lr, output_size=(31, 17)).shape == (1, 6, 31, 17)
    assert model(lr.double(), output_size=5).dtype == torch.float64
    with pytest.raises(ValueError, match="one image"):
        model(torch.randn(2, 6, 3, 4), output_size=4)
    with pytest.raises(ValueError, match="6 channels"):
        model(torch.randn(1, 5, 3, 4))


def test_save_load_round_trip_is_self_contained(tmp_path):
    model, image = make_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = model.save(tmp_path / "imp", extra={"backbone": "toy"})
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    loaded = ImplicitUpsampler.load(path)
    assert not loaded.training
    assert loaded.config() == model.config()
    torch.testing.assert_close(loaded.image, image)
    torch.testing.assert_close(loaded.render((17, 8)), model.render((17, 8)))


def test_corrupted_and_mismatched_checkpoints(tmp_path):
    model, _ = make_model()
    path = model.save(tmp_path / "imp")
    data = bytearray(path.read_bytes())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError):
        ImplicitUpsampler.load(bad)
    # right class name and config, wrong tensors
    other_path = save_checkpoint(
        tmp_path / "other", PCA(4, 2).state_dict(), {"class": "ImplicitUpsampler", "kwargs": model.config()}
    )
    with pytest.raises(CheckpointError, match="does not match"):
        ImplicitUpsampler.load(other_path)
    jbu_path = save_checkpoint(tmp_path / "jbu", model.state_dict(), {"class": "JBUStack", "kwargs": {}})
    with pytest.raises(CheckpointError, match="expected a ImplicitUpsampler checkpoint"):
        ImplicitUpsampler.load(jbu_path)


def test_pca_with_fewer_components_is_padded():
    model = ImplicitUpsampler(6, (4, 4), pca_dim=4, hidden_dim=8, n_freqs=3)
    feats = torch.randn(1, 6, 1, 3)  # 3 samples -> 2 components
    small = PCA(6, 4).fit(feats)
    assert small.n_components == 2
    model.set_pca(small)
    model.set_image(torch.rand(1, 3, 4, 4))
    z = torch.zeros(1, 4, 1, 3)
    z[:, :2] = small.transform(feats)
    torch.testing.assert_close(model.pca.inverse_transform(z), feats, atol=1e-5, rtol=1e-5)


def test_errors_before_fitting_and_bad_inputs():
    model = ImplicitUpsampler(6, (4, 5), pca_dim=4, hidden_dim=8, n_freqs=3)
    with pytest.raises(RuntimeError, match="no image"):
        model.render()
    with pytest.raises(ValueError, match=r"\(1, 3, 4, 5\)"):
        model.set_image(torch.rand(1, 3, 5, 4))
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        model.set_image(torch.rand(1, 3, 4, 5) * 255)
    model.set_image(torch.rand(1, 3, 4, 5))
    with pytest.raises(RuntimeError, match="no PCA"):
        model.render()
    with pytest.raises(ValueError, match="fitted"):
        model.set_pca(PCA(6, 4))
    with pytest.raises(ValueError, match="6-channel"):
        model.set_pca(PCA(5, 4).fit(torch.randn(1, 5, 4, 4)))
    with pytest.raises(ValueError, match="at most pca_dim"):
        model.set_pca(PCA(6, 6).fit(torch.randn(1, 6, 4, 4)))
    with pytest.raises(ValueError, match="image_size"):
        ImplicitUpsampler(6, (0, 4))
    assert math.isclose(model.dropout, 0.1)


# ----------------------------------------------------------------------------------------------------------
# the whole-grid field (fitting's fast path) against the per-pixel field (the reference)


def _perturbed(model: ImplicitUpsampler) -> ImplicitUpsampler:
    """Random non-trivial LayerNorm affines (they start at 1 / 0, which would hide a mistake)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _field_and_grads(model: ImplicitUpsampler, image: torch.Tensor, fast: bool):
    model.fast_field = fast
    calls: list[int] = []
    handle = model.mlp[0].register_forward_hook(lambda m, args, out: calls.append(1))
    try:
        torch.manual_seed(3)  # the same channel-dropout draws on both paths
        out = model.forward_compressed(image)
    finally:
        handle.remove()
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), list(model.parameters()))
    return out.detach(), grads, bool(calls)


@pytest.mark.parametrize("mode, training", [("channel", True), ("channel", False), ("element", False)])
def test_grid_field_equals_the_per_pixel_field_float64(mode, training):
    """Separable coordinate terms, colour angle sums and LayerNorm folded into the first layer compute the
    per-pixel encoding + MLP: outputs and every parameter's gradient agree to float64 rounding, with the
    same channel-dropout draws, at the default frequencies."""
    model, _ = make_model(size=(11, 7), n_freqs=6, hidden_dim=12, dropout_mode=mode)
    model = _perturbed(model.double()).train(training)
    image = torch.rand(1, 3, 11, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref, ref_grads, ref_norm = _field_and_grads(model, image, fast=False)
    out, grads, norm = _field_and_grads(model, image, fast=True)
    assert ref_norm and not norm  # the reference ran LayerNorm per pixel; the grid path folded it
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=name)


def _graph_nodes(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes ``out`` was computed through."""
    seen, names, todo = set(), set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(fn for fn, _ in node.next_functions)
    return names


def test_grid_field_feeds_the_hidden_layers_a_fresh_tensor():
    """The whole-grid first layer is one GEMM and its output is no view, so the in-place ReLU after it
    costs no CopySlices (a full clone and copy of the gradient) in backward."""
    model, image = make_model(size=(11, 7), n_freqs=4, dropout_mode="channel")
    model.train()
    names = _graph_nodes(model.forward_compressed(image))
    assert "AddmmBackward0" in names and "ReluBackward0" in names
    assert not names & {"CopySlices", "AsStridedBackward0", "BaddbmmBackward0"}, names


def test_scale_rows_equals_addcmul_with_its_gradients():
    """The grid field's ``c0 + acc * rstd`` with its cheaper backward: addcmul's values and gradients
    (float64), and finite differences."""
    from featup.core.implicit import _ScaleRows

    gen = torch.Generator().manual_seed(6)
    args = (
        torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_(),
        torch.randn(7, 5, dtype=torch.float64, generator=gen).requires_grad_(),
        torch.rand(7, 1, dtype=torch.float64, generator=gen).add(0.5).requires_grad_(),
    )
    weight = torch.randn(7, 5, dtype=torch.float64, generator=gen)
    out, ref = _ScaleRows.apply(*args), torch.addcmul(*args)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    for a, b in zip(
        torch.autograd.grad((out * weight).sum(), args), torch.autograd.grad((ref * weight).sum(), args)
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(_ScaleRows.apply, args)


def test_grid_field_is_not_used_where_it_would_differ():
    """Element dropout in training, gradients to the image, batches and autocast take the per-pixel path."""
    model, image = make_model(n_freqs=3, dropout_mode="element")
    _, _, norm = _field_and_grads(model.train(), image, fast=True)
    assert norm
    model.eval()
    assert model._grid_field_applies(image)
    assert not model._grid_field_applies(image.expand(2, -1, -1, -1))
    assert not model._grid_field_applies(image.clone().requires_grad_())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # its variance (a difference of means) needs float32
        assert not model._grid_field_applies(image)


def test_grid_field_gradcheck_float64():
    """Finite differences through the grid path for the parameters it restructures."""
    model, _ = make_model(size=(4, 5), n_freqs=3, hidden_dim=6, log_freq_range=(-2.0, 2.0))
    model = _perturbed(model.double()).eval()
    image = torch.rand(1, 3, 4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    names = ["phases", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    params = dict(model.named_parameters())
    start = tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert model._grid_field_applies(image)

    def grid(*values: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, values)), (image,), strict=False)

    model.forward = model.forward_compressed  # functional_call goes through forward
    try:
        assert torch.autograd.gradcheck(grid, start)
    finally:
        del model.forward


def test_grid_field_float32_is_as_close_to_float64_as_the_per_pixel_field():
    """In float32 the two paths differ by ~1e-3 at the top frequency exp(10) (the rounding of ``f * t``
    before the sine, not an error of either): both stay equally close to the float64 answer."""
    model, _ = make_model(size=(24, 20), n_freqs=30, hidden_dim=32)
    model = _perturbed(model).eval()
    image = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.double()
        truth = model.forward_compressed(image.double())
        model.float()
        errors = []
        for fast in (False, True):
            model.fast_field = fast
            errors.append(float((model.forward_compressed(image).double() - truth).abs().max()))
    assert errors[1] <= 3 * errors[0] + 1e-6, errors


def test_grid_field_colour_tables_follow_the_image():
    """The per-image colour tables are cached, but another image or an in-place change is never served
    stale tables."""
    model, _ = make_model(n_freqs=4)
    model.double().eval()  # float64: the paths agree to 1e-10 (float32: ~1e-3 at the top frequency)
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _ in range(2):
            image = torch.rand(1, 3, 9, 13, generator=gen, dtype=torch.float64)
            for change in (False, True):
                if change:
                    image.mul_(0.5)  # same tensor, new values
                model.fast_field = False
                ref = model.forward_compressed(image)
                model.fast_field = True
                torch.testing.assert_close(model.forward_compressed(image), ref, rtol=0, atol=1e-10)
