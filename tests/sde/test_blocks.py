"""Building blocks at a point of Gamma against independent computations.

References: finite differences of gradients and Hessians, Kronecker-product linear algebra
(numpy pinv / eigh of the D^2 x D^2 Lyapunov operator), scipy null spaces, and finite
differences of an analytic projection Phi (a product of an ellipsoid and an ellipse, rotated).
"""
import numpy as np
import pytest
import scipy.linalg
import torch

from sde import blocks, psi

DT = torch.float64


# ---------------------------------------------------------------- a toy with an analytic Phi
class ProductEllipsoid:
    """L(theta) = sum_f 1/4 (x_f^T D_f x_f - 1)^2 over factors x_f = slices of R^T theta.

    Gradient flow of one factor is x(t) = exp(-D s(t)) x0 with ds/dt = q - 1, so
    Phi(x0) = exp(-D s*) x0 where q(s*) = x0^T D exp(-2 D s*) x0 = 1 (a scalar Newton solve).
    The orthogonal R mixes all coordinates; Phi(theta) = R Phi_0(R^T theta).
    """

    def __init__(self, diags: list[list[float]], seed: int = 0):
        self.diags = [torch.tensor(d, dtype=DT) for d in diags]
        self.dim = sum(len(d) for d in diags)
        gen = torch.Generator().manual_seed(seed)
        self.R, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=gen, dtype=DT))

    def _split(self, theta):
        y = self.R.T @ theta
        return torch.split(y, [len(d) for d in self.diags])

    def loss(self, theta):
        return sum(0.25 * ((d * x * x).sum() - 1) ** 2 for d, x in zip(self.diags, self._split(theta)))

    def project(self, theta):
        out = []
        for d, x in zip(self.diags, self._split(theta.detach())):
            s = torch.zeros((), dtype=DT)
            for _ in range(60):
                w = d * x * x * torch.exp(-2 * s * d)
                step = (w.sum() - 1) / (-2 * (d * w).sum())
                s = s - step
                if abs(step) < 1e-17:
                    break
            out.append(torch.exp(-d * s) * x)
        return self.R @ torch.cat(out)

    def point_on_gamma(self, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        return self.project(torch.randn(self.dim, generator=gen, dtype=DT))


def fd_hessian(loss, theta, h=1e-5):
    """Central differences of the autograd gradient, column by column (O(h^2))."""
    g = torch.func.grad(loss)
    cols = []
    for k in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[k] = h
        cols.append((g(theta + e) - g(theta - e)) / (2 * h))
    H = torch.stack(cols, dim=1)
    return (H + H.T) / 2


def fd_second_derivative_of_phi(project, zeta, M, h=1e-4):
    """d2Phi[M] by central second differences of Phi along the eigenvectors of sym(M)."""
    mu, W = torch.linalg.eigh((M + M.T) / 2)
    total = torch.zeros_like(zeta)
    for k in range(len(mu)):
        w = W[:, k]
        total += mu[k] * (project(zeta + h * w) - 2 * project(zeta) + project(zeta - h * w)) / h ** 2
    return total


def autograd_loop_hessian(loss, theta):
    """Exact Hessian by one plain autograd backward pass per row (independent of torch.func)."""
    theta = theta.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss(theta), theta, create_graph=True)
    return torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(len(theta))])


def random_symmetric_with_spectrum(values, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen, dtype=DT))
    return (Q * torch.tensor(values, dtype=DT)) @ Q.T


def random_spd(D, seed=0):
    gen = torch.Generator().manual_seed(seed)
    C = torch.randn(D, D, generator=gen, dtype=DT)
    return C @ C.T / D + 0.1 * torch.eye(D, dtype=DT)


def lyapunov_operator(H):
    """Matrix of vec(X) -> vec(H X + X H) (row-major vec), a (D^2, D^2) numpy array."""
    H = H.numpy()
    eye = np.eye(H.shape[0])
    return np.kron(H, eye) + np.kron(eye, H.T)


