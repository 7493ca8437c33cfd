"""Simulated workers: the serial and vmap backends agree; SGD matches torch.optim.SGD; H = 1
without momentum is minibatch SGD with the total batch."""
import copy

import pytest
import torch
import torch.nn.functional as F

from experiments.averaging import AveragingPolicy, WorkerAverager
from experiments.models import build_model, param_groups_no_wd
from experiments.workers import SGDOptions, Workers, weight_decay_mask
from tests.reference import tiny_cnn_bn, tiny_mlp


def _batches(K, B, shape, steps, seed, classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(K, B, *shape, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (K, B), generator=g)) for _ in range(steps)]


@pytest.mark.parametrize("momentum_policy", ["local", "average", "reset"])
def test_serial_and_vmap_agree_over_rounds_with_batchnorm_and_momentum(momentum_policy):
    model = tiny_cnn_bn(seed=3)
    K, H, rounds = 3, 3, 3
    sgd = SGDOptions(momentum=0.9, nesterov=True, weight_decay=1e-2)
    ws = {b: Workers(model, K, backend=b, sgd=sgd) for b in ("serial", "vmap")}
    avg = WorkerAverager(AveragingPolicy(buffers="average", momentum=momentum_policy))
    data = _batches(K, 8, (3, 6, 6), H * rounds, seed=5)
    for r in range(rounds):
        for x, y in data[r * H:(r + 1) * H]:
            out = {b: w.step(x, y, lr=0.2) for b, w in ws.items()}
            torch.testing.assert_close(out["serial"][0], out["vmap"][0], rtol=1e-6, atol=1e-6)
            assert torch.equal(out["serial"][1], out["vmap"][1])
        # workers really differ before averaging (otherwise the comparison would be weak)
        assert (ws["serial"].params[0] - ws["serial"].params[1]).abs().max() > 1e-3
        for w in ws.values():
            avg.average_(w.params, w.buffers, w.momentum, initial_buffers=w.initial_buffers)
    s, v = ws["serial"], ws["vmap"]
    for name in ("params", "momentum", "buffers"):
        torch.testing.assert_close(getattr(s, name).detach(), getattr(v, name).detach(), rtol=0, atol=1e-6)
    assert torch.equal(s.counters, v.counters) and int(s.counters[0, 0]) == H * rounds
    # BN running statistics moved away from their initial values
    assert (s.buffers[0] - s.initial_buffers).abs().max() > 1e-2


def test_serial_and_vmap_agree_on_the_toolkit_small_cnn():
    model = build_model("small_cnn", width=4, norm="batch").double()
    ws = {b: Workers(model, 2, backend=b, sgd=SGDOptions(momentum=0.5)) for b in ("serial", "vmap")}
    for x, y in _batches(2, 4, (3, 32, 32), 2, seed=1, classes=10):
        for w in ws.values():
            w.step(x, y, lr=0.1)
    torch.testing.assert_close(ws["serial"].params.detach(), ws["vmap"].params.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(ws["serial"].buffers, ws["vmap"].buffers, rtol=0, atol=1e-6)


def test_one_worker_matches_torch_sgd_with_nesterov_and_weight_decay():
    model = tiny_cnn_bn(seed=1)
    ref = copy.deepcopy(model).train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    w = Workers(model, 1, backend="serial",
                sgd=SGDOptions(momentum=0.9, nesterov=True, weight_decay=1e-3, wd_norm_bias=True))
    for x, y in _batches(1, 6, (3, 6, 6), 5, seed=2):
        opt.zero_grad()
        F.cross_entropy(ref(x[0]), y[0]).backward()
        opt.step()
        w.step(x, y, lr=0.05)
    expected = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    torch.testing.assert_close(w.params[0], expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.buffers[0], torch.cat([ref[1].running_mean, ref[1].running_var]),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["serial", "vmap"])
def test_H1_without_momentum_is_minibatch_sgd_with_the_total_batch(backend):
    model = tiny_mlp(seed=4)
    K, B, lr, wd = 4, 5, 0.3, 1e-2
    w = Workers(model, K, backend=backend, sgd=SGDOptions(weight_decay=wd, wd_norm_bias=True))
    avg = WorkerAverager()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=lr, weight_decay=wd)
    for x, y in _batches(K, B, (5,), 6, seed=8):
        w.step(x, y, lr)
        avg.average_(w.params, w.buffers, w.momentum)
        opt.zero_grad()
        F.cross_entropy(ref(x.reshape(K * B, 5)), y.reshape(-1)).backward()
        opt.step()
    expected = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    for k in range(K):
        torch.testing.assert_close(w.params[k].detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("nesterov", [False, True])
def test_serial_fused_per_worker_update_equals_the_stacked_update(nesterov):
    # The serial step updates each worker from its per-parameter grads right after its backward
    # pass (no (K, D) gradient buffer); it must equal autograd grads concatenated into (K, D)
    # plus `apply_sgd_`, with weight decay masked off norm layers and biases.
    model = build_model("resnet20", width=4).double()
    sgd = SGDOptions(momentum=0.9, nesterov=nesterov, weight_decay=1e-2, wd_norm_bias=False)
    fused, ref = (Workers(model, 3, backend="serial", sgd=sgd) for _ in range(2))
    assert 0 < len(fused._decayed) < len(fused._copy_params[0])
    for i, (x, y) in enumerate(_batches(3, 4, (3, 8, 8), 3, seed=11, classes=10)):
        losses, correct = fused.step(x, y, lr=0.1 + 0.05 * i)
        ref_losses, ref_correct, grads = ref.forward_backward(x, y)
        # the reference gradients are the autograd gradients of each worker's own copy
        assert torch.equal(grads[1], torch.cat([p.grad.reshape(-1) for p in ref._copy_params[1]]))
        ref.apply_sgd_(grads, lr=0.1 + 0.05 * i)
        # float64: the two update paths differ only in rounding (fused multiply-adds)
        torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-12)
        assert torch.equal(correct, ref_correct)
    assert (fused.params[0] - fused.params[1]).abs().max() > 1e-3
    for name in ("params", "momentum", "buffers"):
        torch.testing.assert_close(getattr(fused, name), getattr(ref, name), rtol=0, atol=1e-12)
    assert all(p.grad is None for p in fused._copy_params[0])


