"""PCA: agreement with an SVD reference, sign convention, lossless round trip, clipping, state round trip."""

from __future__ import annotations

import pytest
import torch

from featup.core.pca import PCA


def low_rank_feats(rank: int, c: int = 12, b: int = 2, h: int = 5, w: int = 7, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randn(b, rank, h, w, generator=gen, dtype=torch.float64)
    basis = torch.randn(rank, c, generator=gen, dtype=torch.float64)
    offset = torch.randn(c, generator=gen, dtype=torch.float64)
    return torch.einsum("brhw,rc->bchw", codes, basis) + offset.view(1, c, 1, 1)


def test_matches_svd_reference_with_sign_convention():
    feats = low_rank_feats(12, seed=1)  # full rank
    pca = PCA(12, 5).double().fit(feats)
    x = feats.permute(0, 2, 3, 1).reshape(-1, 12)
    xc = x - x.mean(0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    ref = vh[:5]
    # the largest-magnitude entry of every component is positive
    pivots = pca.components.abs().argmax(1)
    assert (pca.components.gather(1, pivots[:, None]) > 0).all()
    signs = torch.sign(ref.gather(1, pivots[:, None]))
    torch.testing.assert_close(pca.components, ref * signs)
    torch.testing.assert_close(pca.explained_variance, s[:5] ** 2 / (x.shape[0] - 1))
    torch.testing.assert_close(pca.components @ pca.components.T, torch.eye(5, dtype=torch.float64))
    # transformed coordinates are centred, uncorrelated, with the explained variances
    z = pca.transform(feats).permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(z.mean(0), torch.zeros(5, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.T @ z / (z.shape[0] - 1), torch.diag(pca.explained_variance))


def test_lossless_when_k_at_least_rank():
    feats = low_rank_feats(4)
    for k in (4, 6, 12):
        pca = PCA(12, k).double().fit(feats)
        torch.testing.assert_close(pca.inverse_transform(pca.transform(feats)), feats)
        torch.testing.assert_close(
            pca.explained_variance_ratio[:4].sum(), torch.tensor(1.0, dtype=torch.float64)
        )
    lossy = PCA(12, 3).double().fit(feats)
    assert (lossy.inverse_transform(lossy.transform(feats)) - feats).abs().max() > 1e-3


def test_deterministic_and_order_invariant():
    feats = low_rank_feats(12, seed=3)
    a = PCA(12, 4).double().fit(feats)
    perm = feats.flip(0).flip(-1)  # same vectors in another order
    b = PCA(12, 4).double().fit(perm)
    torch.testing.assert_close(a.components, b.components)
    torch.testing.assert_close(a.mean, b.mean)


def test_fewer_samples_than_channels_clips_components():
    feats = low_rank_feats(12, c=12, b=1, h=2, w=3)  # 6 samples -> rank <= 5
    pca = PCA(12, 8).double().fit(feats)
    assert pca.n_components == 5 and pca.requested_components == 8
    torch.testing.assert_close(pca.inverse_transform(pca.transform(feats)), feats)
    assert PCA(3, 10).n_components == 3  # clipped to dim_in at construction


def test_float32_and_2d_input():
    x = torch.randn(200, 6)
    pca = PCA(6, 6).fit(x)
    assert pca.components.dtype == torch.float32
    feats = x.T.reshape(1, 6, 10, 20)
    torch.testing.assert_close(pca.inverse_transform(pca.transform(feats)), feats, atol=1e-5, rtol=1e-5)


def test_state_dict_round_trip_with_clipped_components():
    feats = low_rank_feats(12, b=1, h=2, w=3)
    pca = PCA(12, 8).double().fit(feats)
    fresh = PCA(12, 8).double()
    fresh.load_state_dict(pca.state_dict())
    assert fresh.fitted and fresh.n_components == 5
    torch.testing.assert_close(fresh.transform(feats), pca.transform(feats))


def test_errors():
    pca = PCA(4, 2)
    with pytest.raises(RuntimeError, match="not fitted"):
        pca.transform(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"\(B,4,H,W\)"):
        pca.fit(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="at least 2"):
        pca.fit(torch.zeros(1, 4, 1, 1))
    pca.fit(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"\(B,2,H,W\)"):
        pca.inverse_transform(torch.zeros(1, 3, 2, 2))
