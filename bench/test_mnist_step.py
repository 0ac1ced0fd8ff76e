"""One MNIST training step (forward, cross-entropy, backward, Adam step) of the reference MLP, per model.

Model: Linear(784, H) -> [BN(H)] -> ReLU -> Linear(H, H) -> [BN(H)] -> ReLU -> Linear(H, 10) (examples/
mnist_compare.py), at (batch, hidden) = (32, 32) (the reference), batch 256 and 1024, and hidden 1024, so that
both regimes show: launch-bound (tiny tensors: the cost is host overhead x kernel count) and bandwidth-bound.

Models: "no-BN", "torch-BN" (nn.BatchNorm1d + nn.ReLU) and "bnfast" (`bnfast.convert` of the torch-BN model:
BN + ReLU fused into one kernel per pass); and "no-BN+graph" / "torch-BN+graph" / "bnfast+graph": the same step
captured once in a CUDA graph (static input buffers, Adam(capturable=True)) and replayed, so the host launches one
graph per step instead of every kernel. Data: random batches already on the device (what the example does with MNIST),
rotated over 8 batches; the graph steps copy each batch into their static buffers, inside the timed step.

Timing (bench/harness.py run_case, "synced"): wall clock per step with the host pipelining steps as a training
loop does. Each round runs `k` steps back to back; the benchmark's timer (`harness.synced_clock`) synchronizes the
device before reading the clock, so a round is k complete steps (pytest-benchmark's `iterations=k`: its stats are
per step). The profiler pass that counts launches runs after the timing, so CUPTI never runs during it.
Configurations and models: bench/cases.py (MNIST_CONFIGS; the headline set takes MNIST_HEADLINE_CONFIGS).
extra_info: gpu_ops_per_step (kernels + memsets + memcpys the GPU ran in one step, from torch.profiler),
host_launches_per_step (launch API calls the host made: kernels, memset/memcpy, graph launches), and
speedup_vs_torch-BN / speedup_vs_no-BN / speedup_vs_no-BN+graph (this session's medians).
"""

import torch
import torch.nn.functional as F
from torch import nn

from bench import harness

BATCHES = 8
pytestmark = harness.timed_by("synced")
HOST_LAUNCH_PREFIXES = ("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cudaMemcpy", "cudaMemset", "cuMemcpy", "cuMemset")


def build_mlp(hidden: int, model: str, device) -> nn.Sequential:
    import bnfast

    torch.manual_seed(0)
    bn = not model.startswith("no-BN")
    layers, width = [], 28 * 28
    for _ in range(2):
        layers += [nn.Linear(width, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.ReLU()]
        width = hidden
    mlp = nn.Sequential(*layers, nn.Linear(hidden, 10))
    if model.startswith("bnfast"):
        mlp = bnfast.convert(mlp)
    return mlp.to(device).train()


def make_step(model: str, hidden: int, device, batches):
    """step(x, y) for one training step of `model` (graph variants: captured here, replayed by step)."""
    mlp = build_mlp(hidden, model, device)
    graph = model.endswith("+graph") and device.type == "cuda"
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-3, capturable=graph)

    def eager_step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(mlp(x), y)
        loss.backward()
        opt.step()
        return loss

    if not graph:  # on CPU (the smoke run) the +graph models run uncaptured: the same step, nothing to capture
        return eager_step, mlp
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: Triton JIT, Adam state, cuBLAS workspaces
        for _ in range(3):
            eager_step(static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # grads are allocated inside the graph's pool and overwritten each replay
    with torch.cuda.graph(g):
        static_loss = F.cross_entropy(mlp(static_x), static_y)
        static_loss.backward()
        opt.step()

    def graph_step(x, y):
        static_x.copy_(x)
        static_y.copy_(y)
        g.replay()
        return static_loss

    return graph_step, mlp


def count_launches(step, batches) -> dict:
    """GPU ops run and host launch calls made during one step, from torch.profiler (CUPTI)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(*batches[0])
        torch.cuda.synchronize()
    events = prof.events()
    gpu_ops = sum(1 for e in events if e.device_type == DeviceType.CUDA)
    host = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith(HOST_LAUNCH_PREFIXES))
    return {"gpu_ops_per_step": gpu_ops, "host_launches_per_step": host}


def test_mnist_step(benchmark, batch, hidden, model, device):
    info = benchmark.extra_info
    info.update(batch=batch, hidden=hidden, model=model)
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [
        (
            torch.rand(batch, 28 * 28, generator=gen, device=device),
            torch.randint(0, 10, (batch,), generator=gen, device=device),
        )
        for _ in range(BATCHES)
    ]
    step, mlp = make_step(model, hidden, device, batches)
    before = [p.detach().clone() for p in mlp.parameters()]

    def check(loss):  # the first step: a finite loss, and Adam moved the parameters
        assert torch.isfinite(loss).item(), f"loss {loss.item()}"
        assert any(not torch.equal(a, p) for a, p in zip(before, mlp.parameters(), strict=True)), "Adam did not update"
        return {"first_loss": round(loss.item(), 4)}

    median = harness.run_case(
        benchmark,
        step,
        batches,
        group=f"mnist step batch={batch} hidden={hidden}",
        provider=model,
        timing="synced",
        check=check,
        baselines=("torch-BN", "no-BN", "no-BN+graph"),
    )
    if median is not None:
        info.update(count_launches(step, batches))  # after the timing: the profiler never overlaps it
