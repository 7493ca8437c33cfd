"""The GPU path on a CUDA device: stacked against serial workers, exact resume, HVPs and the
fast_backward kernels against stock autograd, the device data loader without host syncs.

Run with `pytest -m cuda` (benchmarks/gpu_check.sh does); every test is marked `cuda` and is
skipped, with the reason shown by `-ra`, where torch sees no CUDA device. fp32 comparisons run
with TF32 off (true fp32); float64 ones hold to summation-order rounding.
"""
import os

import pytest
import torch
import torch.nn.functional as F

# deterministic cuBLAS needs this before the first cuBLAS handle is made
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA device here (torch.cuda.is_available() is False)")]

F64 = torch.float64


@pytest.fixture(autouse=True)
def true_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _batches(K, B, steps, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(K, B, 3, 32, 32, generator=g, dtype=dtype).cuda(),
             torch.randint(0, 10, (K, B), generator=g).cuda()) for _ in range(steps)]


def test_stacked_and_serial_workers_agree_on_the_gpu_in_fp32():
    # 4 workers of a BatchNorm CNN, 3 steps with momentum: the same math in other kernels
    # (batched cuDNN convolutions vs one per worker), fp32 rounding ~1e-7 relative per
    # operation: losses to 1e-4 relative, BN buffers to 1e-4. Parameters and momentum are
    # compared as whole vectors (relative 2-norm): where rounding moves a ReLU or max-pool
    # input across its kink (a tie), a few gradient entries are routed differently (seen on
    # the CPU: 38 of 25,672 momentum entries off by 4e-4), so an entry-wise bound would be
    # flaky while the vectors agree to ~1e-4 (momentum) and ~1e-5 (parameters).
    from experiments.models import build_model
    from experiments.workers import SGDOptions, Workers
    model = build_model("small_cnn", width=8, norm="batch").cuda()
    sgd = SGDOptions(momentum=0.9, weight_decay=5e-4)
    ws = {b: Workers(model, 4, backend=b, sgd=sgd, channels_last=True) for b in ("serial", "vmap")}
    for x, y in _batches(4, 16, 3, seed=0):
        out = {b: w.step(x, y, 0.05) for b, w in ws.items()}
        torch.testing.assert_close(out["vmap"][0], out["serial"][0], rtol=1e-4, atol=1e-5)
    s, v = ws["serial"], ws["vmap"]
    assert (s.params[0] - s.params[1]).abs().max() > 1e-4        # the workers really differ
    rel = lambda a, b: float((a.detach() - b.detach()).norm() / b.detach().norm())
    assert rel(v.params, s.params) < 1e-4 and rel(v.momentum, s.momentum) < 1e-2
    torch.testing.assert_close(v.buffers, s.buffers, rtol=1e-4, atol=1e-4)
    # bf16 autocast on the GPU: stacked and serial to bf16 rounding (2^-8 per rounding)
    bf = {b: Workers(model, 4, backend=b, autocast_dtype=torch.bfloat16) for b in ("serial", "vmap")}
    x, y = _batches(4, 16, 1, seed=1)[0]
    lb = {b: w.step(x, y, 0.05)[0] for b, w in bf.items()}
    torch.testing.assert_close(lb["vmap"], lb["serial"], rtol=3e-2, atol=0)


def test_resume_on_the_gpu_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    # deterministic algorithms: a run of 2 epochs resumed to 4 ends bit for bit where a run of
    # 4 epochs ends (constant learning rate, so extending the run changes no schedule)
    from experiments.checkpoint import load_checkpoint, load_verified
    from experiments.config import preset
    from experiments.trainer import train
    base = dict(device="cuda", deterministic=True, momentum=0.9, aug=True, label_noise=0.1,
                checkpoint_every=8, progress=False)
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    try:
        full = train(preset("cpu-tiny", epochs=4, out=str(tmp_path / "full"), **base))
        assert full.backend == "vmap"    # the stacked workers are the default on a GPU
        train(preset("cpu-tiny", epochs=2, out=str(tmp_path / "cut"), **base))
        train(preset("cpu-tiny", epochs=4, out=str(tmp_path / "cut"), resume=str(tmp_path / "cut"), **base))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    a = load_verified(tmp_path / "full" / "final.pt")["state_dict"]
    b = load_verified(tmp_path / "cut" / "final.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")
    cb = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    for key in ("params", "momentum", "buffers", "generators"):
        assert torch.equal(ca[key], cb[key]), key


def test_hvp_on_cuda_equals_the_double_backward_reference():
    # float64 on the GPU: the toolkit's HVP (fast_backward, reverse and forward mode) against
    # stock double backward on the same device, and against the CPU; summation order only
    from dynamics import Objective
    from tests.reference import classification_batches, tiny_cnn_bn
    model_cpu = tiny_cnn_bn(seed=3)
    batches_cpu = classification_batches(24, image=True, sizes=[10, 14])
    model = tiny_cnn_bn(seed=3).cuda()
    batches = [(x.cuda(), y.cuda()) for x, y in batches_cpu]
    loss = torch.nn.CrossEntropyLoss()
    ref = Objective(model, loss, batches, fast_backward=False)
    v = torch.randn(ref.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    expected = ref.hvp(v.cuda())
    assert expected.is_cuda and expected.norm() > 0
    for kw in (dict(hvp_mode="reverse", fast_backward=True), dict(hvp_mode="forward")):
        got = Objective(model, loss, batches, **kw).hvp(v.cuda())
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=str(kw))
    on_cpu = Objective(model_cpu, loss, batches_cpu, fast_backward=False).hvp(v)
    torch.testing.assert_close(expected.cpu(), on_cpu, rtol=1e-10, atol=1e-12)


