"""This package side by side with the official DeepSeek-VL2 code, on the real Tiny and Small layer shapes.

Both implementations load the same random-weight checkpoint, saved in the official format (bf16, the official
nested config.json, tokenizer and processor files): Tiny shapes with 4 of 12 language and 4 of 27 vision
layers, Small shapes with 3 of 27 language layers. Every figure is measured in fresh processes, ours in this
interpreter's environment, the official code in its own, alternating which goes first, 2 threads, and
reported as the median of ``--rounds`` with the ratio (a ratio above 1 means this package is better).
Greedy fp32 tokens must be identical (asserted).

Setting up the official side (once, outside this repository; the official code runs unmodified):

    python3 -m venv /work/official/.venv
    /work/official/.venv/bin/pip install torch==2.14.1 transformers==4.38.2 timm accelerate
    /work/official/.venv/bin/pip install sentencepiece attrdict einops "pillow>=13"
    # copy the official repository's deepseek_vl2/ package to /work/official/ and put /work/official on the
    # venv's path (a .pth file in its site-packages). The SigLIP tower imports xformers, which has no CPU
    # build: a folder on the path with xformers/__init__.py (empty) and xformers/ops.py holding
    #     def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):  # (B, N, H, D)
    #         q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    #         return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=scale).transpose(1, 2)
    # is the same math (/work/official/shim/ here). Check: the official code then gives the greedy tokens of
    # the vl2-tiny-random grounding golden.

Run (each part fits a few minutes on 2 cores; take the heavy-job lock around each):

    flock /tmp/heavy.lock python benchmarks/bench_official.py --only load   # ~2.5 min: from_pretrained, peaks
    flock /tmp/heavy.lock python benchmarks/bench_official.py --only image  # ~3 min: tokens, first token, decode
    flock /tmp/heavy.lock python benchmarks/bench_official.py --only bf16   # ~2 min: the image prompt in bf16
    flock /tmp/heavy.lock python benchmarks/bench_official.py --only batch  # ~5 min: text prompt, batch 1 and 8
    flock /tmp/heavy.lock python benchmarks/bench_official.py --only small  # ~6 min: Small, 100 / 4,000 context
    python benchmarks/bench_official.py --table --record     # the table of every part measured so far

Results accumulate in benchmarks/results/official-side-by-side.json (one entry per part, each with its
date, CPU flags, torch versions and load average); ``--record`` appends the table to benchmarks/RESULTS.md
under "Side by side with the official code". The first run builds the checkpoints (about a minute) into
``--checkpoints``. Peak memory is the process's resident set, sampled every millisecond; for loading it spans
from_pretrained and a first read of every weight (weights still mapped from the file count only once read),
and is also given against the loaded model's bytes (parameters and buffers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("DEEPSEEK_VL_GOLDEN", REPO.parent / "shared" / "golden"))
RESULTS = REPO / "benchmarks" / "results" / "official-side-by-side.json"
SECTION = "## Side by side with the official code"
PROMPT = "<image>\n<|ref|>The giraffe at the back.<|/ref|>."  # the model card's grounding example
IMAGE = "visual_grounding_1.jpeg"
# Checkpoints measured: preset of bench.py, language and vision layers.
SHAPES = {"tiny": ("tiny", 4, 4), "small": ("small", 3, 4)}
PARTS = ("load", "image", "bf16", "batch", "small")
START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Worker side: runs in either environment, so it imports only torch, PIL and the implementation it measures.


class PeakMemory:
    """Peak resident set (and its anonymous, non-file part) of this process during a block, sampled every ms."""

    def __enter__(self) -> PeakMemory:
        self.peak, self.peak_anon, self._stop = 0, 0, threading.Event()
        self._sample_once()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample_once(self) -> None:
        resident, anon = resident_bytes()
        self.peak, self.peak_anon = max(self.peak, resident), max(self.peak_anon, anon)

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._sample_once()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample_once()


def resident_bytes() -> tuple[int, int]:
    """(resident, resident minus file-backed and shared pages) from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page