SPECTRUM = [5.0, 2.0, 0.7, 1e-3, 1e-9, 0.0, -1e-12]   # rank 4 at rank_rtol = 1e-6


# ---------------------------------------------------------------- Hessian, eigen split, projectors
def test_hessian_matrix_matches_finite_differences():
    toy = ProductEllipsoid([[1.0, 2.0, 0.5], [3.0, 0.8]])
    theta = toy.point_on_gamma() + 0.05
    H = blocks.hessian_matrix(toy.loss, theta)
    torch.testing.assert_close(H, fd_hessian(toy.loss, theta), rtol=1e-8, atol=1e-8)


def test_rank_rule_relative_threshold_and_fixed_rank():
    H = random_symmetric_with_spectrum(SPECTRUM)
    eig = blocks.hessian_eigen(H)
    assert eig.normal.sum() == 4                      # 1e-3 > 1e-6 x 5 is normal, 1e-9 is not
    assert blocks.hessian_eigen(H, rank_rtol=1e-3).normal.sum() == 3
    assert blocks.hessian_eigen(H, rank=2).normal.sum() == 2
    torch.testing.assert_close(eig.normal_values.sort().values,
                               torch.tensor(sorted([5.0, 2.0, 0.7, 1e-3, 0, 0, 0]), dtype=DT), atol=1e-13, rtol=0)
    with pytest.raises(ValueError, match="rank"):
        blocks.hessian_eigen(H, rank=8)


def test_projectors_against_scipy_null_space():
    H = random_symmetric_with_spectrum(SPECTRUM)
    eig = blocks.hessian_eigen(H)
    P, P_perp = blocks.tangent_projector(eig), blocks.normal_projector(eig)
    # numerical null space with the same relative cut: singular values below 1e-6 x 5
    N = torch.from_numpy(scipy.linalg.null_space(H.numpy(), rcond=1e-6))
    assert N.shape[1] == 3
    torch.testing.assert_close(P, N @ N.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(P + P_perp, torch.eye(7, dtype=DT), rtol=0, atol=1e-13)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-13)
    assert torch.linalg.matrix_norm(H @ P) < 1e-8     # only the sub-threshold 1e-9 survives


def test_pseudo_inverse_matches_numpy_pinv():
    H = random_symmetric_with_spectrum(SPECTRUM)
    eig = blocks.hessian_eigen(H)
    ref = np.linalg.pinv(H.numpy(), rcond=1e-6, hermitian=True)
    torch.testing.assert_close(blocks.pseudo_inverse(eig), torch.from_numpy(ref), rtol=1e-10, atol=1e-8)


# ---------------------------------------------------------------- noise blocks, Lyapunov, S_hat, Psi_hat
def _setting(seed=0):
    H = random_symmetric_with_spectrum([4.0, 1.5, 0.3, 0.0, 0.0, 0.0], seed=seed)
    return H, blocks.hessian_eigen(H), random_spd(6, seed=seed + 1)


def test_noise_blocks_definitions_and_sums():
    H, eig, sigma = _setting()
    P = blocks.tangent_projector(eig)
    Pp = torch.eye(6, dtype=DT) - P
    S = blocks.noise_blocks(sigma, P)
    torch.testing.assert_close(S.par, P @ sigma @ P)
    torch.testing.assert_close(S.perp, Pp @ sigma @ Pp)
    torch.testing.assert_close(S.par_perp, P @ sigma @ Pp)
    torch.testing.assert_close(S.perp_par, S.par_perp.T)
    torch.testing.assert_close(S.par + S.perp + S.par_perp + S.perp_par, sigma)
    torch.testing.assert_close(S.diamond, S.perp + S.par_perp + S.perp_par)
    assert torch.linalg.matrix_norm(H @ S.par) < 1e-12


