"""Read rate torch reaches on each weight product of a decode step, and on candidate layouts.

    python benchmarks/micro_decode.py --dtype float32
    python benchmarks/micro_decode.py --dtype bfloat16 --rows 8

A decode step is ~86 matrix-vector products (Tiny shapes: attention, dense MLP, shared and routed
experts, routers, LM head). Each is timed alone (median of many calls, weights larger than the last
level cache cycled so every call reads from memory) and reported as GB/s of weight read, next to the
machine's read rate (a large ``sum``), which bounds every read-only step. Candidate layouts:

- ``gate_up``: gate and up projections of an expert as one (2I, D) product instead of two;
- ``batched``: the K chosen experts of a step as one ``bmm`` over stacked (E, 2I, D) weights (the
  chosen slices gathered, as a stacked layout would need), against K separate products;
- ``mkl packed``: MKL's pre-packed fp32 weight (``torch.ops.mkl._mkl_linear``, what inductor uses
  with freezing);
- ``compiled``: ``torch.compile`` of one expert MLP (``--compile``; compiling takes minutes on 2 cores);
- ``W @ x.T``: with several rows, the product computed as (out, in) @ (in, rows), another GEMM layout;
- ``model``: each product as a decode step of the model runs it: in fp32 one batched matmul over ``threads``
  blocks of output rows (MKL runs a one-row fp32 product on one thread), in bf16 for one row torch's own
  matrix-vector kernel with oneDNN off (``decode_kernels``; oneDNN's one-row bf16 product is the slower one).

This shows the ceiling a decode step meets with torch's kernels on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from deepseek_vl.models.language import decode_kernels, linear

# (name, out, in, count per Tiny decode step with 4 layers: 1 dense + 3 MoE)
TINY_PRODUCTS = [
    ("attention q/k/v/o", 1280, 1280, 16),
    ("dense gate/up", 6848, 1280, 2),
    ("dense down", 1280, 6848, 1),
    ("shared gate/up", 1792, 1280, 6),
    ("shared down", 1280, 1792, 3),
    ("expert gate/up", 896, 1280, 36),
    ("expert down", 1280, 896, 18),
    ("router", 64, 1280, 3),
    ("LM head", 129280, 1280, 1),
]
CACHE_BYTES = 64 * 2**20  # cycle through more weight copies than this so each call reads from memory


def median_seconds(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_rate(megabytes: int = 1024) -> float:
    src = torch.ones(megabytes * 2**18)
    return src.numel() * 4 / min(median_seconds(src.sum, 3) for _ in range(3))


def weight_copies(out: int, inp: int, dtype: torch.dtype) -> list[torch.Tensor]:
    nbytes = out * inp * torch.finfo(dtype).bits // 8
    copies = max(1, -(-CACHE_BYTES // nbytes))
    return [torch.randn(out, inp).to(dtype) for _ in range(copies)]


def cycled(weights: list, fn):
    state = {"i": 0}

    def call():
        w = weights[state["i"] % len(weights)]
        state["i"] += 1
        return fn(w)

    return call


def rate(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rows", type=int, default=1, help="tokens per product (decode batch)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of one expert MLP")
    args = parser.parse_args()
    dtype, rows = getattr(torch, args.dtype), args.rows
    size = torch.finfo(dtype).bits // 8
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.dtype}, {rows} row(s)", flush=True)  # fmt: skip
    bound = read_rate() / 1e9
    print(f"read rate (1 GiB sum): {bound:.1f} GB/s", flush=True)

    step_seconds = step_bytes = 0.0
    split_seconds = 0.0
    print(f"\n{'product':<20}{'shape':>14}{'MB':>8}{'us':>9}{'GB/s':>7}{'of read':>9}{'per step':>10}"
          f"{'model GB/s':>12}{'of read':>9}{'W @ x.T us' if rows > 1 else '':>12}")  # fmt: skip
    for name, out, inp, count in TINY_PRODUCTS:
        weights = weight_copies(out, inp, dtype)
        x = torch.randn(rows, inp).to(dtype)
        calls = max(5, min(args.calls, int(2e9 / (out * inp * size))))
        seconds = median_seconds(cycled(weights, lambda w: F.linear(x, w)), calls)
        nbytes = out * inp * size
        step_seconds, step_bytes = step_seconds + count * seconds, step_bytes + count * nbytes
        with decode_kernels(x[:, None], dtype):  # (rows, 1, in): a decode step
            split = median_seconds(cycled(weights, lambda w, x=x[:, None]: linear(x, w)), calls)
        split_seconds += count * split
        transposed = median_seconds(cycled(weights, lambda w: torch.mm(w, x.T)), calls) if rows > 1 else 0
        print(f"{name:<20}{f'{out}x{inp}':>14}{nbytes / 1e6:>8.1f}{seconds * 1e6:>9.0f}{rate(nbytes, seconds):>7.1f}"
              f"{rate(nbytes, seconds) / bound:>9.0%}{count:>10}{rate(nbytes, split):>12.1f}"
              f"{rate(nbytes, split) / bound:>9.0%}{f'{transposed * 1e6:.0f}' if rows > 1 else '':>12}",
              flush=True)  # fmt: skip
    print(f"\nsum of the step's products: {step_seconds * 1e3:.1f} ms for {step_bytes / 1e6:.0f} MB = "
          f"{rate(step_bytes, step_seconds):.1f} GB/s ({rate(step_bytes, step_seconds) / bound:.0%} of the read rate); "
          f"products alone allow {rows / step_seconds:.1f} tok/s, the read rate {rows * bound * 1e9 / step_bytes:.1f}")  # fmt: skip
    print(f"as the model's decode step runs them: {split_seconds * 1e3:.1f} ms = "
          f"{rate(step_bytes, split_seconds):.1f} GB/s ({rate(step_bytes, split_seconds) / bound:.0%} of the read rate); "
          f"products alone allow {rows / split_seconds:.1f} tok/s")  # fmt: skip

    print("\ncandidate layouts (routed experts, 896x1280 gate/up, 6 chosen of 64)", flush=True)
    experts = 64
    gate = torch.randn(experts, 896, 1280).to(dtype)
    up = torch.randn(experts, 896, 1280).to(dtype)
    down = torch.randn(experts, 1280, 896).to(dtype)
    gate_up = torch.cat([gate, up], dim=1)  # (E, 2I, D)
    x = torch.randn(rows, 1280).to(dtype)
    picks = [torch.randperm(experts)[:6].tolist() for _ in range(64)]
    expert_bytes = 3 * 896 * 1280 * size * 6

    def separate(chosen, fused: bool):
        for e in chosen:
            if fused:
                g, u = F.linear(x, gate_up[e]).chunk(2, dim=-1)
            else:
                g, u = F.linear(x, gate[e]), F.linear(x, up[e])
            F.linear(F.silu(g) * u, down[e])

    def batched(chosen):
        index = torch.tensor(chosen)
        h = torch.bmm(x.expand(len(chosen), -1, -1), gate_up[index].mT)
        g, u = h.chunk(2, dim=-1)
        torch.bmm(F.silu(g) * u, down[index].mT)

    candidates = {
        "separate gate, up, down": cycled(picks, lambda c: separate(c, fused=False)),
        "fused gate_up + down": cycled(picks, lambda c: separate(c, fused=True)),
        "stacked, gathered bmm": cycled(picks, batched),
    }
    if dtype == torch.float32 and hasattr(torch.ops.mkl, "_mkl_linear"):
        packed = [[torch.ops.mkl._mkl_reorder_linear_weight(w[e], rows) for e in range(experts)] for w in (gate, up, down)]

        def mkl(chosen):
            for e in chosen:
                g = torch.ops.mkl._mkl_linear(x, packed[0][e], gate[e], None, rows)
                u = torch.ops.mkl._mkl_linear(x, packed[1][e], up[e], None, rows)
                torch.ops.mkl._mkl_linear(F.silu(g) * u, packed[2][e], down[e], None, rows)

        candidates["mkl packed fp32"] = cycled(picks, mkl)
    if args.compile:
        compiled = torch.compile(lambda xx, g, u, d: F.linear(F.silu(F.linear(xx, g)) * F.linear(xx, u), d))
        candidates["torch.compile expert"] = cycled(picks, lambda c: [compiled(x, gate[e], up[e], down[e]) for e in c])
    with torch.no_grad():
        for name, fn in candidates.items():
            seconds = median_seconds(fn, 60)
            print(f"  {name:<26}{seconds * 1e6:>8.0f} us  {rate(expert_bytes, seconds):>5.1f} GB/s "
                  f"({rate(expert_bytes, seconds) / bound:.0%} of read)", flush=True)  # fmt: skip


if __name__ == "__main__":
    with torch.no_grad():
        main()
