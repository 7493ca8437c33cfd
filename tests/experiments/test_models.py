"""Networks: exact parameter counts, normalization placement, shortcuts, weight-decay groups.

Budget: about 3 s (VGG-16 is built once; forwards use 2-4 small images).
"""
import pytest
import torch
from torch import nn

from experiments.models import (MODEL_NAMES, ZeroPadShortcut, build_model, count_parameters,
                                param_groups_no_wd)


def _resnet_count(depth, width=16, classes=10, norm_params=2):
    """Closed-form parameter count of a CIFAR ResNet with option-A (parameter-free) shortcuts."""
    n = (depth - 2) // 6
    total = 9 * 3 * width + norm_params * width                     # stem conv + norm
    cin = width
    for stage in range(3):
        c = width * 2 ** stage
        for _ in range(n):
            total += 9 * cin * c + 9 * c * c + 2 * norm_params * c
            cin = c
    return total + cin * classes + classes                           # linear head


@pytest.mark.parametrize("name,depth,published", [("resnet20", 20, 0.27e6), ("resnet32", 32, 0.46e6),
                                                  ("resnet56", 56, 0.85e6)])
def test_resnet_parameter_counts_match_he_et_al(name, depth, published):
    model = build_model(name)
    assert count_parameters(model) == _resnet_count(depth)
    # He et al. (2016), Table 6, give 0.27 M, 0.46 M, 0.85 M (rounded to 0.01 M)
    assert abs(count_parameters(model) - published) < 0.005e6
    assert count_parameters(build_model(name, width=8)) == _resnet_count(depth, width=8)


def test_groupnorm_resnet_has_no_buffers_and_the_same_parameters():
    bn, gn = build_model("resnet56"), build_model("resnet56", norm="group", groups=8)
    assert len(list(gn.buffers())) == 0 and len(list(bn.buffers())) > 0
    norms = [m for m in gn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 1 + 2 * 27 and all(m.num_groups == 8 for m in norms)
    assert count_parameters(gn) == count_parameters(bn)
    with pytest.raises(ValueError, match="divisible"):
        build_model("resnet20", norm="group", groups=6)


def test_vgg16_has_thirteen_biased_convs_and_no_normalization():
    model = build_model("vgg16")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13 and all(c.bias is not None for c in convs)
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)) for m in model.modules())
    assert len(list(model.buffers())) == 0
    assert any(isinstance(m, nn.SiLU) for m in model.modules())  # the authors' activation
    # standard VGG-16 conv stack (14,714,688 with biases) plus a 512 -> 10 head
    assert count_parameters(model) == 14_714_688 + 512 * 10 + 10


def test_small_cnn_and_mlp_counts_follow_width_and_depth():
    w = 8
    cnn = build_model("small_cnn", width=w, depth=3, norm="none", activation="gelu")
    expected = (9 * 3 * w + w) + (9 * w * 2 * w + 2 * w) + (9 * 2 * w * 4 * w + 4 * w) + 4 * w * 10 + 10
    assert count_parameters(cnn) == expected
    assert sum(isinstance(m, nn.GELU) for m in cnn.modules()) == 3
    mlp = build_model("mlp", width=64, depth=2)
    assert count_parameters(mlp) == 3072 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10


def test_every_conv_feeds_a_norm_so_rescaling_conv_weights_changes_nothing():
    # With a BatchNorm (batch statistics) or GroupNorm after every conv, the output is
    # invariant to scaling all conv weights by 3, up to the norms' eps (relative 1e-5 here).
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for norm in ("batch", "group"):
        model = build_model("resnet20", norm=norm).double().train()
        before = model(x)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Conv2d):
                    m.weight.mul_(3.0)
        assert torch.allclose(model(x), before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    plain = build_model("small_cnn", norm="none").double()
    before = plain(x)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3.0)
    assert not torch.allclose(plain(x), before, rtol=1e-2)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64)
    out = ZeroPadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0
    model = build_model("resnet20")
    assert sum(isinstance(m, ZeroPadShortcut) for m in model.modules()) == 2  # stage 2 and 3 entries


def test_no_decay_group_is_exactly_norm_parameters_and_biases():
    for name, norm in (("resnet20", "batch"), ("resnet20", "group"), ("vgg16", None), ("small_cnn", "batch")):
        model = build_model(name, norm=norm)
        decay, no_decay = param_groups_no_wd(model)
        expected_no_decay = set()
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                expected_no_decay |= {id(m.weight), id(m.bias)}
            elif getattr(m, "bias", None) is not None:
                expected_no_decay.add(id(m.bias))
        assert {id(p) for p in no_decay} == expected_no_decay
        assert all(p.dim() > 1 for p in decay)  # conv and linear weights only
        assert len(decay) + len(no_decay) == len(list(model.parameters()))
        assert {id(p) for p in decay}.isdisjoint({id(p) for p in no_decay})