def test_lyapunov_inverse_is_the_pseudo_inverse_of_the_kronecker_operator():
    H, eig, sigma = _setting()
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(6, 6, generator=gen, dtype=DT)          # not even symmetric
    ref = np.linalg.pinv(lyapunov_operator(H), rcond=1e-10, hermitian=True) @ X.numpy().reshape(-1)
    torch.testing.assert_close(blocks.lyapunov_inverse(X, eig), torch.from_numpy(ref.reshape(6, 6)),
                               rtol=1e-9, atol=1e-11)
    # and it solves H Y + Y H = X on the part of X that Lyap can reach (X - P X P)
    P = blocks.tangent_projector(eig)
    Y = blocks.lyapunov_inverse(X, eig)
    torch.testing.assert_close(H @ Y + Y @ H, X - P @ X @ P, rtol=1e-10, atol=1e-11)


def test_s_hat_identity():
    H, eig, sigma = _setting()
    P = blocks.tangent_projector(eig)
    S = blocks.noise_blocks(sigma, P)
    H_pinv = blocks.pseudo_inverse(eig)
    lhs = blocks.s_hat(sigma, eig)
    torch.testing.assert_close(lhs, blocks.lyapunov_inverse(S.diamond, eig), rtol=1e-12, atol=1e-13)
    rhs = blocks.lyapunov_inverse(S.perp, eig) + H_pinv @ S.perp_par + S.par_perp @ H_pinv
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [0.05, 1.0, 7.0])
def test_psi_hat_is_a_matrix_function_of_the_lyapunov_operator(beta):
    # Psi_hat = Lyap^+ psi(beta Lyap) vec(S_diamond): eigen-decompose the D^2 x D^2 operator.
    H, eig, sigma = _setting()
    S_diamond = blocks.noise_blocks(sigma, blocks.tangent_projector(eig)).diamond
    mu, W = np.linalg.eigh(lyapunov_operator(H))
    keep = mu > 1e-10
    weights = np.where(keep, psi(torch.from_numpy(beta * mu)).numpy() / np.where(keep, mu, 1.0), 0.0)
    ref = (W * weights) @ W.T @ S_diamond.numpy().reshape(-1)
    torch.testing.assert_close(blocks.psi_hat(sigma, eig, beta), torch.from_numpy(ref.reshape(6, 6)),
                               rtol=1e-9, atol=1e-12)


def test_psi_hat_limits():
    H, eig, sigma = _setting()
    S_diamond = blocks.noise_blocks(sigma, blocks.tangent_projector(eig)).diamond
    # beta -> inf: psi -> 1, Psi_hat -> S_hat (1 - psi ~ 1/(beta (lambda_i + lambda_j)) <= 1/(0.3e9))
    torch.testing.assert_close(blocks.psi_hat(sigma, eig, 1e9), blocks.s_hat(sigma, eig), rtol=1e-8, atol=1e-10)
    # beta -> 0: psi(x)/x -> 1/2, Psi_hat / beta -> S_diamond / 2 (next term beta s / 6, s <= 8)
    torch.testing.assert_close(blocks.psi_hat(sigma, eig, 1e-8) / 1e-8, S_diamond / 2, rtol=1e-7, atol=1e-8)


