"""Table 1 methods: backbone loading, strided / large-image / low-res definitions, DIP, reuse of training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from featup.eval import methods
from featup.eval.fixtures import TinyBackbone, make_cocostuff
from featup.eval.methods import (
    METHODS,
    DIPNet,
    DIPUpsampler,
    MethodConfig,
    build_method,
    fit_dip,
    load_backbone,
    method_settings,
    parse_methods,
)
from featup.eval.probes import LinearProbe

SPEC = "featup.eval.fixtures:tiny_backbone"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_parse_methods_orders_and_always_keeps_bilinear():
    assert parse_methods(None) == list(METHODS) == parse_methods("all")
    assert parse_methods("jbu,lowres") == ["lowres", "bilinear", "jbu"]
    assert parse_methods(["implicit"]) == ["bilinear", "implicit"]
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        parse_methods("nope,jbu")


def test_load_backbone_spec_stride_and_weights(tmp_path):
    bb = load_backbone(SPEC)
    assert isinstance(bb, TinyBackbone) and not bb.training and bb.stride == 8
    strided = load_backbone(SPEC, stride=4)
    x = torch.rand(1, 3, 32, 24)
    assert bb(x).shape == (1, 16, 4, 3) and strided(x).shape == (1, 16, 8, 6)
    # same weights, denser sampling: the strided map at even positions sees the same patches
    assert torch.allclose(strided.embed.weight, bb.embed.weight)
    other = TinyBackbone(seed=5)
    save_file(other.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = load_backbone(SPEC, weights=tmp_path / "w.safetensors")
    assert torch.allclose(loaded(x), other(x))
    with pytest.raises(ValueError, match="cannot import backbone factory"):
        load_backbone("featup.eval.fixtures:missing")


def test_simple_methods_match_their_definitions():
    bb = TinyBackbone()
    x = torch.rand(2, 3, 24, 40)
    lr = bb(x)
    low = build_method("lowres", bb, feat_dim=16)(x)
    bil = build_method("bilinear", bb, feat_dim=16)(x)
    assert low.shape == bil.shape == (2, 16, 24, 40)
    assert torch.equal(low[..., ::8, ::8], lr)  # every 8x8 block repeats its cell
    assert torch.allclose(bil, F.interpolate(lr, size=(24, 40), mode="bilinear", align_corners=False))
    # a linear probe commutes with nearest enlargement: low-res scores = low-res predictions enlarged
    probe = LinearProbe(16, 5)
    with torch.no_grad():
        enlarged = F.interpolate(probe(lr), size=(24, 40), mode="nearest-exact")
        assert torch.allclose(probe(low), enlarged, atol=1e-5)
    cfg = MethodConfig(strided_factor=2, large_factor=2)
    strided = build_method(
        "strided",
        bb,
        feat_dim=16,
        cfg=cfg,
        backbone_factory=lambda **kw: load_backbone(SPEC, **kw),
        backbone_stride=8,
    )(x)
    large = build_method("large_image", bb, feat_dim=16, cfg=cfg)(x)
    assert strided.shape == large.shape == (2, 16, 24, 40)
    expect = F.interpolate(TinyBackbone(stride=4)(x), size=(24, 40), mode="bilinear", align_corners=False)
    assert torch.allclose(strided, expect, atol=1e-6)
    big = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False).clamp(0, 1)
    assert torch.allclose(large, F.interpolate(bb(big), size=(24, 40), mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="divide the backbone stride"):
        build_method(
            "strided",
            bb,
            feat_dim=16,
            cfg=MethodConfig(strided_factor=3),
            backbone_factory=TinyBackbone,
            backbone_stride=8,
        )


def test_method_settings_cover_what_changes_the_output():
    cfg = MethodConfig()
    assert method_settings("bilinear", cfg) == {}
    assert method_settings("implicit", cfg)["implicit_steps"] == 2000
    assert "jbu_checkpoint" in method_settings("jbu", cfg) and "train_steps" in method_settings("carafe", cfg)


def test_dipnet_any_size_and_dip_fit_is_seeded():
    net = DIPNet(5, noise_dim=4, width=8, depth=3)
    assert net(torch.rand(1, 4, 21, 34)).shape == (1, 5, 21, 34)
    bb = TinyBackbone(dim=8)
    image = torch.rand(1, 3, 40, 32)
    a = fit_dip(bb, image, 2, n_jitters=2, pca_dim=4, kernel_size=5, width=8, depth=2, progress=False)
    b = fit_dip(bb, image, 2, n_jitters=2, pca_dim=4, kernel_size=5, width=8, depth=2, progress=False)
    lr = bb(image)
    out = a(lr, image)
    assert isinstance(a, DIPUpsampler) and out.shape == (1, 8, 40, 32) and torch.isfinite(out).all()
    assert torch.allclose(out, b(lr, image))
    assert a(lr, output_size=(7, 9)).shape == (1, 8, 7, 9)
    with pytest.raises(ValueError, match="fitted image"):
        a(torch.rand(1, 3, 6, 5), output_size=(7, 9))
    with pytest.raises(ValueError, match=r"one image \(1,3,H,W\)"):
        fit_dip(bb, torch.rand(2, 3, 16, 16), 1)


def test_dip_fit_lowers_the_multiview_loss():
    bb = TinyBackbone(dim=8)
    losses: list[float] = []
    fit_dip(
        bb,
        torch.rand(1, 3, 32, 32),
        40,
        n_jitters=2,
        pca_dim=8,
        kernel_size=8,
        lr=3e-3,
        width=16,
        depth=2,
        progress=False,
        callback=lambda step, loss: losses.append(loss),
    )
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5


def test_trained_upsamplers_are_saved_and_reused(tmp_path, monkeypatch):
    data = make_cocostuff(tmp_path / "coco", n_train=2, n_val=1, depth=False)
    from featup.eval.datasets import CocoStuff

    train = CocoStuff(data, "train2017", 32)
    bb = TinyBackbone()
    cfg = MethodConfig(train_steps=2, batch_size=2)
    m = build_method("carafe", bb, feat_dim=16, cfg=cfg, train_data=train, work_dir=tmp_path / "w")
    x = train[0]["image"][None]
    first = m(x)
    assert first.shape == (1, 16, 32, 32)
    assert (tmp_path / "w" / "upsamplers" / "carafe.safetensors").is_file()

    def boom(*a, **k):
        raise AssertionError("train_jbu must not run again")

    import featup.core.training as training

    monkeypatch.setattr(training, "train_jbu", boom)
    again = build_method("carafe", bb, feat_dim=16, cfg=cfg, train_data=train, work_dir=tmp_path / "w")
    assert torch.allclose(again(x), first)
    with pytest.raises(AssertionError, match="must not run"):  # other settings -> retrain
        build_method(
            "carafe",
            bb,
            feat_dim=16,
            cfg=MethodConfig(train_steps=3, batch_size=2),
            train_data=train,
            work_dir=tmp_path / "w",
        )
    assert methods.METHODS["jbu"] == "FeatUp (JBU)"


def test_old_module_name_is_a_deprecated_alias():
    import importlib
    import sys

    sys.modules.pop("featup.eval.baselines", None)
    with pytest.warns(DeprecationWarning, match="featup.eval.methods"):
        old = importlib.import_module("featup.eval.baselines")
    assert old.build_method is methods.build_method and old.fit_dip is methods.fit_dip
