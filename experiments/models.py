"""Networks for the CIFAR-10 experiments: CIFAR ResNets, VGG-16, a small CNN and an MLP.

`build_model(name, ...)` is the one entry point. Inputs are (N, in_channels, 32, 32) float
(normalized) images, outputs (N, num_classes) logits.

- resnet20 / resnet32 / resnet56: the CIFAR ResNets of He et al. (2016, Sec. 4.2): a 3x3 stem
  conv, three stages of n = (depth - 2) / 6 basic blocks with width, 2 width, 4 width channels
  (strides 1, 2, 2), global average pooling and a linear head. Shortcuts are option A
  (He et al.'s choice for CIFAR, and the authors' code): identity, or at a down-sampling
  block stride-2 subsampling with zero-padded extra channels, so shortcuts carry no
  parameters. ResNet-20 has 269,722 parameters, ResNet-56 853,018 (width 16, BatchNorm or
  GroupNorm).
  Initialization as in the authors' code: Kaiming-normal convs, linear head N(0, 0.01^2)
  with zero bias, norm weights 1 and biases 0.
- vgg16: the 13-conv VGG-16 layout with 2x2 average pooling, SiLU activations, conv biases,
  no normalization and a single linear head, as in the authors' label-noise runs (Gu et al.,
  2023); Kaiming-normal init of every layer.
- small_cnn: `depth` 3x3 conv layers (width, 2 width, 4 width, ...) with 2x2 average pooling
  between them, global average pooling and a linear head; CPU scale. A smooth activation
  (gelu, silu, softplus, tanh) keeps second and third derivatives meaningful.
- mlp: `depth` hidden layers of `width` units on the flattened image.
- ln_resnet18: the ResNet-18 layout (He et al., 2016, Table 1, as commonly adapted to CIFAR:
  3x3 stride-1 stem, no max-pool; four stages of two basic blocks with width, 2, 4, 8 width
  channels, strides 1, 2, 2, 2; 1x1 conv + norm projection shortcuts where the shape changes)
  with LayerNorm in place of BatchNorm, as in Qin, Etesami & Uribe (TMLR 2024). Default width
  64 (11.17 M parameters, the published ResNet-18 size); any width for CPU scale.
- res_mlp: a residual MLP for CPU-scale convergence studies: a linear embedding of the
  flattened image to `width`, `depth` pre-norm residual blocks x + W2 act(W1 norm(x)), a final
  norm and a linear head. Over-parameterized for a few hundred images at width >= 64.

Normalization: norm="batch" (BatchNorm2d), "group" (GroupNorm with `groups` groups; no
buffers), "layer" (LayerNorm: for feature maps GroupNorm with one group, i.e. statistics over
(C, H, W) of each sample with a per-channel affine; nn.LayerNorm on vectors) or "none" (convs
then carry biases). ln_resnet18 and res_mlp take "layer" (default) or "group" only: no
batch statistics, so K simulated workers can run them under torch.func.vmap.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from dynamics.objective import NORM_TYPES  # one definition, shared with workers.weight_decay_mask

Norm = Literal["batch", "group", "layer", "none"]
Activation = Literal["relu", "gelu", "silu", "softplus", "tanh"]

MODEL_NAMES = ("resnet20", "resnet32", "resnet56", "vgg16", "small_cnn", "mlp", "ln_resnet18",
               "res_mlp")
_RESNET_DEPTHS = {"resnet20": 20, "resnet32": 32, "resnet56": 56}
_VGG16_LAYOUT = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")  # x width
_DEFAULTS = {  # name -> (width, norm, activation, depth)
    "resnet20": (16, "batch", "relu", None), "resnet32": (16, "batch", "relu", None),
    "resnet56": (16, "batch", "relu", None), "vgg16": (64, "none", "silu", None),
    "small_cnn": (32, "batch", "relu", 3), "mlp": (256, "none", "relu", 2),
    "ln_resnet18": (64, "layer", "relu", None), "res_mlp": (128, "layer", "relu", 2),
}
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus,
                "tanh": nn.Tanh}


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        if channels % groups:
            raise ValueError(f"GroupNorm with {groups} groups needs channels divisible by it, "
                             f"got {channels}")
        return nn.GroupNorm(groups, channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)   # LayerNorm over (C, H, W), per-channel affine
    return nn.Identity()


def _vector_norm(kind: str, features: int, groups: int) -> nn.Module:
    """Norm of (N, features) activations: LayerNorm, or GroupNorm with ``groups`` groups."""
    if kind == "layer":
        return nn.LayerNorm(features)
    if features % groups:
        raise ValueError(f"GroupNorm with {groups} groups needs features divisible by it, "
                         f"got {features}")
    return nn.GroupNorm(groups, features)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and append zero channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        before = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra - before))


class BasicBlock(nn.Module):
    """conv3x3-norm-act-conv3x3-norm, plus shortcut, then act (He et al., 2016)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, groups: int, act: type):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)
        self.norm1 = _norm(norm, cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=bias)
        self.norm2 = _norm(norm, cout, groups)
        self.act1, self.act2 = act(), act()
        self.shortcut = (ZeroPadShortcut(cin, cout, stride) if stride != 1 or cin != cout
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n + 2 (He et al., 2016), option-A shortcuts."""

    def __init__(self, depth: int, *, num_classes: int, width: int, norm: str, groups: int,
                 in_channels: int, act: type):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none"),
                                  _norm(norm, width, groups), act())
        blocks, cin = [], width
        for stage, stride in enumerate((1, 2, 2)):
            cout = width * 2 ** stage
            for i in range(n):
                blocks.append(BasicBlock(cin, cout, stride if i == 0 else 1, norm, groups, act))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(x))
        return self.head(out.mean(dim=(2, 3)))


class ProjectionBlock(nn.Module):
    """ResNet-18 basic block: conv3x3-norm-act-conv3x3-norm plus shortcut, then act; where the
    shape changes the shortcut is a 1x1 conv (stride ``stride``) and a norm (option B)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, groups: int, act: type):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.norm2 = _norm(norm, cout, groups)
        self.act1, self.act2 = act(), act()
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                       _norm(norm, cout, groups))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: stem conv3x3, stages (2, 2, 2, 2) of `ProjectionBlock`s."""

    def __init__(self, *, num_classes: int, width: int, norm: str, groups: int, in_channels: int,
                 act: type):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  _norm(norm, width, groups), act())
        blocks, cin = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** stage
            for i in range(2):
                blocks.append(ProjectionBlock(cin, cout, stride if i == 0 else 1, norm, groups, act))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def _stacked_linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h (n, B, in) through n linear maps: weight (n, out, in), bias (n, out) -> (n, B, out)."""
    return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


