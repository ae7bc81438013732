"""Fine-tuning cost on the real Tiny layer shapes: trainable parameters, tokens/s and peak memory per method.

    python benchmarks/bench_train.py --layers 2 --vision-layers 3 --record
    python benchmarks/bench_train.py --layers 2 --vision-layers 3 --alternate  # LoRA step time only, interleaved

Compared in one run, on one training sample with one image (450 x 308 pixels: a global view and one tile):
default LoRA (attention, dense MLP, shared experts), all-linear LoRA (plus every routed expert, what ms-swift
trains by default) and full fine-tuning, each with and without gradient checkpointing. Parameter counts are also
given for the whole 12-layer Tiny (built on the meta device, no memory). Activation memory is the step's peak of
bytes in use (malloc's count) above the bytes in use before it (weights, gradients, optimizer state already there).
Weights are random (the shapes decide the cost); the model has fewer layers than Tiny so that it fits here.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench import GOLDEN, REPO, PeakMemory, build_model, machine  # noqa: E402

from deepseek_vl.models import DeepseekVLV2Processor  # noqa: E402
from deepseek_vl.train.collate import Collator  # noqa: E402
from deepseek_vl.train.data import Example  # noqa: E402
from deepseek_vl.train.lora import TrainableParts, apply_lora, count_parameters, prepare_full  # noqa: E402
SHORT = {"default": "LoRA, default targets", "all-linear": "LoRA, all linear (+ routed experts)",
         "full": "full fine-tuning"}  # fmt: skip
SHORT_NAMES = {name: short for short, name in SHORT.items()}


class HeapPeak:
    """Peak bytes malloc has handed out during a block (glibc ``mallinfo2``, sampled every millisecond).

    Resident memory would miss reused memory: after the warm-up step the allocator keeps the freed activation
    pages, so a step's RSS barely grows whatever it allocates. Bytes in use count every live tensor.
    """

    def __init__(self) -> None:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        self._mallinfo, self._stop = libc.mallinfo2, threading.Event()

    def in_use(self) -> int:
        info = self._mallinfo()
        return info.uordblks + info.hblkhd  # small chunks in use + mmapped chunks

    def __enter__(self) -> HeapPeak:
        self.start = self.peak = self.in_use()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.in_use())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.in_use())


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


METHODS = {
    "LoRA, default targets": ("lora", TrainableParts()),
    "LoRA, all linear (+ routed experts)": ("lora", TrainableParts(lora_experts=True)),
    "full fine-tuning": ("full", TrainableParts()),
}


def sample_batch() -> dict[str, torch.Tensor]:
    processor = DeepseekVLV2Processor.from_pretrained(GOLDEN / "checkpoints" / "vl2-tiny-random")
    image = str(GOLDEN / "images" / "multi_image_2.jpeg")  # 450 x 308: one global view + one tile
    messages = [
        {"role": "user", "content": "<image>\nWhat is in this image?", "images": [image]},
        {"role": "assistant", "content": "A small picture with a few objects on a table."},
    ]
    return Collator(processor)([Example(messages, 1, "bench")])


def prepare(model, method: str, parts: TrainableParts, checkpointing: bool):
    model = apply_lora(model, parts) if method == "lora" else prepare_full(model, parts)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def trainer_step(args, method: str, parts: TrainableParts, checkpointing: bool, batch):
    """(model, one optimizer step on the batch); the first call allocates gradients and optimizer state."""
    torch.manual_seed(0)
    model = prepare(build_model("tiny", args.layers, args.vision_layers, torch.float32, "cpu"), method, parts,
                    checkpointing)  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5) if method == "lora" else torch.optim.SGD(trainable, lr=1e-5)

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: they are not activations
        return loss.item()

    return model, step


def measure(args, method: str, parts: TrainableParts, checkpointing: bool, batch) -> dict:
    model, step = trainer_step(args, method, parts, checkpointing, batch)
    step()  # allocates gradients and optimizer state
    gc.collect()
    times, peaks = [], []
    for _ in range(args.steps):
        with HeapPeak() as heap:
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        peaks.append(heap.peak - heap.start)
    tokens = int(batch["attention_mask"].sum())
    result = {
        "trainable": count_parameters(model)[0],
        "step_s": statistics.median(times),
        "tokens_per_s": tokens / statistics.median(times),
        "activation_bytes": max(peaks),
        "resident_bytes": PeakMemory("cpu").rss(),
    }
    del model, step
    gc.collect()
    return result


def alternate(args, batch) -> dict:
    """Default vs all-linear LoRA step time, both models alive, steps interleaved so both see the same host load."""
    medians = {}
    for checkpointing in (True, False):
        steps = {}
        for short in ("default", "all-linear"):
            _, steps[short] = trainer_step(args, *METHODS[SHORT[short]], checkpointing, batch)
            steps[short]()  # warm-up: gradients and optimizer state
        times = {short: [] for short in steps}
        for _ in range(args.rounds):
            for short, step in steps.items():
                start = time.perf_counter()
                step()
                times[short].append(time.perf_counter() - start)
        state = "on" if checkpointing else "off"
        medians[state] = {short: statistics.median(values) for short, values in times.items()} | {"times": times}
        print(f"checkpointing {state}", json.dumps(medians[state]), flush=True)
        del steps
        gc.collect()
    return medians


def format_alternated(args, medians: dict, tokens: int) -> str:
    lines = [
        f"### Default vs all-linear LoRA step time, alternated, Tiny shapes, {args.layers} of 12 language layers, "
        f"{args.vision_layers} of 27 vision blocks, float32, CPU ({datetime.date.today()}, torch {torch.__version__})",
        "",
        f"One training sample with one image ({tokens} tokens), batch 1, LoRA rank 16, AdamW; both models built once, "
        f"steps interleaved (default, all-linear, default, ...), medians of {args.rounds} steps each after a warm-up.",
        "",
        "| checkpointing | default LoRA step | all-linear LoRA step | all-linear / default |",
        "|---|---|---|---|",
    ]
    for state, row in medians.items():
        lines.append(f"| {state} | {row['default']:.2f} s | {row['all-linear']:.2f} s "
                     f"| {row['all-linear'] / row['default']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def full_tiny_counts() -> dict[str, int]:
    """Trainable parameters of each method on the whole Tiny (12 layers, 27 vision blocks), built on meta."""
    counts = {}
    for name, (method, parts) in METHODS.items():
        model = build_model("tiny", 12, 27, torch.float32, "meta")
        model = apply_lora(model, parts) if method == "lora" else prepare_full(model, parts)
        counts[name] = count_parameters(model)[0]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="language layers (1 dense + MoE), of Tiny's 12")
    parser.add_argument("--vision-layers", type=int, default=3, help="SigLIP blocks, of 27")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=list(SHORT), default=list(SHORT), help="which to measure")
    parser.add_argument("--alternate", action="store_true",
                        help="only the default vs all-linear LoRA step time, steps interleaved (--rounds each)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    batch = sample_batch()
    if args.alternate:
        medians = alternate(args, batch)
        table = format_alternated(args, medians, int(batch["attention_mask"].sum()))
        print(table)
        out = REPO / "benchmarks" / "results" / f"cpu-train-tiny-{args.layers}layers-alternated.json"
        out.write_text(json.dumps({"args": vars(args), "medians": medians, "machine": machine()}, indent=1))
        if args.record:
            with open(REPO / "benchmarks" / "RESULTS.md", "a") as results:
                results.write("\n" + table + "\n")
        return
    rows = {}
    for name, (method, parts) in METHODS.items():
        if SHORT_NAMES[name] not in args.methods:
            continue
        for checkpointing in (True, False):
            key = f"{name}, checkpointing {'on' if checkpointing else 'off'}"
            rows[key] = measure(args, method, parts, checkpointing, batch)
            print(key, json.dumps(rows[key]), flush=True)
    counts = full_tiny_counts()
    table = format_table(args, rows, counts, int(batch["attention_mask"].sum()))
    print(table)
    out = REPO / "benchmarks" / "results" / f"cpu-train-tiny-{args.layers}layers-{'-'.join(args.methods)}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "tiny_counts": counts, "machine": machine()}, indent=1))
    if args.record:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as results:
            results.write("\n" + table + "\n")


def format_table(args, rows: dict, counts: dict, tokens: int) -> str:
    mib = 2**20
    lines = [
        f"### Fine-tuning, Tiny shapes, {args.layers} of 12 language layers, {args.vision_layers} of 27 vision blocks, "
        f"float32, CPU ({datetime.date.today()}, torch {torch.__version__})",
        "",
        f"One training sample with one image ({tokens} tokens), batch 1; medians of {args.steps} steps after a "
        "warm-up step. LoRA rank 16 with AdamW; full fine-tuning with SGD (no optimizer state, to fit this machine).",
        "",
        "| method | trainable params (these layers) | trainable params (whole Tiny) | checkpointing | step | tokens/s "
        "| activation peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, row in rows.items():
        name, _, gc_state = key.rpartition(", checkpointing ")
        lines.append(
            f"| {name} | {row['trainable']:,} | {counts[name]:,} | {gc_state} | {row['step_s']:.2f} s "
            f"| {row['tokens_per_s']:.0f} | {row['activation_bytes'] / mib:,.0f} MiB |"
        )
    default, all_linear = SHORT["default"], SHORT["all-linear"]
    on, off = rows[f"{default}, checkpointing on"], rows[f"{default}, checkpointing off"]
    lines += ["", f"- gradient checkpointing cuts the default LoRA step's activation peak "
              f"{off['activation_bytes'] / on['activation_bytes']:.1f}x; target >= 3x"]  # fmt: skip
    if f"{all_linear}, checkpointing on" in rows:
        for state in ("on", "off"):
            other = rows[f"{all_linear}, checkpointing {state}"]
            speed = other["step_s"] / rows[f"{default}, checkpointing {state}"]["step_s"]
            lines.append(f"- default LoRA steps {speed:.1f}x faster than all-linear LoRA (checkpointing {state}); "
                         f"target >= 2x; {other['trainable'] / on['trainable']:.1f}x fewer parameters here")  # fmt: skip
        lines.append(f"- default LoRA trains {counts[all_linear] / counts[default]:.1f}x fewer parameters than "
                     "all-linear LoRA on the whole Tiny; target >= 5x")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
