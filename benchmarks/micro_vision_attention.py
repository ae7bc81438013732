"""One SigLIP layer's attention against its qkv product, at the real vision shapes, on 2 threads.

    python benchmarks/micro_vision_attention.py

Issue #14 asks `prepare_inputs_embeds` for 1.2x the official code, which runs the same kernels. The one part not at
the GEMM peak could be the attention: this prints the fused SDPA kernel the tower runs, the same attention spelled
out as two batched products and a softmax, and the layer's qkv product, each in GFLOP/s (best of 7, alternated), for
a pass of 2 tiles (16 heads x 729 tokens x head 72; width 1152), in float32 and bfloat16.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

TILES, HEADS, TOKENS, HEAD_DIM, WIDTH, ROUNDS = 2, 16, 729, 72, 1152, 7


def main() -> None:
    torch.set_num_threads(2)
    attention_flop = 4 * TILES * HEADS * TOKENS * TOKENS * HEAD_DIM
    qkv_flop = 2 * TILES * TOKENS * WIDTH * 3 * WIDTH
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (torch.randn(TILES, HEADS, TOKENS, HEAD_DIM, dtype=dtype) for _ in range(3))
        x, weight = torch.randn(TILES * TOKENS, WIDTH, dtype=dtype), torch.randn(3 * WIDTH, WIDTH, dtype=dtype)
        runs = {
            "sdpa": (lambda: F.scaled_dot_product_attention(q, k, v), attention_flop),
            "explicit": (lambda: torch.softmax(q @ k.mT * HEAD_DIM**-0.5, -1) @ v, attention_flop),
            "qkv GEMM": (lambda: F.linear(x, weight), qkv_flop),
        }
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(ROUNDS):
            for name, (run, _) in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        rates = {name: runs[name][1] / best[name] / 1e9 for name in runs}
        for name, rate in rates.items():
            print(f"{str(dtype).removeprefix('torch.'):9} {name:9} {best[name] * 1e3:7.1f} ms {rate:6.0f} GFLOP/s "
                  f"({rate / rates['qkv GEMM']:.2f}x the GEMM's rate)")  # fmt: skip


if __name__ == "__main__":
    main()
