"""experiments.sharpness: per-evaluation snapshots of a run, probing them, solver histories.

Budget: about 20 s on one thread (one tiny fp64 synthetic run shared by the snapshot tests).
"""
import pytest
import torch

from dynamics import MatrixOperator, power_iteration, top_eigenpairs
from experiments.config import TrainConfig
from experiments.metrics import read_metrics
from experiments.probe import load_model, sharpness_data
from experiments.sharpness import (lanczos_history, list_snapshots, power_history, probe_series,
                                   train_with_snapshots)
from experiments.trainer import load_datasets


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharp") / "run"
    cfg = TrainConfig(model="small_cnn", width=4, data="synthetic", synthetic_size=128, test_size=64,
                      workers=2, local_batch=16, local_steps=2, lr=0.1, epochs=3, eval_every=4,
                      bn_batches=2, precision="fp64", track_sharpness=(0, 2), sharpness_samples=16,
                      sharpness_matvecs=20, out=str(out), backend="vmap", progress=False)
    seen = []
    result, snaps = train_with_snapshots(cfg, on_eval=seen.append)
    return cfg, result, snaps, seen


def test_one_snapshot_per_evaluation_in_training_order(run):
    cfg, result, snaps, seen = run
    recs = read_metrics(result.out / "metrics.jsonl")
    assert len(snaps) == len(recs) == len(seen) == 3   # 128 / 32 = 4 steps per epoch x 3 epochs, eval every 4
    assert [s.step for s in snaps] == [r["step"] for r in recs] == [4, 8, 12]
    assert [s.evaluation for s in snaps] == [0, 1, 2]
    assert list_snapshots(result.out) == snaps
    assert list_snapshots(result.out / "snapshots") == snaps
    # each snapshot loads as a final.pt would (experiments.probe.load_model)
    model, loaded_cfg = load_model(str(snaps[0].path))
    assert loaded_cfg == cfg and not model.training


def test_last_snapshot_is_the_final_network(run):
    cfg, result, snaps, _ = run
    final = torch.load(result.final_path, weights_only=False)["state_dict"]
    last = torch.load(snaps[-1].path, weights_only=False)["state_dict"]
    assert final.keys() == last.keys()
    for k in final:
        assert torch.equal(final[k], last[k]), k
    # earlier snapshots are different networks (training moved the parameters)
    first = torch.load(snaps[0].path, weights_only=False)["state_dict"]
    assert any(not torch.equal(first[k], last[k]) for k in final)


def test_snapshots_reproduce_the_trainers_tracked_sharpness(run):
    """The trainer measured lambda_max and tr H at evaluations 0 and 2 on the network it
    evaluated; the snapshot of that evaluation, probed the same way, gives the same numbers."""
    from experiments.probe import measure_sharpness
    cfg, result, snaps, _ = run
    recs = read_metrics(result.out / "metrics.jsonl")
    train_set, _ = load_datasets(cfg, torch.device("cpu"), torch.float64)
    data = sharpness_data(cfg, train_set)
    for i in (0, 2):
        model, _ = load_model(str(snaps[i].path))
        got = measure_sharpness(model, data, matvecs=cfg.sharpness_matvecs, seed=cfg.seed)
        # same model, data and seed: equal up to float64 rounding
        assert got["top_eigenvalue"] == pytest.approx(recs[i]["top_eigenvalue"], rel=1e-10)
        assert got["hessian_trace"] == pytest.approx(recs[i]["hessian_trace"], rel=1e-10)


