"""Image sources for training: the batch of a given step, deterministic in (seed, step, rank).

A tensor ``(N,3,H,W)`` or a map-style ``Dataset`` is read by index through a ``DistributedSampler``-like
order (:func:`featup.core._distributed.shard_indices`), so the batch of step ``k`` is computed directly
and resuming needs no data state. Any other iterable of ``(B,3,H,W)`` batches (a list, a ``DataLoader``,
an ``IterableDataset``) is cycled; under torchrun rank ``r`` of ``W`` takes batches ``r, r+W, ...`` of the
cycled stream (unless a ``DataLoader`` already shards with a ``DistributedSampler``), and a resumed run
fast-forwards the stream to its step. Each pass over an iterable starts under a global RNG seeded from
``(seed, pass)``, so a shuffling ``DataLoader`` repeats its order in a resumed run.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.distributed import DistributedSampler

from featup.core._distributed import DistContext, shard_indices

__all__ = ["BatchSource", "IndexedSource", "IterableSource", "derive_seed", "make_source", "validate_images"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from the given parts, identical in every process (unlike ``hash``)."""
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def validate_images(batch: object, where: str) -> torch.Tensor:
    """Require an RGB float batch (B,3,H,W) with values in [0,1]; ``where`` names its origin."""
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        batch = batch[0]  # (images, labels) pairs as yielded by labelled datasets
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"expected {where} as a torch.Tensor (B,3,H,W), got {type(batch).__name__}")
    if batch.dim() != 4 or batch.shape[1] != 3:
        hint = " (a single image: add a batch dimension)" if batch.dim() == 3 else ""
        raise ValueError(f"expected {where} (B,3,H,W) RGB in [0,1], got shape {tuple(batch.shape)}{hint}")
    if batch.numel() == 0:
        raise ValueError(f"expected non-empty {where} (B,3,H,W), got shape {tuple(batch.shape)}")
    if not batch.is_floating_point():
        raise ValueError(f"expected floating-point {where} with values in [0,1], got dtype {batch.dtype}")
    lo, hi = float(batch.min()), float(batch.max())
    if lo < -1e-3 or hi > 1 + 1e-3 or math.isnan(lo) or math.isnan(hi):
        raise ValueError(
            f"expected {where} RGB in [0,1] (un-normalized; backbones normalize internally), "
            f"got values in [{lo:.3g}, {hi:.3g}]"
        )
    return batch


