"""The int8 products torch offers on CPU for one decode row, against the bf16 product the decode step runs.

    python benchmarks/micro_int8.py

Issue #9 asks int8 decode for 1.6x the bf16 speed at batch 1. Each candidate computes one Tiny routed-expert
product (896 x 1280) for one row, its weights cycled through 96 copies (over 100 MB) so that every call reads from
memory; the best of 3 rounds is printed in microseconds and as a speed ratio to bf16:

- ``bf16``: `F.linear` with oneDNN off, torch's matrix-vector kernel (what `decode_kernels` runs);
- ``int8 weight-only``: `torch._weight_int8pack_mm` (what `quantize="int8"` runs), bf16 and fp32 activations;
- ``inductor``: `torch.compile` of the dequantising reduction (int8 weights, fp32 sums);
- ``int8 x int8`` (`torch._int_mm`): activations quantized too (W8A8), so not the weight-only mode the issue asks
  for; an upper bound of what an integer kernel reaches here.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

OUT, IN, COPIES, ROUNDS = 896, 1280, 96, 3


def best_microseconds(product) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for i in range(COPIES * 3):
            product(i % COPIES)
        best = min(best, (time.perf_counter() - start) / (COPIES * 3))
    return best * 1e6


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    bf16 = [torch.randn(OUT, IN).to(torch.bfloat16) for _ in range(COPIES)]
    int8 = [torch.randint(-127, 128, (OUT, IN), dtype=torch.int8) for _ in range(COPIES)]
    int8_t = [weight.t() for weight in int8]
    scale = torch.rand(OUT, dtype=torch.bfloat16)
    x = torch.randn(1, IN, dtype=torch.bfloat16)
    x32, scale32 = x.float(), scale.float()
    x8 = torch.randint(-127, 128, (1, IN), dtype=torch.int8)

    def dequantising_sum(row, weight, weight_scale):
        return (weight.to(torch.float32) * row).sum(-1) * weight_scale

    compiled = torch.compile(dequantising_sum, dynamic=False)
    with torch.no_grad():
        compiled(x32, int8[0], scale32)  # compile once, outside the timing
        torch.backends.mkldnn.enabled = False
        reference = best_microseconds(lambda i: F.linear(x, bf16[i]))
        torch.backends.mkldnn.enabled = True
        rows = {
            "int8 weight-only, bf16 row (_weight_int8pack_mm)": lambda i: torch._weight_int8pack_mm(x, int8[i], scale),
            "int8 weight-only, fp32 row (_weight_int8pack_mm)": lambda i: torch._weight_int8pack_mm(
                x32, int8[i], scale32
            ),
            "int8 weight-only, inductor reduction": lambda i: compiled(x32, int8[i], scale32),
            "int8 x int8 (_int_mm, W8A8)": lambda i: torch._int_mm(x8, int8_t[i]),
        }
        print(f"{'bf16 (F.linear, oneDNN off)':52s} {reference:7.1f} us  1.00x")
        for name, product in rows.items():
            time_us = best_microseconds(product)
            print(f"{name:52s} {time_us:7.1f} us  {reference / time_us:.2f}x", flush=True)


if __name__ == "__main__":
    main()
