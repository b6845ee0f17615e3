"""ViT adapters against independent references built from timm's own code paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from featup.backbones import create_backbone


def _manual_normalize(bb, image):
    mean = torch.tensor(bb.mean).view(1, 3, 1, 1)
    std = torch.tensor(bb.std).view(1, 3, 1, 1)
    return (image - mean) / std


def _grid(tokens, bb, h, w):
    # drop class/register tokens and fold (B, N, C) into (B, C, h, w)
    return tokens[:, bb.model.num_prefix_tokens :].reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", ["dino_vits16", "dinov2_vits14_reg", "vit_small_patch16_224", "clip_vitb16"])
def test_normalization_applied_exactly_once(built, name):
    bb = built(name)
    p = bb.patch_size
    image = torch.rand(1, 3, 3 * p, 5 * p)  # a multiple of the patch size: no resizing involved
    with torch.no_grad():
        ours = bb(image)
        ref = bb.model.forward_features(_manual_normalize(bb, image))  # timm's own path, final norm included
        if bb.project:
            ref = bb.model.head(ref)
        ref = _grid(ref, bb, 3, 5)
        twice = bb(bb.normalize(image).clamp(0, 1))  # a twice-normalized input gives different features
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, twice, atol=1e-3)


def test_already_normalized_input_is_rejected(built):
    bb = built("dino_vits16")
    image = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[0,1\]"):
        bb(bb.normalize(image))


@pytest.mark.parametrize("layer", [0, 2, -2])
def test_intermediate_layers_match_timm(layer):
    bb = create_backbone("dinov2_vits14", layer=layer, model_kwargs={"depth": 4})
    image = torch.rand(2, 3, 42, 70)
    with torch.no_grad():
        ours = bb(image)
        (ref,) = bb.model.forward_intermediates(
            _manual_normalize(bb, image), indices=[layer % 4], norm=True, intermediates_only=True
        )
    assert ours.shape == (2, 384, 3, 5)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("facet", "index"), [("query", 0), ("key", 1), ("value", 2)])
def test_qkv_facets_match_the_attention_projection(built, facet, index):
    base = built("dino_vits16")
    layer = 1
    bb = create_backbone("dino_vits16", facet=facet, layer=layer, model_kwargs={"depth": 2})
    bb.model.load_state_dict(base.model.state_dict())
    image = torch.rand(1, 3, 48, 80)
    captured = []
    handle = base.model.blocks[layer].attn.qkv.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            ours = bb(image)
            base(image)
    finally:
        handle.remove()
    assert ours.shape == (1, 384, 3, 5) and bb.feat_dim == 384
    c = 384
    ref = captured[0][..., index * c : (index + 1) * c]  # timm packs [q | k | v], heads contiguous
    torch.testing.assert_close(ours, _grid(ref, bb, 3, 5), rtol=1e-5, atol=1e-5)


def test_maskclip_is_the_identity_attention_value_path(built):
    bb = built("maskclip_vitb16")
    image = torch.rand(1, 3, 48, 64)
    x = _manual_normalize(bb, image)
    m = bb.model
    with torch.no_grad():
        ours = bb(image)
        tokens = m.norm_pre(m._pos_embed(m.patch_embed(x)))
        for blk in m.blocks[:-1]:
            tokens = blk(tokens)
        n = tokens.shape[1]
        # each token attends only to itself: softmax over a diagonal mask is the identity matrix
        mask = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
        tokens = m.blocks[-1](tokens, attn_mask=mask)
        ref = _grid(m.head(m.norm(tokens)), bb, 3, 4)
        clip = built("clip_vitb16")
        clip.model.load_state_dict(m.state_dict())
        regular = clip(image)
    assert ours.shape == (1, 512, 3, 4) and bb.facet == "value_path"
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, regular, atol=1e-3)  # differs from ordinary CLIP tokens


def test_clip_unprojected_tokens():
    bb = create_backbone("clip_vitb16", project=False, model_kwargs={"depth": 1})
    assert bb.feat_dim == 768 and bb(torch.rand(1, 3, 32, 48)).shape == (1, 768, 2, 3)
    bb = create_backbone("clip_vitb16", facet="key", model_kwargs={"depth": 1})
    assert bb.feat_dim == 768 and not bb.project


@pytest.mark.parametrize(
    ("name", "stride", "size", "grid"),
    [
        ("dino_vits16", 8, (224, 224), (28, 28)),
        ("dino_vits16", 4, (64, 96), (16, 24)),
        ("dinov2_vits14", 7, (200, 328), (29, 47)),
    ],
)
def test_strided_baseline_shapes(name, stride, size, grid):
    bb = create_backbone(name, stride=stride, model_kwargs={"depth": 2})
    assert bb.stride == stride and bb.model.patch_embed.proj.stride == (stride, stride)
    assert bb.output_size(*size) == grid
    with torch.no_grad():
        assert bb(torch.rand(1, 3, *size)).shape == (1, bb.feat_dim, *grid)


def test_strided_patch_embedding_is_the_dense_convolution():
    # with depth 0 the output is the positional-embedded patch embedding (plus final norm); check the token
    # at cell (i, j) is the patch of the edge-padded image starting at (i * s, j * s)
    s, p = 4, 16
    bb = create_backbone("dino_vits16", stride=s, final_norm=False, model_kwargs={"depth": 1})
    bb.model.blocks = torch.nn.Sequential(torch.nn.Identity())  # no transformer: tokens = embedding + pos
    bb.model.pos_embed.data.zero_()
    image = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        ours = bb(image)
        x = F.pad(_manual_normalize(bb, image), (6, 6, 6, 6), mode="replicate")  # (p - s) / 2 per side
        ref = F.conv2d(x, bb.model.patch_embed.proj.weight, bb.model.patch_embed.proj.bias, stride=s)
    assert ours.shape == (1, 384, 8, 12) == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert p - s == 12


def test_stride_equal_to_patch_is_the_default(built):
    base = built("dino_vits16")
    bb = create_backbone("dino_vits16", stride=16, model_kwargs={"depth": 2})
    bb.model.load_state_dict(base.model.state_dict())
    image = torch.rand(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(bb(image), base(image))


def test_positional_embeddings_follow_the_input_size(built):
    # the same content at two sizes must not crash and must give different grids (no fixed 224 assumption)
    bb = built("dinov2_vits14")
    with torch.no_grad():
        a = bb(torch.rand(1, 3, 14, 14))
        b = bb(torch.rand(1, 3, 518, 98))
    assert a.shape == (1, 384, 1, 1) and b.shape == (1, 384, 37, 7)


def test_fit_none_requires_multiples():
    bb = create_backbone("dino_vits16", fit="none", model_kwargs={"depth": 1})
    assert bb(torch.rand(1, 3, 32, 48)).shape == (1, 384, 2, 3)
    assert bb.output_size(33, 48) is None
    with pytest.raises(ValueError, match="multiples of the stride"):
        bb(torch.rand(1, 3, 33, 48))