class BatchSource:
    """The batch of images a rank trains on at a given step."""

    def batch(self, step: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class IndexedSource(BatchSource):
    """Batches drawn by index from ``n`` items in a per-epoch shuffled, rank-sharded order.

    The rank's stream is the concatenation of its epochs' shards; step ``k`` takes stream positions
    ``k*B .. k*B+B-1``, so a batch may straddle two epochs and no image is dropped.
    """

    def __init__(
        self,
        fetch: Callable[[Sequence[int]], torch.Tensor],
        n: int,
        batch_size: int,
        seed: int,
        ctx: DistContext,
    ) -> None:
        self._fetch = fetch
        self._n = n
        self._batch_size = batch_size
        self._seed = seed
        self._ctx = ctx
        self._per_rank = math.ceil(n / ctx.world_size)
        self._cache: dict[int, torch.Tensor] = {}

    def _epoch(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            # keep the previous epoch too: a batch may straddle two epochs
            self._cache = {e: v for e, v in self._cache.items() if e == epoch - 1}
            ctx = self._ctx
            self._cache[epoch] = shard_indices(self._n, epoch, self._seed, ctx.rank, ctx.world_size)
        return self._cache[epoch]

    def indices(self, step: int) -> list[int]:
        """Item indices of this rank's batch at ``step``."""
        out = []
        for pos in range(step * self._batch_size, (step + 1) * self._batch_size):
            epoch, offset = divmod(pos, self._per_rank)
            out.append(int(self._epoch(epoch)[offset]))
        return out

    def batch(self, step: int) -> torch.Tensor:
        return self._fetch(self.indices(step))


class IterableSource(BatchSource):
    """Batches taken from a cycled iterable; rank ``r`` of ``W`` keeps global batches ``r, r+W, ...``."""

    def __init__(self, iterable: Iterable, seed: int, ctx: DistContext, shard: bool) -> None:
        self._iterable = iterable
        self._seed = seed
        self._ctx = ctx
        self._shard = shard
        self._reset()

    def _reset(self) -> None:
        self._it: Iterator | None = None
        self._pass = -1
        self._in_pass = 0
        self._pos = 0  # global index of the next batch the stream yields

    def _start_pass(self) -> None:
        self._pass += 1
        self._in_pass = 0
        sampler = getattr(self._iterable, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self._pass)
        # a shuffling DataLoader draws its order from the global CPU RNG when its iterator is created; seed
        # only that one (torch.manual_seed would also seed every CUDA device, which this fork does not save)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self._seed, "data-pass", self._pass))
            self._it = iter(self._iterable)

    def _next(self) -> object:
        if self._it is None:
            self._start_pass()
        try:
            item = next(self._it)  # type: ignore[arg-type]
        except StopIteration:
            if self._in_pass == 0:
                raise ValueError("expected images to yield at least one (B,3,H,W) batch, got none") from None
            self._start_pass()
            try:
                item = next(self._it)  # type: ignore[arg-type]
            except StopIteration:
                raise ValueError(
                    "images is a one-shot iterator that ran out after "
                    f"{self._pos} batches; pass a re-iterable (tensor, list, Dataset or DataLoader) "
                    "so training can cycle over it"
                ) from None
        self._in_pass += 1
        self._pos += 1
        return item

    def batch(self, step: int) -> torch.Tensor:
        target = step * self._ctx.world_size + self._ctx.rank if self._shard else step
        if target < self._pos:
            self._reset()
        item: object = None
        while self._pos <= target:
            item = self._next()
        return validate_images(item, f"batch {target} of images")


def _stack_dataset_items(dataset: Dataset, indices: Sequence[int]) -> torch.Tensor:
    items = []
    for i in indices:
        item = dataset[i]
        if isinstance(item, (tuple, list)) and item:
            item = item[0]
        if not isinstance(item, torch.Tensor) or item.dim() != 3 or item.shape[0] != 3:
            got = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(f"expected dataset item {i} as an image tensor (3,H,W), got {got}")
        items.append(item)
    sizes = {tuple(t.shape) for t in items}
    if len(sizes) > 1:
        raise ValueError(f"expected dataset images of one size to form a batch, got sizes {sorted(sizes)}")
    return torch.stack(items)


def make_source(images: object, batch_size: int, seed: int, ctx: DistContext) -> BatchSource:
    """Build the batch source for ``images`` (tensor, map-style Dataset, or iterable of batches)."""
    if isinstance(images, torch.Tensor):
        validate_images(images, "images")
        return IndexedSource(lambda idx: images[list(idx)], images.shape[0], batch_size, seed, ctx)
    if isinstance(images, Dataset) and not isinstance(images, IterableDataset) and hasattr(images, "__len__"):
        n = len(images)  # type: ignore[arg-type]
        if n < 1:
            raise ValueError("expected a non-empty images Dataset, got one of length 0")
        return IndexedSource(
            lambda idx: validate_images(_stack_dataset_items(images, idx), "images from the dataset"),
            n,
            batch_size,
            seed,
            ctx,
        )
    if isinstance(images, Iterable) and not isinstance(images, (str, bytes)):
        presharded = isinstance(images, DataLoader) and isinstance(images.sampler, DistributedSampler)
        return IterableSource(images, seed, ctx, shard=not presharded)
    raise TypeError(
        "expected images as a tensor (N,3,H,W), a map-style Dataset of (3,H,W) images, or an iterable of "
        f"(B,3,H,W) batches, got {type(images).__name__}"
    )
