import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from experiments.plotstyle import SLOW_TIME_LABEL, apply_style, band, save_figure


def test_band_draws_mean_and_one_std_band():
    apply_style()
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 7)
    samples = rng.normal(size=(5, 7))
    fig, ax = plt.subplots()
    line = band(ax, t, samples, label="x")
    np.testing.assert_allclose(line.get_ydata(), samples.mean(0))
    (poly,) = ax.collections
    ys = poly.get_paths()[0].vertices[:, 1]
    std = samples.std(0, ddof=1)
    assert ys.max() == pytest.approx((samples.mean(0) + std).max())
    assert ys.min() == pytest.approx((samples.mean(0) - std).min())
    plt.close(fig)


def test_band_rejects_mismatched_samples():
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="shape"):
        band(ax, [0, 1, 2], np.zeros((3, 4)))
    plt.close(fig)


def test_save_figure_writes_png_and_pdf(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    ax.set_xlabel(SLOW_TIME_LABEL)
    ax.set_ylabel("tr H")
    paths = save_figure(fig, "demo", tmp_path)
    assert [p.name for p in paths] == ["demo.png", "demo.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.pdf", "demo.png"]  # no temp files left
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in paths)
    plt.close(fig)


def test_save_figure_refuses_unlabelled_axes_and_keeps_old_files(tmp_path):
    (tmp_path / "demo.png").write_bytes(b"old")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    ax.set_xlabel("steps")
    with pytest.raises(ValueError, match="label"):
        save_figure(fig, "demo", tmp_path)
    assert (tmp_path / "demo.png").read_bytes() == b"old"
    plt.close(fig)
