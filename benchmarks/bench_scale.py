"""Scale-out cost and gain: the same requests answered in one process and on a local Ray cluster (1 and N actors).

    python benchmarks/bench_scale.py --model ../shared/golden/checkpoints/vl2-tiny-random --requests 32 --actors 2

Wall times include what a user waits for: model loading, and for Ray the cluster start and one model per actor.
Prints requests per second and each Ray run's ratio to the local run; the answers are checked equal.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

GOLDEN = Path(os.environ.get("DEEPSEEK_VL_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(GOLDEN / "checkpoints" / "vl2-tiny-random"))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    import torch

    from deepseek_vl.distributed import VLPredictor, run_ray_batch

    image = str(GOLDEN / "images" / "gray_300x200.png")
    prompts = [f"Question {n}: what is in the image?" for n in range(1, args.requests + 1)]
    rows = [(n, {"prompt": prompt, "images": [image]}) for n, prompt in enumerate(prompts, 1)]
    kwargs = {"model": args.model, "device": "cpu", "max_new_tokens": args.max_new_tokens}

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    local = VLPredictor(**kwargs)
    expected = []
    for start in range(0, len(rows), args.batch_size):
        expected += local.answer_rows([row for _, row in rows[start : start + args.batch_size]])
    local_seconds = time.perf_counter() - started
    del local
    print(f"cpu cores: {os.cpu_count()}, requests: {args.requests}, batch size: {args.batch_size}, "
          f"max_new_tokens: {args.max_new_tokens}, model: {Path(args.model).name}")  # fmt: skip
    print(f"{'run':<22}{'seconds':>10}{'requests/s':>12}{'vs local':>10}")
    print(f"{'local (1 process)':<22}{local_seconds:>10.1f}{args.requests / local_seconds:>12.2f}{1:>10.2f}")

    for actors in sorted({1, args.actors}):
        started = time.perf_counter()
        records = list(run_ray_batch(rows, kwargs, concurrency=actors, batch_size=args.batch_size))
        seconds = time.perf_counter() - started
        answers = [{k: v for k, v in r.items() if k not in ("id", "line")} for r in records]
        assert answers == expected, "Ray answers differ from the local ones"
        name = f"ray, {actors} actor{'s' * (actors > 1)}"
        print(f"{name:<22}{seconds:>10.1f}{args.requests / seconds:>12.2f}{local_seconds / seconds:>10.2f}")
        import ray

        ray.shutdown()


if __name__ == "__main__":
    main()