class StepClock:
    """A logits processor that only notes when each generated token's logits are ready (both transformers call it)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def implementation(name: str):
    if name == "ours":
        from deepseek_vl.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor

        return DeepseekVLV2ForCausalLM, DeepseekVLV2Processor, "dtype"
    from deepseek_vl2.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor

    return DeepseekVLV2ForCausalLM, DeepseekVLV2Processor, "torch_dtype"


def load(name: str, checkpoint: Path, dtype):
    """from_pretrained as each implementation's README does it; its time and the resident-set peak."""
    import torch

    model_class, _, dtype_argument = implementation(name)
    before, before_anon = resident_bytes()
    with PeakMemory() as peak:
        start = time.perf_counter()
        model = model_class.from_pretrained(checkpoint, **{dtype_argument: dtype}).eval()
        seconds = time.perf_counter() - start
        touch(model)  # weights left mapped from the file count once they are read, as the first forward would
    after, after_anon = resident_bytes()
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.dtype == dtype for t in model.parameters()), "parameters not in the requested dtype"
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    stats = dict(seconds=seconds, peak=peak.peak, peak_anon=peak.peak_anon, before=before, before_anon=before_anon,
                 after=after, after_anon=after_anon, model_bytes=model_bytes,
                 peak_over_model=(peak.peak - before) / model_bytes, peak_over_resident=peak.peak / after)  # fmt: skip
    torch.set_grad_enabled(False)
    return model, stats


def touch(model) -> None:
    """Read one value of every memory page of every parameter."""
    for p in model.parameters():
        p.detach().reshape(-1)[:: max(4096 // p.element_size(), 1)].float().sum()


def generate(model, new_tokens: int, **inputs) -> dict:
    """Greedy generation of exactly ``new_tokens``: the tokens, the time to the first one, decode tokens/s, peak."""
    clock = StepClock()
    with PeakMemory() as peak:
        start = time.perf_counter()
        out = model.language.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      use_cache=True, pad_token_id=1, bos_token_id=0, eos_token_id=1,
                                      logits_processor=[clock])  # fmt: skip
    rows = out.shape[0]
    steps = len(clock.stamps) - 1
    return dict(tokens=out[:, -new_tokens:].tolist(), first_token_s=clock.stamps[0] - start,
                decode_tokens_per_s=rows * steps / (clock.stamps[-1] - clock.stamps[0]), peak=peak.peak)  # fmt: skip


def text_prompt(rows: int, length: int, distinct: bool) -> list[list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 100000) for _ in range(length)] for _ in range(rows if distinct else 1)]
    return prompts if distinct else prompts * rows


def text_generate(model, rows: int, length: int, new_tokens: int, distinct: bool = True) -> dict:
    import torch

    ids = torch.tensor(text_prompt(rows, length, distinct))
    result = generate(model, new_tokens, input_ids=ids, attention_mask=torch.ones_like(ids))
    return result | {"rows": rows, "context": length, "distinct": distinct}


def image_prompt(name: str, checkpoint: Path):
    from PIL import Image

    _, processor_class, _ = implementation(name)
    processor = processor_class.from_pretrained(checkpoint)
    conversation = [{"role": "<|User|>", "content": PROMPT, "images": [str(GOLDEN / "images" / IMAGE)]},
                    {"role": "<|Assistant|>", "content": ""}]  # fmt: skip
    images = [Image.open(GOLDEN / "images" / IMAGE).convert("RGB")]
    start = time.perf_counter()
    inputs = processor(conversations=conversation, images=images, force_batchify=True, system_prompt="")
    return inputs, time.perf_counter() - start