def test_weight_decay_mask_excludes_norm_layers_and_biases_like_param_groups_no_wd():
    model = build_model("resnet20", width=4)
    mask = weight_decay_mask(model, wd_norm_bias=False)
    decay, no_decay = param_groups_no_wd(model)
    ids_no = {id(p) for p in no_decay}
    expected = torch.cat([torch.full((p.numel(),), 0.0 if id(p) in ids_no else 1.0) for p in model.parameters()])
    assert torch.equal(mask, expected) and 0 < mask.sum() < mask.numel()
    assert torch.equal(weight_decay_mask(model, wd_norm_bias=True), torch.ones_like(mask))


def test_channels_last_and_bf16_autocast_stay_on_the_same_path():
    model = build_model("small_cnn", width=4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 3, 32, 32, generator=g), torch.randint(0, 10, (2, 4), generator=g)
    wb, wc = Workers(model, 2, backend="vmap"), Workers(model, 2, backend="vmap", channels_last=True)
    base, cl = wb.forward_backward(x, y), wc.forward_backward(x, y)
    # same math in another memory layout: float32 rounding only (the gradient rows hold the
    # convolution weights in channels-last order: compare them tensor by tensor)
    from experiments.workers import _split_views
    gb, gc = _split_views(base[2], *wb._p_layout, (2,)), _split_views(cl[2], *wc._p_layout, (2,))
    for n in gb:
        torch.testing.assert_close(gc[n], gb[n], rtol=1e-4, atol=1e-5, msg=n)
    bf = Workers(model, 2, backend="serial", autocast_dtype=torch.bfloat16).forward_backward(x, y)
    # bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operation): the loss agrees to ~1%
    torch.testing.assert_close(bf[0], base[0], rtol=2e-2, atol=0)
    assert not torch.equal(bf[0], base[0])  # autocast really ran in bf16


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="backend"):
        Workers(tiny_mlp(), 2, backend="threads")
    w = Workers(tiny_mlp(), 2)
    with pytest.raises(ValueError, match="stacked over K=2"):
        w.step(torch.zeros(3, 4, 5, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.long), 0.1)


