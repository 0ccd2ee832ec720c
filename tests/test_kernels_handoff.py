"""The GPU-CPU hand-off: GPU halves (send, receive) with the CPU half (cold_step) between them, eagerly and
inside a CUDA graph, against float64 math; and both sides' timeouts."""
import time

import pytest
import torch

from kernels import FFNRows, sparse_ffn, sparse_ffn_reference
from kernels.cases import random_mask, random_share
from kernels.cpu import ColdStep

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("cupy")
from kernels import handoff as handoff_module
from kernels.handoff import Handoff, given

D, N_FF = 256, 640
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_err(a, b):
    return ((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(dtype, n_layers=3, dim=D, m=300, n_ff=N_FF):
    layers = [FFNRows.pack(*random_share(m, dim, n_ff, scale=0.1), "cpu", "f16") for _ in range(n_layers)]
    return layers, Handoff(layers, dim, n_ff, dtype, "relu", 0.0, "cuda")


def expected(rows, x, active, y_gpu):
    gate, up, down_t = (t.double() for t in rows.dense())
    cold = sparse_ffn_reference(x.double().cpu(), gate, up, down_t, rows.neuron_idx, active.cpu())
    return y_gpu.double().cpu() + cold


def one_step(handoff, layers, xs, masks, y_gpus, residuals=None):
    handoff.begin_step()
    outs = []
    for slot in range(len(layers)):
        outs.append(handoff.exchange(slot, xs[slot], masks[slot], given(y_gpus[slot]),
                                     None if residuals is None else residuals[slot]))
    return outs


def fresh_inputs(n_layers, dtype, dim=D):
    xs = [torch.randn(1, dim, device="cuda").to(dtype) for _ in range(n_layers)]
    masks = [random_mask(1, N_FF, 0.3).cuda() for _ in range(n_layers)]
    y_gpus = [torch.randn(1, dim, device="cuda").to(dtype) for _ in range(n_layers)]
    return xs, masks, y_gpus


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dim", [D, 250])  # 250: not a multiple of 16 bytes, read element by element
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_eager_steps_add_the_cold_rows(dtype, dim, with_residual):
    steps = []
    layers, handoff = make(dtype, dim=dim)
    handoff.on_step = lambda seconds, active, cold: steps.append((seconds, active, cold))
    with handoff.engage():
        for _ in range(2):
            xs, masks, y_gpus = fresh_inputs(len(layers), dtype, dim)
            residuals = [torch.randn_like(y) for y in y_gpus] if with_residual else None
            with handoff.cpu_alongside():
                outs = one_step(handoff, layers, xs, masks, y_gpus, residuals)
            torch.cuda.synchronize()
            for i, (rows, x, mask, y_gpu, out) in enumerate(zip(layers, xs, masks, y_gpus, outs)):
                want = expected(rows, x, mask, y_gpu)
                if with_residual:  # added to the rounded sum, as torch's residual + y
                    want = (residuals[i].cpu() + want.to(dtype)).double()
                assert out.dtype == dtype
                assert rel_err(out, want) < RTOL[dtype]
            active = sum(int(m.sum()) for m in masks)
            cold = sum(int(m[0, rows.neuron_idx.cuda()].sum()) for rows, m in zip(layers, masks))
            assert steps[-1][1:] == (active, cold) and steps[-1][0] > 0
    assert handoff.host_epoch == int(handoff.epoch) == 2


@pytest.mark.parametrize("cpu_late", [False, True])  # True: every down block has counted before the CPU's flag
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_hot_rows_down_kernel_adds_the_cold_rows(dtype, cpu_late, monkeypatch):
    """Hot rows on gate_up_one + down_partial: the down kernel's last blocks wait for the fetched CPU share and
    write residual + (hot + cold) themselves (no add_parts), in 16-bit and fp32 outputs."""
    monkeypatch.setattr("kernels.cuda.ONE_LAUNCH_MAX_BYTES", 0)
    layers, handoff = make(dtype)
    if cpu_late:
        run_cpu = handoff.run_cpu
        monkeypatch.setattr(handoff, "run_cpu", lambda: (time.sleep(0.05), run_cpu()))
    hot_rows = FFNRows.pack(*random_share(200, D, N_FF, scale=0.1), "cuda", "f16")
    hot_dense = [t.double() for t in hot_rows.dense()]
    with handoff.engage():
        xs, masks, _ = fresh_inputs(len(layers), dtype)
        residuals = [torch.randn(1, D, device="cuda").to(dtype) for _ in layers]
        with handoff.cpu_alongside():
            handoff.begin_step()
            outs = [handoff.exchange(slot, x, mask, lambda beside, residual, cold, x=x, mask=mask: sparse_ffn(
                        x, hot_rows, mask, residual=residual, beside=beside, cold=cold), residual)
                    for slot, (x, mask, residual) in enumerate(zip(xs, masks, residuals))]
            handoff.end_step()
        torch.cuda.synchronize()
    for rows, x, mask, residual, out in zip(layers, xs, masks, residuals, outs):
        y_hot = sparse_ffn_reference(x.double(), *hot_dense, hot_rows.neuron_idx, mask)
        want = (residual.cpu() + expected(rows, x, mask, y_hot).to(dtype)).double()
        assert out.dtype == dtype and rel_err(out, want) < RTOL[dtype]


@pytest.mark.parametrize("m,n_ff,density", [(300, N_FF, 0.3), (2500, 4000, 0.3), (2500, 4000, 0.0),
                                             (2500, 4000, 1.0), (17000, 20000, 0.3)])
def test_send_lists_the_active_cold_rows(m, n_ff, density):
    """send_to_host's list of each layer's active cold rows (several rows a thread when m > 1024, more than its
    registers hold when m > 16 K) is the reference's, in every layer's row of the list."""
    layers, handoff = make(torch.float16, m=m, n_ff=n_ff)
    masks = [random_mask(1, n_ff, density).cuda() for _ in layers]
    with handoff.engage(), handoff.cpu_alongside():
        handoff.begin_step()
        for slot, mask in enumerate(masks):
            handoff.exchange(slot, torch.randn(1, D, device="cuda").half(), mask,
                             given(torch.zeros(1, D, device="cuda").half()))
    torch.cuda.synchronize()
    for slot, (rows, mask) in enumerate(zip(layers, masks)):
        want = ColdStep.list_of(rows, mask[0].cpu())
        assert torch.equal(handoff.cold_list[slot, : want.numel()], want)


def test_graph_replays_take_new_inputs():
    dtype = torch.float16
    layers, handoff = make(dtype)
    xs, masks, y_gpus = fresh_inputs(len(layers), dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), handoff.engage():
        with handoff.cpu_alongside():
            one_step(handoff, layers, xs, masks, y_gpus)  # warm-up
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            outs = one_step(handoff, layers, xs, masks, y_gpus)
    torch.cuda.current_stream().wait_stream(stream)
    for _ in range(3):
        new_xs, new_masks, new_ys = fresh_inputs(len(layers), dtype)
        for static, new in zip(xs + masks + y_gpus, new_xs + new_masks + new_ys):
            static.copy_(new)
        graph.replay()
        handoff.run_cpu()
        torch.cuda.synchronize()
        for rows, x, mask, y_gpu, out in zip(layers, xs, masks, y_gpus, outs):
            assert rel_err(out, expected(rows, x, mask, y_gpu)) < RTOL[dtype]
    assert (handoff.cold_step.times[:, 1] > handoff.cold_step.times[:, 0]).all()


def test_each_side_gives_up_without_the_other(monkeypatch):
    monkeypatch.setattr(handoff_module, "TIMEOUT_S", 0.05)
    layers, handoff = make(torch.float16, n_layers=1)
    with pytest.raises(RuntimeError, match="GPU did not signal"):
        handoff.run_cpu()  # no GPU half launched
    xs, masks, y_gpus = fresh_inputs(1, torch.float16)
    with handoff.engage():
        one_step(handoff, layers, xs, masks, y_gpus)  # step 1 on the GPU; the host is at step 1 already
    torch.cuda.synchronize()  # returns: the GPU's wait timed out instead of hanging
    assert int(handoff.error) == 1