def test_initialization_follows_the_authors():
    model = build_model("resnet56")
    head = model.head
    assert head.bias.abs().sum() == 0
    # 640 weights drawn N(0, 0.01^2): sample std within 10 % (sd of the estimate ~ 2.8 %)
    assert abs(head.weight.std().item() / 0.01 - 1) < 0.1
    conv = model.blocks[5].conv1  # Kaiming normal, fan_in: std sqrt(2 / (9 cin))
    expected = (2 / (9 * conv.in_channels)) ** 0.5
    assert abs(conv.weight.std().item() / expected - 1) < 0.05  # 9216 weights: sd ~ 0.7 %


def test_all_models_map_images_to_logits_and_reject_bad_options():
    x = torch.randn(2, 3, 32, 32)
    for name in MODEL_NAMES:
        model = build_model(name, num_classes=7, width=8).eval()
        out = model(x)
        assert out.shape == (2, 7)
        assert not torch.allclose(out[0], out[1])  # depends on the input
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet18")
    with pytest.raises(ValueError, match="activation"):
        build_model("small_cnn", activation="swish")
    with pytest.raises(ValueError, match="norm"):
        build_model("mlp", norm="batch")


def _resnet18_count(width=64, classes=10, in_channels=3):
    """Closed-form parameter count of ResNet-18 with 1x1 projection shortcuts and a per-channel
    affine norm (2 parameters per channel) after every conv."""
    total = 9 * in_channels * width + 2 * width
    cin = width
    for stage in range(4):
        c = width * 2 ** stage
        for i in range(2):
            total += 9 * cin * c + 9 * c * c + 4 * c
            if cin != c:
                total += cin * c + 2 * c
            cin = c
    return total + cin * classes + classes


def test_ln_resnet18_has_the_published_size_and_layernorm_only():
    model = build_model("ln_resnet18")
    # the published ResNet-18 for CIFAR-10 has 11,173,962 parameters (BatchNorm has as many)
    assert count_parameters(model) == _resnet18_count() == 11_173_962
    assert count_parameters(build_model("ln_resnet18", width=8)) == _resnet18_count(8)
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    # stem + 2 per block x 8 blocks + 3 projection shortcuts, all LayerNorm (one group)
    assert len(norms) == 1 + 16 + 3 and all(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in norms)
    assert len(list(model.buffers())) == 0


def test_layernorm_normalizes_each_sample_over_channels_and_pixels():
    # GroupNorm(1, C) is LayerNorm over (C, H, W): the output of a norm does not depend on the
    # other samples of the batch, and rescaling all conv weights by 3 changes nothing (eps aside).
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = build_model("ln_resnet18", width=4).double()
    out = model(x)
    assert torch.allclose(model(x[:1]), out[:1], rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3.0)
    assert torch.allclose(model(x), out, rtol=1e-4, atol=1e-4 * out.abs().max().item())
    norm = build_model("ln_resnet18", width=4).stem[1]
    z = torch.randn(2, 4, 5, 5, dtype=torch.float32)
    ref = (z - z.mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(z.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(norm(z), ref, atol=1e-5)


def test_res_mlp_counts_and_stacked_forward_equals_separate_forwards():
    w, d, s = 16, 2, 8
    model = build_model("res_mlp", width=w, depth=d, image_size=s)
    assert count_parameters(model) == (3 * s * s * w + w) + d * (2 * w + 2 * (w * w + w)) + 2 * w + w * 10 + 10
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == d + 1
    gen = torch.Generator().manual_seed(2)
    for norm in ("layer", "group"):
        torch.manual_seed(0)
        nets = [build_model("res_mlp", width=w, depth=d, image_size=s, norm=norm, groups=4).double()
                for _ in range(3)]
        x = torch.randn(3, 5, 3, s, s, generator=gen, dtype=torch.float64)
        stacked = {n: torch.stack([dict(m.named_parameters())[n] for m in nets]) for n, _ in nets[0].named_parameters()}
        out = nets[0].forward_stacked(stacked, x)
        assert out.shape == (3, 5, 10)
        for k, m in enumerate(nets):
            # reference: the blocks written out with the modules themselves
            h = m.embed(x[k].flatten(1))
            for i in range(d):
                h = h + m.outer[i](m.act(m.inner[i](m.norms[i](h))))
            ref = m.head(m.final_norm(h))
            assert torch.allclose(out[k], ref, rtol=1e-12, atol=1e-12)
            assert torch.allclose(m(x[k]), ref, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out[0], out[1])   # different networks, different outputs
    with pytest.raises(ValueError, match="no batch statistics"):
        build_model("res_mlp", norm="batch")
    with pytest.raises(ValueError, match="fixed depth"):
        build_model("ln_resnet18", depth=20)
