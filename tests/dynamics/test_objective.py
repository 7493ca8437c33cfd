"""Objective: exact HVPs against the dense autograd Hessian, the dense Hessian against finite
differences, invariance of L to how the data list is split, and clear errors on bad input."""
import pytest
import torch
from torch import nn

from dynamics import Objective
from tests.reference import (classification_batches, dense_loss_hessian, finite_difference_hessian,
                             tiny_cnn_bn, tiny_mlp)

def relu_resnet_block(seed: int = 0) -> nn.Module:
    """Strided conv -> BN -> ReLU -> grouped conv with bias -> BN -> ReLU -> pool -> linear, float64:
    every layer FastDoubleBackward replaces, for 3 x 6 x 6 inputs (D = 188)."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for bn in (model[1], model[4]):
            bn.running_mean.copy_(torch.randn(4, generator=gen, dtype=torch.float64) * 0.3)
            bn.running_var.copy_(1.0 + torch.rand(4, generator=gen, dtype=torch.float64))
    return model


CASES = {  # name -> (model builder, image inputs?, bn mode)
    "mlp": (tiny_mlp, False, "eval"),
    "cnn-eval": (tiny_cnn_bn, True, "eval"),
    "cnn-train": (tiny_cnn_bn, True, "train"),
    "relu-cnn-eval": (relu_resnet_block, True, "eval"),
}
HVP_OPTIONS = {  # label -> Objective keyword arguments
    "forward": dict(hvp_mode="forward"),
    "reverse-stock": dict(hvp_mode="reverse", fast_backward=False),
    "reverse-fast": dict(hvp_mode="reverse", fast_backward=True),
    "reverse-fast-cached": dict(hvp_mode="reverse", fast_backward=True, cache_graphs=True),
}


def make_objective(case: str, hvp_mode: str = "forward", sizes=(7, 5), **options) -> Objective:
    build, image, bn = CASES[case]
    data = classification_batches(sum(sizes), image=image, sizes=list(sizes))
    return Objective(build(), nn.CrossEntropyLoss(), data, bn=bn, hvp_mode=hvp_mode, **options)


@pytest.fixture(scope="module")
def dense_hessians():
    return {case: dense_loss_hessian(make_objective(case)) for case in CASES}


@pytest.mark.parametrize("option", list(HVP_OPTIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_hvp_matches_dense_hessian(case, option, dense_hessians):
    obj = make_objective(case, **HVP_OPTIONS[option])
    H = dense_hessians[case]
    V = torch.randn(obj.dim, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # rtol 1e-5 as in DESIGN.md; both sides are exact in float64, so agreement is ~1e-14.
    torch.testing.assert_close(obj.hvp(V), H @ V, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(obj.hvp(V[:, 1]), H @ V[:, 1], rtol=1e-5, atol=1e-10)
    # A different point theta: the HVP must follow theta, not the model's stored parameters.
    theta = obj.params + 0.1 * V[:, 0]
    torch.testing.assert_close(obj.hvp(V[:, 2], theta), dense_loss_hessian(obj, theta) @ V[:, 2],
                               rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("case", ["mlp", "cnn-eval", "cnn-train"])  # smooth models only (no ReLU kinks)
def test_dense_hessian_matches_finite_differences(case, dense_hessians):
    obj = make_objective(case)
    H = dense_hessians[case]
    assert torch.allclose(H, H.T, atol=1e-12)
    # Central differences with h = 1e-5: truncation O(h^2 |d3L|) ~ 1e-10, rounding ~ eps / h ~ 1e-11.
    torch.testing.assert_close(finite_difference_hessian(obj), H, rtol=0, atol=1e-7)


@pytest.mark.parametrize("case", ["mlp", "cnn-eval"])
def test_loss_grad_hvp_do_not_depend_on_the_split(case):
    whole, split = make_objective(case, sizes=(9,)), make_objective(case, sizes=(5, 3, 1))
    v = torch.randn(whole.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(whole.loss(), split.loss(), rtol=1e-13, atol=0)
    torch.testing.assert_close(whole.grad(), split.grad(), rtol=1e-12, atol=1e-15)
    loss, g = split.loss_and_grad()
    torch.testing.assert_close(loss, whole.loss(), rtol=1e-13, atol=0)
    torch.testing.assert_close(g, whole.grad(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(whole.hvp(v), split.hvp(v), rtol=1e-11, atol=1e-14)
    # The mean of per-sample gradients is the gradient (eval-mode normalization only).
    torch.testing.assert_close(split.per_sample_grads().mean(0), whole.grad(), rtol=1e-11, atol=1e-14)


def test_graph_cache_follows_theta_buffers_and_data(dense_hessians):
    obj = make_objective("relu-cnn-eval", hvp_mode="reverse", cache_graphs=True)
    H = dense_hessians["relu-cnn-eval"]
    V = torch.randn(obj.dim, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(obj.hvp(V[:, 0]), H @ V[:, 0], rtol=1e-5, atol=1e-10)
    graphs = obj._graphs.graphs
    torch.testing.assert_close(obj.hvp(V[:, 1]), H @ V[:, 1], rtol=1e-5, atol=1e-10)  # from the cache
    assert obj._graphs.graphs is graphs and len(graphs) == 2  # one graph per batch, reused
    # Another theta: rebuilt there, and the old graphs are dropped.
    theta = obj.params + 0.1 * V[:, 0]
    torch.testing.assert_close(obj.hvp(V[:, 1], theta), dense_loss_hessian(obj, theta) @ V[:, 1],
                               rtol=1e-5, atol=1e-10)
    assert obj._graphs.graphs is not graphs
    # A buffer changed in place (BN running statistics): the cache must not serve the old graph.
    obj.hvp(V[:, 0])  # cache at the model's parameters again
    fresh = make_objective("relu-cnn-eval", hvp_mode="reverse")
    for model in (obj.model, fresh.model):
        with torch.no_grad():
            model[1].running_var.mul_(1.5)
    torch.testing.assert_close(obj.hvp(V[:, 0]), fresh.hvp(V[:, 0]), rtol=1e-12, atol=1e-14)
    # A data tensor changed in place.
    for o in (obj, fresh):
        with torch.no_grad():
            o.data[0][0].mul_(0.5)
    torch.testing.assert_close(obj.hvp(V[:, 0]), fresh.hvp(V[:, 0]), rtol=1e-12, atol=1e-14)
    obj.clear_cache()
    assert obj._graphs is None


def test_train_mode_batchnorm_uses_batch_statistics_and_leaves_buffers_alone():
    obj_train, obj_eval = make_objective("cnn-train", sizes=(9,)), make_objective("cnn-eval", sizes=(9,))
    buffers = {n: b.clone() for n, b in obj_train.model.named_buffers()}
    split_train = make_objective("cnn-train", sizes=(5, 3, 1))
    # Batch statistics depend on the batch: the loss changes with the split and differs from eval.
    assert abs(float(obj_train.loss() - split_train.loss())) > 1e-4
    assert abs(float(obj_train.loss() - obj_eval.loss())) > 1e-4
    obj_train.grad()
    obj_train.hvp(torch.ones(obj_train.dim, dtype=torch.float64))
    for n, b in obj_train.model.named_buffers():
        assert torch.equal(b, buffers[n]), f"buffer {n} was modified"
    assert obj_train.model.training  # the caller's module mode is restored


def test_bad_input_gives_clear_errors():
    model = tiny_mlp()
    data = classification_batches(4, image=False)
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="empty"):
        Objective(model, loss_fn, [])
    frozen = tiny_mlp()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Objective(frozen, loss_fn, data)
    with pytest.raises(ValueError, match="bn must be"):
        Objective(model, loss_fn, data, bn="batch")
    with pytest.raises(ValueError, match="hvp_mode"):
        Objective(model, loss_fn, data, hvp_mode="fast")
    with pytest.raises(ValueError, match="inputs and"):
        Objective(model, loss_fn, [(data[0][0], data[0][1][:2])])
    obj = Objective(model, loss_fn, data)
    with pytest.raises(ValueError, match="v must have shape"):
        obj.hvp(torch.ones(obj.dim + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="theta must have shape"):
        obj.loss(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="bn='train'"):
        make_objective("cnn-train").per_sample_grads()
