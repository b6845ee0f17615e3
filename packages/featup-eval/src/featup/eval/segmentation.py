"""End-to-end semantic segmentation (Section 4.4, Table 2): SegFormer with a pluggable feature upsampler.

:class:`SegFormer` is a Mix Transformer encoder (MiT-B0/B1 layouts of Xie et al. 2021: overlapping patch
embeddings, efficient self-attention with spatial reduction, Mix-FFN) and the all-MLP decoder. The decoder
projects each of the four stages (strides 4, 8, 16, 32) to ``embed_dim`` channels and brings stages 2-4 to the
stride-4 grid; that resize is the pluggable part (the experimental setting of SAPA/FADE that Table 2 follows):
``bilinear`` (the original SegFormer), or one learned upsampler per stage, ``resize_conv``, ``carafe``,
``sapa`` or ``jbu`` from ``featup.core``, guided by the input image where the method is guided. Everything
trains end to end.

:func:`count_gflops` counts with ``torch.utils.flop_counter.FlopCounterMode`` and reports multiply-adds
(FlopCounterMode counts 2 FLOPs per multiply-add; mmcv/fvcore, which the literature's tables use, count 1).
Element-wise work (softmax, normalisation, activations) is not counted by either. The fused
``featup::adaptive_conv`` op gets a FLOP formula registered here so JBU's kernel application is counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from featup.core import create_upsampler
from featup.core.checkpoint import load_checkpoint, save_checkpoint
from featup.eval._confusion import confusion_matrix, segmentation_scores
from featup.eval._io import ResultStore, format_number, markdown_table
from featup.eval.datasets import ADE20K, IGNORE_INDEX
from featup.eval.devices import loader_options, module_device, resolve_device, to_device

__all__ = [
    "DECODER_UPSAMPLERS",
    "MIT_VARIANTS",
    "MixTransformer",
    "SegFormer",
    "SegFormerHead",
    "count_gflops",
    "count_params",
    "evaluate_segmenter",
    "run_segmentation",
    "segmentation_table",
    "train_segmenter",
]

#: decoder upsamplers of Table 2 (name -> column label)
DECODER_UPSAMPLERS: dict[str, str] = {
    "bilinear": "Bilinear",
    "resize_conv": "Resize-conv",
    "carafe": "CARAFE",
    "sapa": "SAPA",
    "jbu": "FeatUp (JBU)",
}

#: MiT layouts: channels, blocks, heads and spatial-reduction ratios per stage
MIT_VARIANTS: dict[str, dict[str, tuple[int, ...]]] = {
    "b0": {"dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "heads": (1, 2, 5, 8), "sr": (8, 4, 2, 1)},
    "b1": {"dims": (64, 128, 320, 512), "depths": (2, 2, 2, 2), "heads": (1, 2, 5, 8), "sr": (8, 4, 2, 1)},
    "tiny": {"dims": (8, 16, 24, 32), "depths": (1, 1, 1, 1), "heads": (1, 1, 1, 1), "sr": (4, 2, 1, 1)},
}

_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class _OverlapPatchEmbed(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class _EfficientAttention(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int) -> None:
        super().__init__()
        self.heads, self.sr = heads, sr
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr > 1:
            self.reduce = nn.Conv2d(dim, dim, sr, sr)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        kv_in = x
        if self.sr > 1:
            grid = x.transpose(1, 2).reshape(b, c, h, w)
            ph, pw = (-h) % self.sr, (-w) % self.sr  # pad so any size reduces (a map smaller than sr too)
            if ph or pw:
                grid = F.pad(grid, (0, pw, 0, ph), mode="replicate")
            kv_in = self.norm(self.reduce(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(kv_in).reshape(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _MixFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dw(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(x))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, sr: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = _EfficientAttention(dim, heads, sr)
        self.ffn = _MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), h, w)
        return x + self.ffn(self.norm2(x), h, w)


class MixTransformer(nn.Module):
    """SegFormer's hierarchical encoder: four stages at strides 4, 8, 16, 32 of the input.

    Shape:
        - x: (B, 3, H, W) normalized image, any H, W
        - output: four maps (B, dims[i], ceil(H / 2^(i+2)), ceil(W / 2^(i+2)))
    """

    def __init__(
        self, dims: Sequence[int], depths: Sequence[int], heads: Sequence[int], sr: Sequence[int]
    ) -> None:
        super().__init__()
        self.dims = tuple(dims)
        self.embeds = nn.ModuleList(
            _OverlapPatchEmbed(3 if i == 0 else dims[i - 1], dims[i], 7 if i == 0 else 3, 4 if i == 0 else 2)
            for i in range(4)
        )
        self.stages = nn.ModuleList(
            nn.ModuleList(_Block(dims[i], heads[i], sr[i]) for _ in range(depths[i])) for i in range(4)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for embed, blocks, norm in zip(self.embeds, self.stages, self.norms):
            tokens, h, w = embed(x)
            for blk in blocks:
                tokens = blk(tokens, h, w)
            x = norm(tokens).transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
            outs.append(x)
        return outs


def _make_upsampler(name: str, dim: int, n_steps: int) -> nn.Module:
    """A decoder upsampler with exactly the ``n_steps`` 2x stages it runs (no unused parameters)."""
    if name == "jbu":  # encoder-agnostic stack: no per-feature parameters
        return create_upsampler("jbu", n_stages=n_steps)
    return create_upsampler(name, feat_dim=dim, n_stages=n_steps)


class SegFormerHead(nn.Module):
    """The all-MLP decoder with a pluggable resize of stages 2-4 onto the stride-4 grid.

    Shape:
        - feats: four maps (B, C_i, h_i, w_i); image: (B, 3, H, W) in [0, 1] (guidance)
        - output: (B, n_classes, h_1, w_1)
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        n_classes: int,
        embed_dim: int = 256,
        upsampler: str = "bilinear",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if upsampler not in DECODER_UPSAMPLERS:
            raise ValueError(
                f"unknown decoder upsampler {upsampler!r}; expected one of {', '.join(DECODER_UPSAMPLERS)}"
            )
        self.upsampler_name = upsampler
        self.proj = nn.ModuleList(nn.Conv2d(d, embed_dim, 1) for d in in_dims)
        self.upsamplers = nn.ModuleList(
            nn.Identity() if upsampler == "bilinear" else _make_upsampler(upsampler, embed_dim, i)
            for i in range(1, len(in_dims))  # stage i + 1 sits 2^i below stage 1
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(embed_dim * len(in_dims), embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(embed_dim, n_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        size = tuple(feats[0].shape[-2:])
        maps = [self.proj[0](feats[0])]
        for proj, up, f in zip(self.proj[1:], self.upsamplers, feats[1:]):
            x = proj(f)
            if self.upsampler_name == "bilinear":
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            else:
                x = up(x, image, output_size=size)
            maps.append(x)
        # SegFormer concatenates the deepest stage first
        return self.classify(self.dropout(self.fuse(torch.cat(maps[::-1], dim=1))))


class SegFormer(nn.Module):
    """SegFormer (MiT encoder + all-MLP decoder) whose decoder upsampler is ``upsampler``.

    Args:
        n_classes: classes to predict (150 for ADE20K).
        variant: a key of :data:`MIT_VARIANTS` ("b1" matches Table 2's 13.7M-parameter baseline).
        embed_dim: decoder width (256 for B0/B1).
        upsampler: a key of :data:`DECODER_UPSAMPLERS`.

    Shape:
        - image: (B, 3, H, W) RGB in [0, 1] (normalized inside)
        - output: (B, n_classes, H, W) logits (decoder output bilinearly enlarged from stride 4)
    """

    def __init__(
        self, n_classes: int = 150, *, variant: str = "b1", embed_dim: int = 256, upsampler: str = "bilinear"
    ) -> None:
        super().__init__()
        if variant not in MIT_VARIANTS:
            raise ValueError(f"unknown MiT variant {variant!r}; expected one of {', '.join(MIT_VARIANTS)}")
        self.n_classes, self.variant, self.embed_dim, self.upsampler = (
            n_classes,
            variant,
            embed_dim,
            upsampler,
        )
        spec = MIT_VARIANTS[variant]
        self.encoder = MixTransformer(spec["dims"], spec["depths"], spec["heads"], spec["sr"])
        self.decode_head = SegFormerHead(spec["dims"], n_classes, embed_dim, upsampler)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def config(self) -> dict[str, Any]:
        return {
            "n_classes": self.n_classes,
            "variant": self.variant,
            "embed_dim": self.embed_dim,
            "upsampler": self.upsampler,
        }

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"expected image (B,3,H,W) RGB in [0,1], got shape {tuple(image.shape)}")
        logits = self.decode_head(self.encoder((image - self.mean) / self.std), image)
        return F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


def _register_adaptive_conv_flops() -> None:
    """Teach FlopCounterMode the fused JBU op: 2 * B * C * H * W * K * K FLOPs (one multiply-add per tap)."""
    from torch.utils.flop_counter import register_flop_formula

    try:
        op = torch.ops.featup.adaptive_conv
    except (AttributeError, RuntimeError):
        return
    if getattr(_register_adaptive_conv_flops, "done", False):
        return

    @register_flop_formula(op)
    def _flops(inp_shape, filters_shape, *args, out_shape=None, **kwargs) -> int:
        b, c = inp_shape[0], inp_shape[1]
        _, h, w, k1, k2 = filters_shape
        return 2 * b * c * h * w * k1 * k2

    _register_adaptive_conv_flops.done = True  # type: ignore[attr-defined]


@torch.no_grad()
def count_gflops(model: nn.Module, size: Sequence[int] = (512, 512)) -> float:
    """Giga multiply-adds of one forward pass on a (1, 3, H, W) input (the mmcv/fvcore "GFLOPs" of papers)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_adaptive_conv_flops()
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))  # parameter-free: CPU
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, *size, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "seg": torch.stack([s["seg"] for s in samples]),
    }


def _optimizer_state(optim: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    index = {id(p): i for i, p in enumerate(params)}
    out = {}
    for p, st in optim.state.items():
        for k, v in st.items():
            out[f"optim.{index[id(p)]}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def _load_optimizer_state(
    optim: torch.optim.Optimizer, params: list[nn.Parameter], tensors: dict[str, torch.Tensor]
) -> None:
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            p = params[int(i)]
            # moments beside their parameter; Adam's step count stays on the CPU (no sync per step)
            optim.state[p][k] = v.cpu() if k == "step" else v.to(p.device)


def train_segmenter(
    model: SegFormer,
    dataset: Dataset,
    steps: int,
    *,
    batch_size: int = 16,
    lr: float = 6e-5,
    head_lr_mult: float = 10.0,
    weight_decay: float = 0.01,
    seed: int = 0,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    resume: bool = True,
    progress: bool = True,
    desc: str = "train",
    device: str | torch.device | None = None,
) -> SegFormer:
    """SegFormer's schedule: AdamW (decoder at ``head_lr_mult`` x lr), poly decay (power 1), random flips.

    Batches are drawn with a seeded generator from ``dataset`` (dict samples with ``image`` and ``seg`` of one
    size, e.g. :class:`~featup.eval.datasets.ADE20K` with ``crop=True``). Cross-entropy ignores 255.
    ``checkpoint_path`` holds weights, optimizer moments and the step; an interrupted run resumes from it.
    The model is moved to ``device`` (default: where its parameters are) and trained there.
    """
    if steps < 0:
        raise ValueError(f"expected steps >= 0, got {steps}")
    device = module_device(model) if device is None else torch.device(device)
    model.to(device)
    head = [p for n, p in model.named_parameters() if n.startswith("decode_head.")]
    enc = [p for n, p in model.named_parameters() if not n.startswith("decode_head.")]
    params = enc + head
    optim = torch.optim.AdamW(
        [{"params": enc, "lr": lr}, {"params": head, "lr": lr * head_lr_mult}],
        lr=lr,
        weight_decay=weight_decay,
    )
    base_lrs = [g["lr"] for g in optim.param_groups]
    start = 0
    ckpt = Path(checkpoint_path).with_suffix(".safetensors") if checkpoint_path is not None else None
    if ckpt is not None and resume and ckpt.is_file():
        tensors, cfg = load_checkpoint(ckpt, map_location=device)
        if cfg.get("model") != model.config():
            raise ValueError(
                f"{ckpt} holds another model ({cfg.get('model')}); use another --out or --no-resume"
            )
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _load_optimizer_state(optim, params, tensors)
        start = int(cfg["step"])

    def save(step: int) -> None:
        if ckpt is None:
            return
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(_optimizer_state(optim, params))
        save_checkpoint(ckpt, tensors, {"model": model.config(), "step": step, "steps": steps})

    n = len(dataset)  # type: ignore[arg-type]
    model.train()
    bar = tqdm(total=steps, initial=min(start, steps), disable=not progress, desc=desc)
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)  # per-step draws: resume = same batches
        idx = torch.randint(0, n, (batch_size,), generator=gen).tolist()
        batch = to_device(_collate([dataset[i] for i in idx]), device)
        flip = (torch.rand(batch_size, generator=gen) < 0.5).to(device)
        image = torch.where(flip[:, None, None, None], batch["image"].flip(-1), batch["image"])
        seg = torch.where(flip[:, None, None], batch["seg"].flip(-1), batch["seg"])
        for g, base in zip(optim.param_groups, base_lrs):
            g["lr"] = base * (1 - step / max(steps, 1))
        # dropout draws seeded per step (on the device's generator too), so a resumed run repeats them
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed * 1_000_003 + step)
            loss = F.cross_entropy(model(image), seg, ignore_index=IGNORE_INDEX)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.4g}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save(step + 1)
    bar.close()
    return model.eval()


@torch.no_grad()
def evaluate_segmenter(
    model: SegFormer,
    dataset: Dataset,
    *,
    progress: bool = True,
    desc: str = "evaluate",
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Whole-image inference, one image at a time (any size): mIoU, mAcc, aAcc in percent.

    Runs on ``device`` (default: where the model's parameters are; the model is moved there).
    """
    device = module_device(model) if device is None else torch.device(device)
    model.to(device).eval()
    conf = torch.zeros(model.n_classes, model.n_classes, dtype=torch.int64)
    loader = DataLoader(dataset, batch_size=1, collate_fn=_collate, **loader_options(device, num_workers))
    for batch in tqdm(loader, disable=not progress, desc=desc):
        batch = to_device(batch, device)
        conf += confusion_matrix(model(batch["image"]).argmax(1), batch["seg"], model.n_classes).to(
            conf.device
        )
    s = segmentation_scores(conf)
    return {"miou": s["miou"], "macc": s["macc"], "aacc": s["aacc"], "n_images": len(dataset)}  # type: ignore[arg-type]


def segmentation_table(results: dict[str, dict[str, Any]]) -> str:
    """Table 2 layout: a column per upsampler; params and GFLOPs absolute for bilinear, added for the rest."""
    names = list(results)
    base = results.get("bilinear", {})
    header = ["Metric", *(DECODER_UPSAMPLERS.get(n, n) for n in names)]

    def small(v: float) -> str:  # tiny models: keep two significant digits instead of printing 0.00
        return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2g}"

    def added(n: str, key: str) -> str:
        v = results[n].get(key)
        if v is None:
            return format_number(v)
        if n == "bilinear" or key not in base:
            return small(v)
        return "+" + small(v - base[key])

    rows = [
        ["mIoU", *(format_number(results[n].get("miou"), 1) for n in names)],
        ["mAcc", *(format_number(results[n].get("macc"), 1) for n in names)],
        ["aAcc", *(format_number(results[n].get("aacc"), 1) for n in names)],
        ["Params (M)", *(added(n, "params_m") for n in names)],
        ["GFLOPs", *(added(n, "gflops") for n in names)],
    ]
    return markdown_table(header, rows)


def run_segmentation(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    upsamplers: Sequence[str] | str | None = None,
    variant: str = "b1",
    embed_dim: int = 256,
    crop_size: int = 512,
    steps: int = 160_000,
    batch_size: int = 16,
    lr: float = 6e-5,
    flops_size: int = 512,
    encoder_weights: str | os.PathLike | None = None,
    max_train_images: int | None = None,
    max_val_images: int | None = None,
    seed: int = 0,
    checkpoint_every: int = 1000,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    device: str | torch.device | None = None,
    num_workers: int = 0,
) -> dict[str, dict[str, Any]]:
    """Everything behind ``featup segment``: per upsampler, train SegFormer on ADE20K training, evaluate on
    validation, count parameters and GFLOPs; results in ``out_dir/segment_results.json``.

    Everything runs on ``device`` (default :func:`~featup.eval.devices.default_device`: CUDA when available).
    """
    device = resolve_device(device)
    if upsamplers is None or upsamplers == "all":
        names = list(DECODER_UPSAMPLERS)
    else:
        asked = [
            u.strip()
            for u in (upsamplers.split(",") if isinstance(upsamplers, str) else upsamplers)
            if u.strip()
        ]
        unknown = [u for u in asked if u not in DECODER_UPSAMPLERS]
        if unknown:
            raise ValueError(
                f"unknown decoder upsampler {unknown[0]!r}; "
                f"expected names from {', '.join(DECODER_UPSAMPLERS)}"
            )
        names = [u for u in DECODER_UPSAMPLERS if u in set(asked) | {"bilinear"}]
    out_dir = Path(out_dir)
    train = ADE20K(data, "training", crop_size, crop=True, max_images=max_train_images)
    val = ADE20K(data, "validation", crop_size, crop=False, max_images=max_val_images)
    run_config = {
        "data": str(Path(data).resolve()),
        "variant": variant,
        "embed_dim": embed_dim,
        "crop_size": crop_size,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "encoder_weights": str(encoder_weights) if encoder_weights else None,
        "n_train": len(train),
        "n_val": len(val),
        "flops_size": flops_size,
    }
    store = ResultStore(out_dir / "segment_results.json", run_config, resume=resume)
    for name in names:
        if store.get(name) is not None:
            log(f"{DECODER_UPSAMPLERS[name]}: done in an earlier run, skipped")
            continue
        with torch.random.fork_rng():
            torch.manual_seed(seed)  # every upsampler starts from the same encoder and decoder weights
            model = SegFormer(
                ADE20K(data, "validation", crop_size).n_classes,
                variant=variant,
                embed_dim=embed_dim,
                upsampler=name,
            )
        if encoder_weights is not None:
            from safetensors.torch import load_file

            model.encoder.load_state_dict(load_file(str(encoder_weights)), strict=True)
        model.to(device)
        params_m = count_params(model) / 1e6
        gflops = count_gflops(model, (flops_size, flops_size))
        train_segmenter(
            model,
            train,
            steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            checkpoint_path=out_dir / "models" / name,
            checkpoint_every=checkpoint_every,
            resume=resume,
            progress=progress,
            desc=f"train {name}",
            device=device,
        )
        scores = evaluate_segmenter(
            model, val, progress=progress, desc=f"evaluate {name}", device=device, num_workers=num_workers
        )
        store.put(name, {**scores, "params_m": params_m, "gflops": gflops})
    return {n: store.get(n) for n in names}  # type: ignore[misc]
