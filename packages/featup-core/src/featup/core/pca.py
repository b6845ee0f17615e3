"""PCA over feature channels, as an ``nn.Module`` whose fitted state lives in buffers (so it checkpoints).

FeatUp compresses one image's features to their top 128 principal components while fitting the implicit
model (paper Section 3.3) and undoes the compression on output.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PCA"]


class PCA(nn.Module):
    """Principal components of feature vectors: ``fit``, ``transform``, ``inverse_transform``.

    ``fit`` is exact (an eigendecomposition of the channel covariance, or an SVD of the centred data when
    there are fewer samples than channels), computed in float64. Each component's sign is fixed so that its
    largest-magnitude coefficient is positive, which makes the result deterministic.

    The number of components is clipped to what the data supports: at most ``dim_in`` and at most
    ``n_samples - 1`` (the rank of centred data), so ``n_components`` after ``fit`` can be smaller than
    requested. With ``n_components >= rank`` the round trip ``inverse_transform(transform(x))`` is lossless
    on the fitted data.

    Args:
        dim_in: feature channels ``C``.
        n_components: requested number of components ``k``.

    Buffers:
        mean (C,), components (k, C) with orthonormal rows, explained_variance (k,), total_variance (),
        n_samples () (0 until fitted).

    Shape:
        - fit input: (B, C, H, W) or (N, C)
        - transform: (B, C, H, W) -> (B, k, H, W)
        - inverse_transform: (B, k, H, W) -> (B, C, H, W)
    """

    def __init__(self, dim_in: int, n_components: int) -> None:
        super().__init__()
        if int(dim_in) < 1 or int(n_components) < 1:
            raise ValueError(f"expected dim_in >= 1 and n_components >= 1, got {dim_in}, {n_components}")
        self.dim_in = int(dim_in)
        self.requested_components = int(n_components)
        k = min(self.requested_components, self.dim_in)
        self.register_buffer("mean", torch.zeros(self.dim_in))
        self.register_buffer("components", torch.eye(k, self.dim_in))
        self.register_buffer("explained_variance", torch.zeros(k))
        self.register_buffer("total_variance", torch.zeros(()))
        self.register_buffer("n_samples", torch.zeros((), dtype=torch.long))

    @property
    def n_components(self) -> int:
        """Number of components actually kept (after clipping to the data)."""
        return int(self.components.shape[0])

    @property
    def fitted(self) -> bool:
        return int(self.n_samples) > 0

    @property
    def explained_variance_ratio(self) -> torch.Tensor:
        """Fraction of the total variance explained by each kept component. Shape: (k,)."""
        return self.explained_variance / self.total_variance.clamp_min(torch.finfo(self.mean.dtype).tiny)

    def _samples(self, feats: torch.Tensor) -> torch.Tensor:
        if not isinstance(feats, torch.Tensor):
            raise TypeError(f"expected feats as a torch.Tensor (B,C,H,W), got {type(feats).__name__}")
        if not feats.is_floating_point():
            raise ValueError(f"expected floating-point feats, got dtype {feats.dtype}")
        if feats.dim() == 4 and feats.shape[1] == self.dim_in:
            return feats.permute(0, 2, 3, 1).reshape(-1, self.dim_in)
        if feats.dim() == 2 and feats.shape[1] == self.dim_in:
            return feats
        raise ValueError(
            f"expected feats (B,{self.dim_in},H,W) or (N,{self.dim_in}), got shape {tuple(feats.shape)}"
        )

    @torch.no_grad()
    def fit(self, feats: torch.Tensor) -> PCA:
        """Fit mean and top components to every pixel's feature vector; returns ``self``."""
        x = self._samples(feats).to(torch.float64)
        n = x.shape[0]
        if n < 2:
            raise ValueError(f"expected at least 2 feature vectors to fit a PCA, got {n}")
        mean = x.mean(0)
        xc = x - mean
        k = min(self.requested_components, self.dim_in, n - 1)
        if n >= self.dim_in:
            evals, evecs = torch.linalg.eigh(xc.T @ xc / (n - 1))  # ascending
            var = evals.flip(0)[:k].clamp_min(0)
            comps = evecs.flip(1)[:, :k].T
        else:
            _, svals, vh = torch.linalg.svd(xc, full_matrices=False)
            var = svals[:k].square() / (n - 1)
            comps = vh[:k]
        # deterministic sign: the largest-magnitude coefficient of each component is positive
        pivot = comps.abs().argmax(1, keepdim=True)
        comps = comps * torch.sign(comps.gather(1, pivot)).clamp_min(0).mul(2).sub(1)
        dtype, device = self.mean.dtype, self.mean.device
        self.mean = mean.to(device, dtype)
        self.components = comps.contiguous().to(device, dtype)
        self.explained_variance = var.to(device, dtype)
        self.total_variance = (xc.square().sum() / (n - 1)).to(device, dtype)
        self.n_samples = torch.tensor(n, dtype=torch.long, device=device)
        return self

    def _require_fitted(self) -> None:
        if not self.fitted:
            raise RuntimeError("PCA is not fitted: call fit(feats) first (or load a fitted state)")

    def transform(self, feats: torch.Tensor) -> torch.Tensor:
        """Coordinates of each pixel's feature vector in the principal basis.

        Shape:
            - feats: (B, C, H, W)
            - output: (B, k, H, W)
        """
        self._require_fitted()
        if not isinstance(feats, torch.Tensor) or feats.dim() != 4 or feats.shape[1] != self.dim_in:
            got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"expected feats (B,{self.dim_in},H,W), got {got}")
        centred = feats - self.mean.to(feats.dtype).view(1, -1, 1, 1)
        return torch.einsum("bchw,kc->bkhw", centred, self.components.to(feats.dtype))

    def inverse_transform(self, z: torch.Tensor) -> torch.Tensor:
        """Back from principal coordinates to feature space.

        Shape:
            - z: (B, k, H, W)
            - output: (B, C, H, W)
        """
        self._require_fitted()
        if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != self.n_components:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"expected z (B,{self.n_components},H,W), got {got}")
        out = torch.einsum("bkhw,kc->bchw", z, self.components.to(z.dtype))
        return out + self.mean.to(z.dtype).view(1, -1, 1, 1)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        # a fitted PCA may keep fewer components than requested: take the saved shapes if consistent
        comps = state_dict.get(prefix + "components")
        var = state_dict.get(prefix + "explained_variance")
        if (
            isinstance(comps, torch.Tensor)
            and isinstance(var, torch.Tensor)
            and comps.dim() == 2
            and comps.shape[1] == self.dim_in
            and var.shape == comps.shape[:1]
        ):
            self.components = torch.empty_like(
                comps, device=self.components.device, dtype=self.components.dtype
            )
            self.explained_variance = torch.empty_like(var, device=self.mean.device, dtype=self.mean.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"dim_in={self.dim_in}, n_components={self.n_components}, fitted={self.fitted}"