@pytest.mark.parametrize("backend", ["serial", "vmap"])
def test_channels_last_applies_to_weights_and_changes_no_result(backend):
    model = build_model("small_cnn", width=4, norm="batch").double()
    sgd = SGDOptions(momentum=0.9, weight_decay=1e-3)
    plain = Workers(model, 2, backend=backend, sgd=sgd)
    cl = Workers(model, 2, backend=backend, sgd=sgd, channels_last=True)
    convs = [n for n, p in model.named_parameters() if p.dim() == 4]
    assert convs
    views = cl.named_views(0)
    for n in convs:   # the stored weights are channels-last, not only the inputs
        assert views[n].is_contiguous(memory_format=torch.channels_last) and not views[n].is_contiguous()
    if backend == "serial":
        m = cl._copies[1]
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in m.parameters() if p.dim() == 4)
    for x, y in _batches(2, 4, (3, 32, 32), 3, seed=2, classes=10):
        a, b = plain.step(x, y, lr=0.1), cl.step(x, y, lr=0.1)
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-12)
    # the same network, parameter by parameter (float64: only the summation order of the
    # convolutions may differ, far below 1e-10)
    sa, sb = plain.mean_state(), cl.mean_state()
    for n in sa:
        torch.testing.assert_close(sa[n], sb[n], rtol=0, atol=1e-10, msg=n)
    torch.testing.assert_close(plain.buffers, cl.buffers, rtol=0, atol=1e-10)


def test_stacked_workers_equal_serial_in_float64_to_rounding():
    # the stacked (vmap) workers and the serial reference over 4 steps of a BN network with
    # Nesterov momentum and weight decay: float64, so only the summation order of the batched
    # kernels may differ (~1e-16 relative per operation; 1e-12 leaves room for 4 steps)
    model = build_model("small_cnn", width=4, norm="batch").double()
    sgd = SGDOptions(momentum=0.9, nesterov=True, weight_decay=5e-4)
    ws = {b: Workers(model, 3, backend=b, sgd=sgd, channels_last=True) for b in ("serial", "vmap")}
    for x, y in _batches(3, 4, (3, 32, 32), 4, seed=7, classes=10):
        out = {b: w.step(x, y, lr=0.1) for b, w in ws.items()}
        torch.testing.assert_close(out["serial"][0], out["vmap"][0], rtol=0, atol=1e-12)
        assert torch.equal(out["serial"][1], out["vmap"][1])
    s, v = ws["serial"], ws["vmap"]
    assert (s.params[0] - s.params[1]).abs().max() > 1e-3      # the workers really differ
    for name in ("params", "momentum", "buffers"):
        torch.testing.assert_close(getattr(v, name).detach(), getattr(s, name).detach(), rtol=0, atol=1e-12)
    assert torch.equal(s.counters, v.counters)


def test_bf16_autocast_on_the_cpu_stacked_and_serial():
    # bf16 autocast is allowed on the CPU (torch's CPU autocast): the stacked and serial
    # workers run the same bf16 kernels up to batching, so their losses agree to bf16 rounding
    # (8 mantissa bits, relative 2^-8 ~ 4e-3 per rounding; 2e-2 over a small CNN), and they are
    # really bf16 (different from the fp32 losses)
    model = build_model("small_cnn", width=4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 8, 3, 32, 32, generator=g), torch.randint(0, 10, (2, 8), generator=g)
    out = {b: Workers(model, 2, backend=b, autocast_dtype=torch.bfloat16).step(x, y, 0.1)
           for b in ("serial", "vmap")}
    fp32 = Workers(model, 2, backend="vmap").step(x, y, 0.1)
    torch.testing.assert_close(out["vmap"][0], out["serial"][0], rtol=2e-2, atol=0)
    assert out["vmap"][0].dtype == torch.float32
    assert not torch.equal(out["vmap"][0], fp32[0])


def test_compile_needs_the_stacked_backend():
    with pytest.raises(ValueError, match="compile applies to the stacked workers"):
        Workers(tiny_mlp(), 2, backend="serial", compile=True)


@pytest.mark.slow
def test_compiled_stacked_workers_agree_with_eager():
    # torch.compile of the vmapped forward pass (about a minute of compilation on one shared
    # CPU core, 52 s measured, hence slow): two steps of a BatchNorm CNN, parameters, momentum and BN buffers
    # equal to eager to float32 rounding (the compiler fuses and reorders: 1e-5)
    model = build_model("small_cnn", width=4, norm="batch")
    sgd = SGDOptions(momentum=0.9)
    eager = Workers(model, 2, backend="vmap", sgd=sgd)
    comp = Workers(model, 2, backend="vmap", sgd=sgd, compile=True)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        x, y = torch.randn(2, 4, 3, 32, 32, generator=g), torch.randint(0, 10, (2, 4), generator=g)
        a, b = eager.step(x, y, 0.1), comp.step(x, y, 0.1)
        torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
    for name in ("params", "momentum", "buffers"):
        torch.testing.assert_close(getattr(comp, name).detach(), getattr(eager, name).detach(),
                                   rtol=1e-5, atol=1e-5)
    assert (eager.buffers - eager.initial_buffers).abs().max() > 1e-3   # BN statistics moved
    assert torch.equal(comp.counters, eager.counters)
