"""experiments.comparison.noise: the label-noise protocol's two models against hand-written references."""
import pytest
import torch
from torch.func import grad

from experiments.comparison.noise import NOISE_MODELS, FlippedLabels, GaussianLabelNoise, parse_noise, simplex_targets
from experiments.datasets import flip_labels


def test_parse_noise_forms_and_errors():
    assert parse_noise("gaussian:0.1") == GaussianLabelNoise(0.1) and str(parse_noise("flip:0.2")) == "flip:0.2"
    assert set(NOISE_MODELS) == {"gaussian", "flip"}
    for bad, match in (("uniform:0.1", "unknown label noise"), ("gaussian", "unknown label noise"),
                       ("flip:x", "not a number"), ("gaussian:-1", "sigma > 0"), ("flip:1.5", "0 < p")):
        with pytest.raises(ValueError, match=match):
            parse_noise(bad)
    assert GaussianLabelNoise(0.3).noise_scale == pytest.approx(0.09) and FlippedLabels(0.1).noise_scale == 1.0


def test_targets_from_labels_and_floats():
    labels = torch.tensor([2, 0, 1])
    hot = torch.eye(3, dtype=torch.float64)[labels]
    g, f = GaussianLabelNoise(0.1), FlippedLabels(0.3)
    assert torch.equal(g.targets(labels, 3), hot)
    soft = torch.tensor([[0.5, 1.0, -2.0]] * 3, dtype=torch.float32)
    assert torch.equal(g.targets(soft, 3), soft.double())                    # any float targets
    q = f.targets(labels, 3)
    expected = torch.full((3, 3), 0.3 / 2, dtype=torch.float64).scatter(1, labels[:, None], 1 - 0.3)
    assert torch.equal(q, expected)                                          # 1 - p on the label, p / (C-1) else
    assert torch.equal(f.targets(hot, 3), q)                                # one-hot rows = labels
    assert g.equations(5, 3) == 15 and f.equations(5, 3) == 10
    with pytest.raises(ValueError, match="one output per class"):
        g.targets(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match=r"\(N, 3\) needed"):
        g.targets(torch.zeros(2, 4), 3)
    with pytest.raises(ValueError, match="one-hot rows"):
        f.targets(soft.double(), 3)
    with pytest.raises(ValueError, match="C-1"):
        FlippedLabels(0.6).targets(labels, 2)                              # p >= (C-1)/C = 0.5
    with pytest.raises(ValueError, match="integer labels"):
        g.targets(torch.tensor([True, False]), 3)


def test_simplex_targets_are_the_one_hot_loss_on_the_plane_of_sum_one():
    """The C = 10 simplex targets: centred, pairwise distance sqrt 2 (the one-hot rows' own), and the squared loss of
    9 outputs f against them equals the one-hot squared loss of the 10 outputs Q f + 1/C (Q orthonormal, 1^T Q = 0)
    for any f; Gaussian draws on them have the one-hot noise's law projected on that plane (covariance sigma^2 I_9)."""
    labels = torch.arange(10)
    vertices = simplex_targets(labels, 10)
    assert vertices.shape == (10, 9) and vertices.dtype == torch.float64
    assert vertices.sum(0).abs().max() < 1e-14
    distances = (vertices[:, None] - vertices[None]).norm(dim=-1)
    assert (distances + torch.eye(10, dtype=torch.float64) * 2 ** 0.5 - 2 ** 0.5).abs().max() < 1e-13
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, 10, (50,), generator=gen)
    f = torch.randn(50, 9, generator=gen, dtype=torch.float64)
    Q = vertices                                        # the vertices of the labels 0..9 are Q's rows
    assert (Q.T @ Q - torch.eye(9, dtype=torch.float64)).abs().max() < 1e-12 and Q.sum(0).abs().max() < 1e-12
    g = GaussianLabelNoise(0.1)
    plane = f @ Q.T + 0.1
    assert g.loss(f, simplex_targets(y, 10)) == pytest.approx(float(g.loss(plane, g.targets(y, 10))), rel=1e-13)
    with pytest.raises(ValueError, match="one output per class"):
        simplex_targets(torch.tensor([0, 10]), 10)


def test_losses_and_their_minimum_on_gamma():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    g, f = GaussianLabelNoise(0.1), FlippedLabels(0.2)
    y = g.targets(labels, 4)
    assert g.loss(out, y).item() == pytest.approx(float(sum(0.5 * (out[i] - y[i]).pow(2).sum() for i in range(6)) / 6),
                                                  rel=1e-14)
    assert g.distance(y, y) == 0.0 and g.minimum_loss(y) == 0.0 and torch.equal(g.residual(out, y), out - y)
    # soft cross-entropy with one-hot float targets = the gathered integer-label loss, value and gradient exactly
    hot = torch.eye(4, dtype=torch.float64)[labels]
    gathered = lambda o: -torch.log_softmax(o, -1).gather(-1, labels[:, None]).mean()   # noqa: E731
    assert torch.equal(f.loss(out, hot), gathered(out))
    assert torch.equal(grad(lambda o: f.loss(o, hot))(out), grad(gathered)(out))
    # on Gamma (softmax(f) = q, any per-sample shift): residual and distance vanish, the loss is the entropy
    q = f.targets(labels, 4)
    on = q.log() + torch.randn(6, 1, generator=gen, dtype=torch.float64)
    assert f.residual(on, q).abs().max() < 1e-14 and f.distance(on, q) < 1e-14
    assert f.loss(on, q).item() == pytest.approx(f.minimum_loss(q), rel=1e-14)
    assert f.minimum_loss(q) == pytest.approx(float(-(q * q.log()).sum(1).mean()), rel=1e-15)
    # the residual is R_i Q^T (f_i - log q_i), R_i^2 = Q^T A_i Q: ||r_i||^2 = (f_i - log q_i)^T A_i (...)
    r = f.residual(out, q)
    d = out - q.log()
    A = torch.diag_embed(q) - q[:, :, None] * q[:, None, :]
    torch.testing.assert_close(r.pow(2).sum(1), torch.einsum("nc,ncd,nd->n", d, A, d), rtol=1e-12, atol=0)
    assert r.shape == (6, 3)


def test_draws_follow_the_generator_stream_and_the_noise_law():
    g, f = GaussianLabelNoise(0.3), FlippedLabels(0.2)
    y = g.targets(torch.tensor([0, 1, 2, 3] * 500), 4)
    drawn = g.draw(y, torch.Generator().manual_seed(7))
    torch.testing.assert_close(drawn, y + 0.3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(7),
                                                            dtype=torch.float64), rtol=0, atol=0)
    q = f.targets(torch.tensor([0, 1, 2, 3] * 500), 4)
    hot = f.draw(q, torch.Generator().manual_seed(7))
    labels = flip_labels(q.argmax(-1), 0.2, 4, torch.Generator().manual_seed(7))    # the trainer's stream
    assert torch.equal(hot.argmax(-1), labels) and torch.equal(hot.sum(-1), torch.ones(2000, dtype=torch.float64))
    # the mean draw is the expected target: within 4 standard errors over 2,000 draws per class pattern
    assert (hot.mean(0) - q.mean(0)).abs().max() < 4 * (0.2 * 0.8 / 2000) ** 0.5
    assert (drawn - y).std().item() == pytest.approx(0.3, rel=0.03)