def test_fast_backward_kernels_on_cuda_match_stock_to_third_order():
    # conv (with stride, groups, padding), eval BatchNorm and ReLU: value, gradient, HVP and
    # the gradient of v^T H v equal the stock ops' on the GPU in float64 (cuDNN's algorithms
    # differ from the CPU's: summation order only, 1e-10 relative)
    from dynamics.fast_backward import conv, eval_batch_norm, relu
    from tests.dynamics.test_fast_backward import assert_same

    def on_cuda(fn, inputs):
        """[f, grad f, H v, grad (v^T H v)] of sum(tanh(fn(*inputs)) * c) on the GPU, on the CPU."""
        gen = torch.Generator().manual_seed(0)
        inputs = [t.detach().cuda().requires_grad_(True) for t in inputs]
        out = fn(*inputs)
        c = torch.randn(out.shape, generator=gen, dtype=out.dtype).cuda()
        loss = (torch.tanh(out) * c).sum()
        vs = [torch.randn(t.shape, generator=gen, dtype=t.dtype).cuda() for t in inputs]
        g = torch.autograd.grad(loss, inputs, create_graph=True)
        hv = torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, vs)), inputs, create_graph=True)
        third = torch.autograd.grad(sum((hi * vi).sum() for hi, vi in zip(hv, vs)), inputs)
        return [t.detach().cpu() for t in (loss, *g, *hv, *third)]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 7, 7, generator=gen, dtype=F64)
    w = torch.randn(6, 2, 3, 3, generator=gen, dtype=F64)
    b = torch.randn(6, generator=gen, dtype=F64)
    for stride, padding, groups in ((1, 1, 1), (2, 1, 2), (1, 0, 2)):
        wk = w if groups == 2 else torch.randn(6, 4, 3, 3, generator=gen, dtype=F64)
        assert_same(on_cuda(lambda x, w, b: conv(x, w, b, stride, padding, 1, groups), [x, wk, b]),
                    on_cuda(lambda x, w, b: F.conv2d(x, w, b, stride, padding, 1, groups), [x, wk, b]))
    mean, var = torch.randn(4, generator=gen, dtype=F64), torch.rand(4, generator=gen, dtype=F64) + 0.5
    scale, shift = torch.randn(4, generator=gen, dtype=F64), torch.randn(4, generator=gen, dtype=F64)
    assert_same(on_cuda(lambda x, s, c: eval_batch_norm(x, mean.cuda(), var.cuda(), s, c, 1e-5), [x, scale, shift]),
                on_cuda(lambda x, s, c: F.batch_norm(x, mean.cuda(), var.cuda(), s, c, False, 0.0, 1e-5),
                        [x, scale, shift]))
    xs = x + 0.01 * torch.sign(x)   # away from the kink
    assert_same(on_cuda(lambda x: relu(x) * x, [xs]), on_cuda(lambda x: F.relu(x) * x, [xs]))


def test_device_data_loader_draws_on_the_gpu_without_host_syncs():
    # a CUDA generator draws the crops and flips where the data live; the batch equals the
    # same crops applied on the CPU; a training step (batch, label noise, stacked step,
    # divergence flag) runs under torch.cuda.set_sync_debug_mode("error"): no host sync
    from experiments.datasets import DeviceDataset, crop_flip, draw_crop_flip, flip_labels, synthetic_cifar
    from experiments.divergence import DivergenceWatch
    from experiments.models import build_model
    from experiments.workers import Workers
    images, labels = synthetic_cifar(64, seed=0)
    data = DeviceDataset(images, labels, device="cuda")
    idx = torch.arange(32, device="cuda").reshape(2, 16)
    gens = [torch.Generator(device="cuda").manual_seed(k) for k in range(2)]
    ref = [torch.Generator(device="cuda").manual_seed(k) for k in range(2)]
    x, y = data.batch(idx, augment=True, generator=gens)
    assert x.is_cuda and y.is_cuda
    for k in range(2):
        oy, ox, flips = draw_crop_flip(16, generator=ref[k])
        raw = crop_flip(images[idx[k].cpu()], oy.cpu(), ox.cpu(), flips.cpu())
        expected = DeviceDataset(raw, labels[idx[k].cpu()]).batch(torch.arange(16), augment=False)[0]
        torch.testing.assert_close(x[k].cpu(), expected, rtol=0, atol=1e-6)
    w = Workers(build_model("small_cnn", width=8).cuda(), 2, backend="vmap")
    watch = DivergenceWatch(torch.device("cuda"), factor=100.0, num_classes=10)
    watch.start_round(w.params)
    w.step(x, y, 0.05)                   # warm-up (cuDNN set-up may sync once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for t in range(3):
            x, y = data.batch(idx, augment=True, generator=gens)
            y = torch.stack([flip_labels(y[k], 0.1, 10, g) for k, g in enumerate(gens)])
            losses, _ = w.step(x, y, 0.05)
            watch.update(losses, w.params, t)
            watch.tripped()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert watch.verdict() == (0, -1)