class ResidualMLP(nn.Module):
    """Flatten, Linear(in_features, width), ``depth`` blocks x + W2 act(W1 norm(x)) (W1, W2
    width x width with biases), norm, Linear(width, num_classes).

    `forward_stacked(params, x)` evaluates n copies at once: every parameter with a leading
    node axis n and x of shape (n, B, ...), by batched matrix products (about 2.5x faster than
    vmap over `functional_call` for 20 nodes of batch 8 at width 64 on one CPU thread);
    `forward` is the same code with n = 1.
    """

    def __init__(self, *, in_features: int, width: int, depth: int, num_classes: int, norm: str,
                 groups: int, act: type):
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.norms = nn.ModuleList(_vector_norm(norm, width, groups) for _ in range(depth))
        self.inner = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.outer = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.act = act()
        self.final_norm = _vector_norm(norm, width, groups)
        self.head = nn.Linear(width, num_classes)
        self.depth, self.width, self.groups = depth, width, groups
        self.norm_kind = "layer" if norm == "layer" else "group"

    def _norm_stacked(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.norm_kind == "layer":
            z = F.layer_norm(h, (self.width,))
        else:
            z = F.group_norm(h.reshape(-1, self.width), self.groups).reshape(h.shape)
        return z * weight.unsqueeze(1) + bias.unsqueeze(1)

    def forward_stacked(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """params: name -> (n, *shape) (names of `named_parameters()`); x: (n, B, ...) -> (n, B, classes)."""
        p = params
        h = _stacked_linear(x.flatten(2), p["embed.weight"], p["embed.bias"])
        for i in range(self.depth):
            z = self._norm_stacked(h, p[f"norms.{i}.weight"], p[f"norms.{i}.bias"])
            z = self.act(_stacked_linear(z, p[f"inner.{i}.weight"], p[f"inner.{i}.bias"]))
            h = h + _stacked_linear(z, p[f"outer.{i}.weight"], p[f"outer.{i}.bias"])
        z = self._norm_stacked(h, p["final_norm.weight"], p["final_norm.bias"])
        return _stacked_linear(z, p["head.weight"], p["head.bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {n: t.unsqueeze(0) for n, t in self.named_parameters()}
        return self.forward_stacked(params, x.unsqueeze(0))[0]


class ConvNet(nn.Module):
    """Plain conv stack: ``layout`` entries are channel counts or "M" (2x2 average pool)."""

    def __init__(self, layout, *, num_classes: int, norm: str, groups: int, in_channels: int,
                 act: type, global_pool: bool):
        super().__init__()
        layers, cin = [], in_channels
        for entry in layout:
            if entry == "M":
                layers.append(nn.AvgPool2d(2))
                continue
            layers += [nn.Conv2d(cin, entry, 3, padding=1, bias=norm == "none"),
                       _norm(norm, entry, groups), act()]
            cin = entry
        self.features = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])
        self.global_pool = global_pool
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        out = out.mean(dim=(2, 3)) if self.global_pool else out.flatten(1)
        return self.head(out)


def _mlp(*, in_features: int, width: int, depth: int, num_classes: int, act: type) -> nn.Sequential:
    layers, cin = [nn.Flatten()], in_features
    for _ in range(depth):
        layers += [nn.Linear(cin, width), act()]
        cin = width
    layers.append(nn.Linear(cin, num_classes))
    return nn.Sequential(*layers)


def _init_like_authors(model: nn.Module, *, linear_std: float | None) -> None:
    """Kaiming-normal convs (and linears when linear_std is None), zero biases, norms at 1/0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            if linear_std is None:
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, 0.0, linear_std)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.GroupNorm)) and m.bias is not None:
            nn.init.zeros_(m.bias)


def build_model(name: str, *, num_classes: int = 10, norm: Norm | None = None,
                width: int | None = None, groups: int = 8, in_channels: int = 3,
                activation: Activation | None = None, depth: int | None = None,
                image_size: int = 32) -> nn.Module:
    """The network ``name`` (one of MODEL_NAMES); None options take the per-model defaults.

    Defaults: resnets width 16, BatchNorm, ReLU; vgg16 width 64 (channels 64..512), no norm,
    SiLU; small_cnn width 32, BatchNorm, ReLU, depth 3 conv layers; mlp width 256, depth 2
    hidden layers, ReLU; ln_resnet18 width 64, LayerNorm, ReLU; res_mlp width 128, depth 2
    residual blocks, LayerNorm, ReLU, on flattened in_channels x image_size^2 inputs.
    ``groups`` is the GroupNorm group count. Parameters are float32 on
    the CPU; move them with ``.to(device, dtype)``.
    """
    if name not in _DEFAULTS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODEL_NAMES}")
    d_width, d_norm, d_act, d_depth = _DEFAULTS[name]
    width = d_width if width is None else int(width)
    norm = d_norm if norm is None else norm
    activation = d_act if activation is None else activation
    depth = d_depth if depth is None else int(depth)
    if norm not in ("batch", "group", "layer", "none"):
        raise ValueError(f"norm must be 'batch', 'group', 'layer' or 'none', got {norm!r}")
    if name in ("ln_resnet18", "res_mlp") and norm not in ("layer", "group"):
        raise ValueError(f"{name} takes norm 'layer' or 'group' (no batch statistics), got {norm!r}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(_ACTIVATIONS)}, got {activation!r}")
    if width < 1 or num_classes < 1 or in_channels < 1 or groups < 1:
        raise ValueError("width, num_classes, in_channels and groups must be positive")
    act = _ACTIVATIONS[activation]
    kw = dict(num_classes=num_classes, norm=norm, groups=groups, in_channels=in_channels, act=act)
    if name in _RESNET_DEPTHS:
        if depth is not None and depth != _RESNET_DEPTHS[name]:
            raise ValueError(f"{name} has depth {_RESNET_DEPTHS[name]}; got depth={depth}")
        model = CifarResNet(_RESNET_DEPTHS[name], width=width, **kw)
        _init_like_authors(model, linear_std=0.01)
    elif name == "ln_resnet18":
        if depth is not None:
            raise ValueError("ln_resnet18 has a fixed depth (stages of 2, 2, 2, 2 blocks)")
        model = ResNet18(width=width, **kw)
        _init_like_authors(model, linear_std=None)
    elif name == "res_mlp":
        if depth < 0:
            raise ValueError(f"res_mlp needs depth >= 0, got {depth}")
        model = ResidualMLP(in_features=in_channels * image_size ** 2, width=width, depth=depth,
                            num_classes=num_classes, norm=norm, groups=groups, act=act)
    elif name == "vgg16":
        if image_size != 32:
            raise ValueError("vgg16 expects 32x32 images (five 2x2 poolings down to 1x1)")
        layout = [e if e == "M" else e * width for e in _VGG16_LAYOUT]
        model = ConvNet(layout, global_pool=False, **kw)
        _init_like_authors(model, linear_std=None)
    elif name == "small_cnn":
        if depth < 1:
            raise ValueError(f"small_cnn needs depth >= 1, got {depth}")
        layout = []
        for i in range(depth):
            layout += ([] if i == 0 else ["M"]) + [width * 2 ** i]
        model = ConvNet(layout, global_pool=True, **kw)
    else:  # mlp
        if norm != "none":
            raise ValueError("mlp has no normalization layers; use norm='none'")
        if depth < 0:
            raise ValueError(f"mlp needs depth >= 0, got {depth}")
        model = _mlp(in_features=in_channels * image_size ** 2, width=width, depth=depth,
                     num_classes=num_classes, act=act)
    return model


def param_groups_no_wd(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay): weights of normalization layers and all biases go to no_decay.

    This is the authors' convention (weight decay 5e-4 "without decay on norm layers and
    biases"). Every trainable parameter lands in exactly one list, in model order.
    """
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if isinstance(module, NORM_TYPES) or pname == "bias" else decay).append(p)
    return decay, no_decay


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- small smooth nets (the comparison layer's)
_SMOOTH = ("gelu", "tanh", "softplus", "silu")


def _smooth_activation(name: str) -> type:
    if name not in _SMOOTH:
        raise ValueError(f"activation must be one of {sorted(_SMOOTH)} (smooth: the theory needs third "
                         f"derivatives), got {name!r}")
    return _ACTIVATIONS[name]


def _init_uniform(model: nn.Module, generator: torch.Generator | None) -> None:
    """Weights U(-sqrt(3/fan_in), sqrt(3/fan_in)), biases U(-1/sqrt(fan_in), ...), from `generator` (seed 0 if None)."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                bound = m.weight[0].numel() ** -0.5
                m.weight.copy_((torch.rand(m.weight.shape, generator=gen) * 2 - 1) * bound * 3 ** 0.5)
                m.bias.copy_((torch.rand(m.bias.shape, generator=gen) * 2 - 1) * bound)


def build_small_cnn(*, channels: tuple[int, int] = (8, 16), hidden: int = 32, image_size: int = 16,
                    classes: int = 10, activation: str = "gelu", generator: torch.Generator | None = None,
                    dtype=torch.float64) -> nn.Module:
    """Conv3x3-act-avgpool2 twice, then Linear-act-Linear; smooth, no normalization layers (so the
    minimizer manifold is per-sample). Inputs (N, 3, image_size, image_size), image_size divisible by 4;
    with the defaults (16x16) D = 9,946. Initialization `_init_uniform` from `generator` (seed 0 if None)."""
    act = _smooth_activation(activation)
    if image_size % 4:
        raise ValueError(f"image_size must be divisible by 4, got {image_size}")
    c1, c2 = channels
    model = nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), act(), nn.AvgPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), act(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (image_size // 4) ** 2, hidden), act(), nn.Linear(hidden, classes))
    _init_uniform(model, generator)
    return model.to(dtype)


def build_small_mlp(*, image_size: int = 8, hidden: tuple[int, ...] = (32, 32), classes: int = 10,
                    activation: str = "gelu", generator: torch.Generator | None = None,
                    dtype=torch.float64) -> nn.Module:
    """Flatten -> (Linear-act) x len(hidden) -> Linear on 3 x image_size^2 inputs; smooth, no normalization.
    With the defaults (8x8) D = 7,562. Initialization as `build_small_cnn`."""
    act = _smooth_activation(activation)
    widths = [3 * image_size ** 2, *hidden, classes]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(widths) - 2 else [])
    model = nn.Sequential(*layers)
    _init_uniform(model, generator)
    return model.to(dtype)