def test_psd_sqrt():
    S = random_spd(5, seed=3)
    A = blocks.psd_sqrt(S)
    torch.testing.assert_close(A, A.T)
    torch.testing.assert_close(A @ A, S, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A, torch.from_numpy(scipy.linalg.sqrtm(S.numpy()).real), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- third derivative
def test_third_order_matches_finite_differences_of_the_hessian():
    gen = torch.Generator().manual_seed(7)
    W1 = torch.randn(3, 5, generator=gen, dtype=DT)

    def loss(theta):       # a generic smooth non-convex function of 5 variables
        return torch.tanh(W1 @ theta).pow(2).sum() + 0.1 * theta.pow(4).sum() + theta[0] * theta[1] * theta[2]

    theta = torch.randn(5, generator=gen, dtype=DT)
    M = torch.randn(5, 5, generator=gen, dtype=DT)
    h = 1e-4
    # central differences of exact Hessians: O(h^2) ~ 1e-8 truncation, 1e-16/h ~ 1e-12 round-off
    ref = torch.stack([((autograd_loop_hessian(loss, theta + h * e) - autograd_loop_hessian(loss, theta - h * e))
                        / (2 * h) * (M + M.T) / 2).sum() for e in torch.eye(5, dtype=DT)])
    got = blocks.third_order(loss, theta, M)
    torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(got, blocks.third_order(loss, theta, M.T))   # only sym(M) matters


# ---------------------------------------------------------------- Ito correction: d2Phi identities
@pytest.fixture(scope="module")
def ellipsoid_point():
    toy = ProductEllipsoid([[1.0, 2.5, 0.6], [3.0, 0.7]], seed=2)
    zeta = toy.point_on_gamma(seed=3)
    eig = blocks.hessian_eigen(blocks.hessian_matrix(toy.loss, zeta))
    return toy, zeta, eig


def test_analytic_phi_is_a_projection_onto_gamma(ellipsoid_point):
    toy, zeta, eig = ellipsoid_point
    assert torch.func.grad(toy.loss)(zeta).norm() < 1e-13
    assert eig.normal.sum() == 2                                      # codimension 2
    torch.testing.assert_close(toy.project(zeta), zeta, rtol=0, atol=1e-14)
    # dPhi = P: first differences of Phi along random directions
    P = blocks.tangent_projector(eig)
    v = torch.randn(5, generator=torch.Generator().manual_seed(0), dtype=DT)
    h = 1e-6
    torch.testing.assert_close((toy.project(zeta + h * v) - toy.project(zeta - h * v)) / (2 * h), P @ v,
                               rtol=1e-7, atol=1e-8)


def _blocks_of(sigma, eig):
    return blocks.noise_blocks(sigma, blocks.tangent_projector(eig))


# h = 1e-4 second differences: truncation ~h^2 |d4 Phi| ~ 1e-8, round-off ~1e-16/h^2 = 1e-8.
FD_TOL = dict(rtol=1e-5, atol=1e-6)


def test_d2phi_tangent_identity(ellipsoid_point):
    toy, zeta, eig = ellipsoid_point
    S_par = _blocks_of(random_spd(5, seed=11), eig).par
    closed = -blocks.pseudo_inverse(eig) @ blocks.third_order(toy.loss, zeta, S_par)
    fd = fd_second_derivative_of_phi(toy.project, zeta, S_par)
    assert fd.norm() > 0.1                                           # the check is not vacuous
    torch.testing.assert_close(closed, fd, **FD_TOL)
    torch.testing.assert_close(blocks.d2phi(toy.loss, zeta, S_par, eig), fd, **FD_TOL)


def test_d2phi_normal_identity(ellipsoid_point):
    toy, zeta, eig = ellipsoid_point
    S_perp = _blocks_of(random_spd(5, seed=12), eig).perp
    P = blocks.tangent_projector(eig)
    closed = -P @ blocks.third_order(toy.loss, zeta, blocks.lyapunov_inverse(S_perp, eig))
    fd = fd_second_derivative_of_phi(toy.project, zeta, S_perp)
    assert fd.norm() > 0.01
    torch.testing.assert_close(closed, fd, **FD_TOL)
    torch.testing.assert_close(blocks.d2phi(toy.loss, zeta, S_perp, eig), fd, **FD_TOL)


def test_d2phi_mixed_block_and_full_matrix(ellipsoid_point):
    toy, zeta, eig = ellipsoid_point
    S = _blocks_of(random_spd(5, seed=13), eig)
    mixed = S.par_perp + S.perp_par
    fd_mixed = fd_second_derivative_of_phi(toy.project, zeta, mixed)
    assert fd_mixed.norm() > 0.01
    torch.testing.assert_close(blocks.d2phi(toy.loss, zeta, mixed, eig), fd_mixed, **FD_TOL)
    full = S.par + S.perp + mixed
    torch.testing.assert_close(blocks.d2phi(toy.loss, zeta, full, eig),
                               fd_second_derivative_of_phi(toy.project, zeta, full), **FD_TOL)