def test_probe_series_agrees_with_direct_dynamics_calls(run):
    from dynamics import Objective, hessian_trace
    cfg, result, snaps, _ = run
    train_set, _ = load_datasets(cfg, torch.device("cpu"), torch.float64)
    data = sharpness_data(cfg, train_set, 16)
    points = probe_series(snaps[-1:], data, top_k=2, tol=1e-8, max_matvecs=300, trace_matvecs=12,
                          seeds=(0, 1), density_probes=2, density_steps=6)
    p = points[0]
    assert p.eigenvalues.shape == (2, 2) and bool(p.eig_converged.all())
    # two random starts converge to the same top-2 eigenvalues (tol 1e-8 on relative residuals,
    # so the Ritz values agree to ~1e-8 or better)
    torch.testing.assert_close(p.eigenvalues[0], p.eigenvalues[1], rtol=1e-7, atol=0)
    model, _ = load_model(str(snaps[-1].path))
    obj = Objective(model, torch.nn.CrossEntropyLoss(), data, bn="eval")
    # every number is the documented dynamics call with the documented seed, on the snapshot
    values, vectors = top_eigenpairs(obj, k=2, tol=1e-8, max_matvecs=300,
                                     generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(p.eigenvalues[1], values, rtol=1e-12, atol=0)
    for j, s in enumerate((0, 1)):
        ref = hessian_trace(obj, num_matvecs=12, generator=torch.Generator().manual_seed(1000 + s))
        assert float(p.trace[j]) == pytest.approx(ref.value, rel=1e-10)
        assert float(p.trace_stderr[j]) == pytest.approx(ref.stderr, rel=1e-10)
    # the noise probe used the first start's eigenvectors: U^T Sigma U in that basis from
    # per-sample gradients computed here by autograd, one sample at a time
    values0, vectors0 = top_eigenpairs(obj, k=2, tol=1e-8, max_matvecs=300,
                                       generator=torch.Generator().manual_seed(0))
    grads = []
    for x, y in data:
        for i in range(len(y)):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
            grads.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]))
    G = torch.stack(grads)
    C = (G - G.mean(0)) @ vectors0
    torch.testing.assert_close(p.noise.cov_in_basis, C.T @ C / len(G), rtol=1e-8, atol=1e-12)
    assert p.noise.trace_sigma == pytest.approx(float(((G - G.mean(0)) ** 2).sum()) / len(G), rel=1e-9)
    assert p.noise.alignment is not None
    assert p.density.nodes.shape == (2, 6)
    assert p.loss == pytest.approx(float(obj.loss()), rel=1e-12)


def _spectrum_matrix(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ Q.T


def test_power_history_is_power_iteration_and_follows_the_gap_rate():
    lam = torch.cat([torch.tensor([1.0, 0.9]), torch.linspace(0.5, 0.0, 58)])
    op = MatrixOperator(_spectrum_matrix(lam))
    hist = power_history(op, tol=1e-6, max_matvecs=2000, generator=torch.Generator().manual_seed(3))
    ref = power_iteration(op, tol=1e-6, max_matvecs=2000, generator=torch.Generator().manual_seed(3))
    assert int(hist.matvecs[-1]) == ref.matvecs == len(hist.matvecs)
    assert float(hist.values[-1]) == pytest.approx(float(ref.values[0]), rel=1e-14)
    assert float(hist.residuals[-1]) <= 1e-6 < float(hist.residuals[-2])
    # the residual shrinks by lambda_2 / lambda_1 = 0.9 per matvec asymptotically: the fitted
    # rate over the last 40 matvecs lies within 1% of it (the third eigenvalue, 0.5, decays away)
    tail = torch.log(hist.residuals[-41:])
    rate = torch.exp((tail[-1] - tail[0]) / 40)
    assert rate == pytest.approx(0.9, rel=0.01)


def test_lanczos_reaches_a_tolerance_with_far_fewer_matvecs_than_power():
    lam = torch.cat([torch.tensor([1.0, 0.98]), torch.linspace(0.9, 0.0, 198)])
    op = MatrixOperator(_spectrum_matrix(lam, seed=1))
    gen = lambda: torch.Generator().manual_seed(0)
    lz = lanczos_history(op, tol=1e-6, max_matvecs=400, generator=gen())
    pw = power_history(op, tol=1e-6, max_matvecs=2000, generator=gen())
    assert float(lz.values[-1]) == pytest.approx(1.0, rel=1e-10)
    # power: residual ~ |c2/c1| (1 - 0.98) 0.98^n, so ~log(1e-6 / 0.02)/log(0.98) ~ 490 matvecs
    # (give or take the random start's c2/c1); Lanczos, converging at a sqrt-of-gap rate, < 150
    assert pw.matvecs_to(1e-6) > 300
    assert lz.matvecs_to(1e-6) < 150
    # matvecs_to is monotone in the tolerance and None when the tolerance was never reached
    assert lz.matvecs_to(1e-2) <= lz.matvecs_to(1e-4) <= lz.matvecs_to(1e-6)
    assert lz.matvecs_to(1e-14) is None
    # the recorded Lanczos residual is top_eigenpairs' own residual at the end
    res = top_eigenpairs(op, k=1, tol=1e-6, max_matvecs=400, generator=gen())
    assert int(lz.matvecs[-1]) == res.matvecs
    assert float(lz.residuals[-1]) == pytest.approx(float(res.residuals[0]) / float(res.values[0]), rel=1e-12)


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no snapshots"):
        list_snapshots(tmp_path)
    with pytest.raises(ValueError, match="no snapshots"):
        probe_series([], [(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))])