def image_generate(model, name: str, checkpoint: Path, new_tokens: int) -> dict:
    """The grounding prompt: processor, prepare_inputs_embeds, then generation from the embeddings."""
    inputs, preprocess_s = image_prompt(name, checkpoint)
    inputs = inputs.to("cpu", next(model.parameters()).dtype)  # the images in the model's dtype (both READMEs)
    start = time.perf_counter()
    embeds = model.prepare_inputs_embeds(**inputs)
    vision_s = time.perf_counter() - start
    result = generate(model, new_tokens, inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    again = []  # a server encodes image after image: the same call, warm
    for _ in range(3):
        start = time.perf_counter()
        model.prepare_inputs_embeds(**inputs)
        again.append(time.perf_counter() - start)
    crops = inputs["images_spatial_crop"]
    tiles = int((crops.prod(-1) + 1)[crops[..., 0] > 0].sum())  # one global view and the local tiles per image
    return result | dict(preprocess_s=preprocess_s, vision_s=vision_s, vision_again_s=statistics.median(again),
                         prompt_tokens=inputs["input_ids"].shape[1],
                         tiles=tiles, time_to_first_token_s=preprocess_s + vision_s + result["first_token_s"],
                         prefill_tokens_per_s=embeds.shape[1] / result["first_token_s"],
                         embeds_dtype=str(embeds.dtype).removeprefix("torch."))  # fmt: skip


def warm_up(model) -> None:
    """One short text generation, so that one-time kernel setup is not timed (same for both)."""
    text_generate(model, rows=1, length=16, new_tokens=2)


def worker(name: str, part: str, checkpoints: Path, new_tokens: int, out: Path) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tiny, small = checkpoints / "tiny", checkpoints / "small"
    import transformers

    result: dict = {"implementation": name, "torch": torch.__version__, "transformers": transformers.__version__}
    if part in ("load-float32", "load-bfloat16"):
        _, result["load"] = load(name, tiny, getattr(torch, part.split("-")[1]))
    elif part in ("image", "bf16"):
        model, result["load"] = load(name, tiny, torch.float32 if part == "image" else torch.bfloat16)
        warm_up(model)
        log(f"{name}: image prompt")
        result["image"] = image_generate(model, name, tiny, new_tokens)
    elif part == "batch":
        model, result["load"] = load(name, tiny, torch.float32)
        warm_up(model)
        for key, rows, distinct in (("batch1", 1, True), ("batch8", 8, True), ("batch8_copies", 8, False)):
            log(f"{name}: {key}")
            result[key] = text_generate(model, rows, 256, new_tokens, distinct)
    elif part == "small":
        model, result["load"] = load(name, small, torch.float32)
        warm_up(model)
        for length in (100, 4000):
            log(f"{name}: Small, {length} tokens of context")
            result[f"context{length}"] = text_generate(model, 1, length, new_tokens)
    else:
        raise ValueError(f"unknown part {part!r}")
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------
# Launcher side: this package's environment; builds the checkpoints, runs the workers, keeps and prints results.


def build_checkpoint(variant: str, folder: Path) -> None:
    """A random bf16 checkpoint in the official format with the real layer shapes of ``variant`` (bench.py's)."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench import COMMON, PRESETS, SIGLIP_SO400M

    preset, layers, vision_layers = SHAPES[variant]
    template = GOLDEN / "checkpoints" / f"vl2-{preset}-random"
    config = json.loads((template / "config.json").read_text())
    config["language_config"] |= {**COMMON, **PRESETS[preset], "num_hidden_layers": layers}
    config["vision_config"] |= {**SIGLIP_SO400M, "layers": vision_layers}
    config["projector_config"] |= dict(input_dim=SIGLIP_SO400M["width"], n_embed=PRESETS[preset]["hidden_size"])
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    for name in ("processor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(template / name, partial / name)
    (partial / "config.json").write_text(json.dumps(config, indent=2))

    from deepseek_vl.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM

    torch.manual_seed(0)
    model = DeepseekVLV2ForCausalLM._from_config(DeepseekVLV2Config.from_pretrained(partial), dtype=torch.bfloat16)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
    partial.rename(folder)


def ensure_checkpoints(folder: Path) -> None:
    for variant in SHAPES:
        if not (folder / variant / "model.safetensors").is_file():
            log(f"building the {variant} checkpoint in {folder / variant}")
            subprocess.run([sys.executable, __file__, "--build", variant, "--checkpoints", str(folder)], check=True)


def run_worker(python: str, name: str, part: str, args) -> dict:
    for variant in SHAPES:  # the same warm page cache for both sides
        with open(args.checkpoints / variant / "model.safetensors", "rb") as f:
            while f.read(1 << 26):
                pass
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), BENCH_THREADS=str(args.threads),
                   TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")  # fmt: skip
        command = [python, __file__, "--worker", name, "--part", part, "--checkpoints", str(args.checkpoints),
                   "--new-tokens", str(args.new_tokens), "--out", out.name]  # fmt: skip
        done = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              check=False)  # fmt: skip
        if done.returncode:
            raise SystemExit(f"{name} {part} failed:\n{done.stdout[-4000:]}")
        return json.loads(Path(out.name).read_text())


def measure(part: str, args) -> dict:
    """``rounds`` alternating runs of both sides; the per-round results of each side."""
    pythons = {"ours": sys.executable, "official": args.official_python}
    sub_parts = ("load-float32", "load-bfloat16") if part == "load" else (part,)
    runs: dict = {name: {p: [] for p in sub_parts} for name in pythons}
    for round_ in range(args.rounds):
        order = list(pythons) if round_ % 2 == 0 else list(pythons)[::-1]
        for sub_part in sub_parts:
            for name in order:
                result = run_worker(pythons[name], name, sub_part, args)
                runs[name][sub_part].append(result)
                log(f"round {round_ + 1}/{args.rounds} {sub_part} {name}: {summary(result)}")
    return runs


def summary(result: dict) -> str:
    parts = [f"load {result['load']['seconds']:.2f} s"]
    for key, r in result.items():
        if isinstance(r, dict) and "decode_tokens_per_s" in r:
            parts.append(f"{key} first token {r['first_token_s']:.2f} s, decode {r['decode_tokens_per_s']:.2f} tok/s")
    return "; ".join(parts)


def machine() -> dict:
    cpu, flags = platform.machine(), []
    if os.path.exists("/proc/cpuinfo"):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
        present = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        flags = [f for f in ("avx", "fma", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in present]
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu,
                cpu_flags=flags, load_average=[round(x, 2) for x in os.getloadavg()])  # fmt: skip


def check_tokens(part: str, runs: dict) -> None:
    """fp32 greedy tokens: identical across rounds and between the two implementations."""
    if part in ("load", "bf16"):
        return
    for key in runs["ours"][part][0]:
        first = runs["ours"][part][0][key]
        if isinstance(first, dict) and "tokens" in first:
            for name in runs:
                for result in runs[name][part]:
                    if result[key]["tokens"] != first["tokens"]:
                        raise AssertionError(f"{part} {key}: {name}'s greedy tokens differ from ours: "
                                             f"{result[key]['tokens']} != {first['tokens']}")  # fmt: skip


GIB = 2**30
# Per part: (figure, sub-run, result key, field, unit, scale, higher is better). Load figures repeat per dtype.
FIGURES = {
    "load": [
        ("from_pretrained, Tiny {dtype} ({gb:.1f} GB)", "load-{dtype}", "load", "seconds", "s", 1, False),
        ("  peak resident while loading {dtype}", "load-{dtype}", "load", "peak", "GiB", 1 / GIB, False),
        ("  (peak - before) / model bytes, {dtype}", "load-{dtype}", "load", "peak_over_model", "x", 1, False),
        ("  peak / resident after loading, {dtype}", "load-{dtype}", "load", "peak_over_resident", "x", 1, False),
    ],
    "image": [
        ("time to first token, fp32 ({prompt})", "image", "image", "time_to_first_token_s", "s", 1, False),
        ("prepare_inputs_embeds, fp32", "image", "image", "vision_s", "s", 1, False),
        ("  again, warm (median of 3 more calls)", "image", "image", "vision_again_s", "s", 1, False),
        ("prefill, fp32 (first token after the embeddings)", "image", "image", "first_token_s", "s", 1, False),
        ("decode batch 1, fp32, after the image prompt", "image", "image", "decode_tokens_per_s", "tok/s", 1, True),
        ("peak resident while generating, fp32", "image", "image", "peak", "GiB", 1 / GIB, False),
    ],
    "bf16": [
        ("prepare_inputs_embeds, bf16", "bf16", "image", "vision_s", "s", 1, False),
        ("  again, warm (median of 3 more calls)", "bf16", "image", "vision_again_s", "s", 1, False),
        ("prefill, bf16 (first token after the embeddings)", "bf16", "image", "first_token_s", "s", 1, False),
        ("decode batch 1, bf16, after the image prompt", "bf16", "image", "decode_tokens_per_s", "tok/s", 1, True),
        ("peak resident while generating, bf16", "bf16", "image", "peak", "GiB", 1 / GIB, False),
    ],
    "batch": [
        ("decode batch 1, fp32, after 256 tokens", "batch", "batch1", "decode_tokens_per_s", "tok/s", 1, True),
        ("decode batch 8, fp32, 8 different prompts", "batch", "batch8", "decode_tokens_per_s", "tok/s", 1, True),
        ("decode batch 8, fp32, 8 copies", "batch", "batch8_copies", "decode_tokens_per_s", "tok/s", 1, True),
        ("peak resident while generating, batch 8", "batch", "batch8", "peak", "GiB", 1 / GIB, False),
    ],
    "small": [
        ("Small decode, fp32, 100 tokens of context", "small", "context100", "decode_tokens_per_s", "tok/s", 1, True),
        ("Small decode, fp32, 4k tokens of context", "small", "context4000", "decode_tokens_per_s", "tok/s", 1, True),
        ("Small prefill of 4,000 text tokens, fp32", "small", "context4000", "first_token_s", "s", 1, False),
        ("peak resident while generating, Small 4k", "small", "context4000", "peak", "GiB", 1 / GIB, False),
    ],
}


def rows_for(part: str, entry: dict) -> list[tuple[str, float, float, str, bool]]:
    """(figure, ours, official, unit, higher is better): medians over the rounds of one part."""
    runs = entry["runs"]
    rows = []
    for dtype in ("float32", "bfloat16") if part == "load" else ("",):
        for label, sub, key, field, unit, scale, higher in FIGURES[part]:
            sub = sub.format(dtype=dtype)
            first = runs["ours"][sub][0][key]
            facts = dict(dtype=dtype, gb=first.get("model_bytes", 0) / 1e9,
                         prompt=f"{first.get('prompt_tokens')} tokens, {first.get('tiles')} tiles")  # fmt: skip
            ours, official = (statistics.median(r[key][field] for r in runs[name][sub]) * scale for name in runs)
            rows.append((label.format(**facts), ours, official, unit, higher))
    return rows


def bf16_tokens_note(entry: dict) -> str:
    ours, official = entry["runs"]["ours"]["bf16"][0]["image"], entry["runs"]["official"]["bf16"][0]["image"]
    same = sum(1 for _ in zip(ours["tokens"][0], official["tokens"][0]) if _[0] == _[1])
    if ours["tokens"] == official["tokens"]:
        return "bf16 greedy tokens: identical to the official ones"
    first = next(i for i, (a, b) in enumerate(zip(ours["tokens"][0], official["tokens"][0])) if a != b)
    return f"bf16 greedy tokens: first {first} identical, then differ (bf16 rounding; {same} of {len(ours['tokens'][0])} equal)"


def format_table(results: dict) -> str:
    lines, rows = [], []
    for part in PARTS:
        if part not in results:
            continue
        entry = results[part]
        m, v = entry["machine"], entry["versions"]
        lines.append(f"- `{part}`: {m['date']}, load average {' '.join(map(str, m['load_average']))} before, "
                     f"{entry['rounds']} rounds; ours torch {v['ours']['torch']} / transformers {v['ours']['transformers']}, "
                     f"official torch {v['official']['torch']} / transformers {v['official']['transformers']}")  # fmt: skip
        rows += rows_for(part, entry)
    first = next(iter(results.values()))["machine"]
    head = [f"{first['cpu']}; flags {' '.join(first['cpu_flags']) or 'none'}; 2 threads; medians of alternating fresh "
            "processes; a ratio above 1 means this package is better (faster or smaller)", *lines, ""]  # fmt: skip
    table = ["| figure | this package | official | this package is |", "|---|---|---|---|"]
    for label, ours, official, unit, higher in rows:
        ratio = ours / official if higher else official / ours
        table.append(f"| {label} | {ours:.2f} {unit} | {official:.2f} {unit} | {ratio:.2f}x |")
    notes = []
    if any(p in results for p in ("image", "batch", "small")):
        notes.append("fp32 greedy tokens: identical to the official ones in every run (asserted)")
    if "bf16" in results:
        notes.append(bf16_tokens_note(results["bf16"]))
    return "\n".join(head + table + [""] + [f"- {n}" for n in notes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts: {', '.join(PARTS)}")
    parser.add_argument("--official-python", default="/work/official/.venv/bin/python")
    parser.add_argument("--checkpoints", type=Path, default=Path(tempfile.gettempdir()) / "deepseek-vl2-bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--json", type=Path, default=RESULTS, help="results of every part measured so far")
    parser.add_argument("--table", action="store_true", help="print the table of the saved results, measure nothing")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--build", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["ours", "official"], help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        return build_checkpoint(args.build, args.checkpoints / args.build)
    if args.worker:
        return worker(args.worker, args.part, args.checkpoints, args.new_tokens, args.out)

    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if not args.table:
        if not Path(args.official_python).is_file():
            raise SystemExit(f"{args.official_python} not found: set up the official environment (see --help)")
        ensure_checkpoints(args.checkpoints)
        for part in args.only.split(","):
            if part not in PARTS:
                raise SystemExit(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
            info = machine()
            log(f"{part}: {args.rounds} alternating rounds; load average {info['load_average']}")
            runs = measure(part, args)
            check_tokens(part, runs)
            key = next(iter(runs["ours"]))
            versions = {name: {k: runs[name][key][0][k] for k in ("torch", "transformers")} for name in runs}
            results[part] = dict(machine=info, versions=versions, rounds=args.rounds, runs=runs)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
    if not results:
        raise SystemExit(f"nothing measured yet ({args.json} is missing)")
    table = format_table(results)
    print(table)
    if args.record:
        record(table)


def record(table: str) -> None:
    path = REPO / "benchmarks" / "RESULTS.md"
    text = path.read_text()
    command = "python benchmarks/bench_official.py " + " ".join(sys.argv[1:])
    entry = f"\n### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}: `{command}`\n\n{table}\n"
    if SECTION not in text:
        entry = (f"\n{SECTION}\n\n`benchmarks/bench_official.py`: this package and the official DeepSeek-VL2 code "
                 "(transformers 4.38.2, run unmodified in its own environment) on the same random-weight checkpoints "
                 "with the real Tiny (4 language + 4 vision layers) and Small (3 layers) shapes.\n" + entry)  # fmt: skip
        path.write_text(text.rstrip("\n") + "\n" + entry)
        return
    # Newest entry last inside the section: before the next "## " heading, or at the end.
    start = text.index(SECTION) + len(SECTION)
    end = text.find("\n## ", start)
    end = len(text) if end < 0 else end
    path.write_text(text[:end].rstrip("\n") + "\n" + entry + text[end:])


if __name__ == "__main__":
    main()
