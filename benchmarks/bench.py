"""Inference speed and memory of DeepSeek-VL2 on the real layer shapes (random weights).

    python benchmarks/bench.py --variant tiny --layers 4 --dtype float32
    python benchmarks/bench.py --variant small --layers 2 --dtype bfloat16 --device cuda

Prints progress as it goes, then a table; --json writes every number, --record appends the table with
the date, CPU flags and torch version to benchmarks/RESULTS.md. Decode figures come with their bound: a
step only reads, so it cannot be faster than (weight bytes it reads + cache bytes it reads) / the read
rate measured here with a large sum (the copy rate is printed too, for comparison with older figures).
Weight bytes count the dense weights, the LM head and the distinct routed experts the step's tokens chose.
With --reference, every decode figure is measured side by side with the reference paths (eager attention,
DeepseekV2MoE.reference, transformers' DynamicCache, plain F.linear products), alternating runs, medians.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import DynamicCache

from deepseek_vl.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from deepseek_vl.models import language as language_module
from deepseek_vl.models.cache import InPlaceCache
from deepseek_vl.models.language import DeepseekV2MoE
from deepseek_vl.utils.io import load_image

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(os.environ.get("DEEPSEEK_VL_GOLDEN", REPO.parent / "shared" / "golden"))
SIGLIP_SO400M = dict(image_size=384, patch_size=14, width=1152, layers=27, heads=16, mlp_ratio=3.7362)
COMMON = dict(vocab_size=129280, max_position_embeddings=4096, n_shared_experts=2, first_k_dense_replace=1,
              n_group=1, topk_group=1, num_experts_per_tok=6, q_lora_rank=None)  # fmt: skip
# Language shapes of the released checkpoints (Base from its config.json, Tiny and Small from theirs).
PRESETS = {
    "tiny": dict(hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896, num_hidden_layers=12,
                 num_attention_heads=10, num_key_value_heads=10, n_routed_experts=64, use_mla=False,
                 kv_lora_rank=None, qk_nope_head_dim=0, qk_rope_head_dim=0, v_head_dim=0),
    "small": dict(hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                  num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, kv_lora_rank=512),
    "base": dict(hidden_size=2560, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=30,
                 n_routed_experts=72, kv_lora_rank=512, topk_method="noaux_tc", scoring_func="sigmoid",
                 norm_topk_prob=True, routed_scaling_factor=2.0),
}  # fmt: skip


START = time.perf_counter()
fast_linear, fast_kernels = language_module.linear, language_module.decode_kernels


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


def reference_kernels(tokens: torch.Tensor, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()  # oneDNN stays on for bf16 decode steps


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def machine() -> dict:
    """What the figures depend on: date, CPU model and its vector flags, torch version, threads."""
    cpu, flags = platform.processor() or platform.machine(), []
    if os.path.exists("/proc/cpuinfo"):
        text = open("/proc/cpuinfo").read()
        cpu = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), cpu)
        present = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        flags = [f for f in ("avx", "fma", "avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in present]
    return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), cpu=cpu,
                cpu_flags=flags, torch=torch.__version__, torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                threads=torch.get_num_threads())  # fmt: skip


def build_model(variant: str, layers: int, vision_layers: int, dtype: torch.dtype, device: str) -> DeepseekVLV2ForCausalLM:
    language = {**COMMON, **PRESETS[variant], "num_hidden_layers": layers}
    candidates = json.loads((GOLDEN / "real" / "deepseek-vl2" / "config.json").read_text())["candidate_resolutions"]
    config = DeepseekVLV2Config(
        vision_config={**SIGLIP_SO400M, "layers": vision_layers},
        projector_config=dict(input_dim=1152, n_embed=language["hidden_size"]),
        language_config=language,
        candidate_resolutions=candidates,
    )
    with torch.device(device):
        model = DeepseekVLV2ForCausalLM._from_config(config, dtype=dtype)
    return model.eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PeakMemory:
    """Peak bytes in use during a block: CUDA allocator stats, or the process RSS sampled every millisecond."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak = self.rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())


@contextmanager
def timed(device: str, out: dict, key: str):
    synchronize(device)
    start = time.perf_counter()
    yield
    synchronize(device)
    out[key] = time.perf_counter() - start


def memory_bandwidth(device: str, megabytes: int = 1024) -> dict[str, float]:
    """Best of 7: bytes copied per second by a large copy, and bytes read per second by a large sum.

    The copy rate counts each byte once although a copy both reads and writes it; the read rate is
    the true bound for decoding, which only reads. Buffers are written first: untouched pages all
    map to one zero page and would read from cache.
    """
    src = torch.ones(megabytes * 2**18, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    rates = {}
    for name, op in (("copy", lambda: dst.copy_(src)), ("read", lambda: src.sum())):
        op()
        times = []
        for _ in range(7):
            t: dict = {}
            with timed(device, t, "s"):
                op()
            times.append(t["s"])
        rates[name] = src.numel() * src.element_size() / min(times)
    return rates


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def step_weight_bytes(model: DeepseekVLV2ForCausalLM, distinct_experts: list[float]) -> float:
    """Weight bytes one decode step reads: everything but the embedding table and unchosen experts."""
    language = model.language
    dense = tensor_bytes(language.parameters()) - tensor_bytes(language.model.embed_tokens.parameters())
    moes = [m for m in language.modules() if isinstance(m, DeepseekV2MoE)]
    routed = sum(tensor_bytes(m.experts.parameters()) for m in moes)
    per_expert = [tensor_bytes(m.experts[0].parameters()) for m in moes]
    return dense - routed + sum(n * b for n, b in zip(distinct_experts, per_expert))


def prompt_inputs(processor: DeepseekVLV2Processor, image_names: list[str], device: str):
    images = [load_image(GOLDEN / "images" / name) for name in image_names]
    tags = "".join("<image>\n" for _ in images)
    conversation = [{"role": "<|User|>", "content": tags + "Describe the images in detail."},
                    {"role": "<|Assistant|>", "content": ""}]  # fmt: skip
    return processor(conversations=conversation, images=images).to(device)


def image_embeddings(model, inputs, device: str) -> tuple[torch.Tensor, float]:
    """prepare_inputs_embeds (vision tower, projector, 2D layout) and its time."""
    t: dict = {}
    with torch.no_grad(), timed(device, t, "s"):
        embeds = model.prepare_inputs_embeds(**inputs)
    return embeds, t["s"]


def prefill(model, inputs, embeds: torch.Tensor, device: str, logits_to_keep: int) -> dict:
    """Language-model prefill of the prompt (after one warm-up pass), as generate runs it."""
    result: dict = {}
    run = lambda: model.language(  # noqa: E731
        inputs_embeds=embeds, attention_mask=inputs.attention_mask, logits_to_keep=logits_to_keep, use_cache=True
    )
    with torch.no_grad():
        run()
        with PeakMemory(device) as peak, timed(device, result, "seconds"):
            run()
    result["tokens_per_s"] = embeds.shape[1] / result["seconds"]
    result["peak_bytes"] = peak.peak
    return result


def decode(model, batch: int, prompt_length: int, steps: int, device: str, distinct_rows: bool = True,
           cache_class: type = InPlaceCache) -> dict:
    """Time `steps` greedy decode steps after a text prompt; also count the distinct experts each step reads.

    ``distinct_rows``: a different random prompt per row (else copies of one); ``cache_class``: the cache filled.
    """
    language = model.language
    moes = [m for m in language.modules() if isinstance(m, DeepseekV2MoE)]
    distinct = [0.0] * len(moes)
    counting = {"on": False}

    def count(i: int):
        def hook(_module, _args, output):
            if counting["on"]:
                distinct[i] += output[0].unique().numel() / steps
        return hook

    handles = [m.gate.register_forward_hook(count(i)) for i, m in enumerate(moes)]
    ids = torch.randint(100, 100000, (batch if distinct_rows else 1, prompt_length), generator=torch.Generator().manual_seed(0))
    ids = ids.expand(batch, -1).to(device)
    result: dict = {}
    try:
        with torch.no_grad():
            out = language(input_ids=ids, cache=cache_class(), use_cache=True, logits_to_keep=1)
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            language(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)  # warm-up step
            counting["on"] = True
            with timed(device, result, "seconds"):
                for _ in range(steps):
                    token = language(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
    finally:
        for handle in handles:
            handle.remove()
    cache_bytes = tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
    seq_len = cache.get_seq_length()
    result.update(
        batch=batch,
        distinct_rows=distinct_rows,
        context_tokens=seq_len,
        tokens_per_s=batch * steps / result["seconds"],
        distinct_experts_per_layer=sum(distinct) / max(len(distinct), 1),
        weight_bytes_per_step=step_weight_bytes(model, distinct),
        cache_bytes_per_step=cache_bytes,
        cache_bytes_per_token=cache_bytes / (batch * seq_len),
        cache_bytes_per_token_layer=cache_bytes / (batch * seq_len * len(language.model.layers)),
    )
    return result


def with_limits(result: dict, bandwidth: dict[str, float]) -> dict:
    """Decode's bound: bytes read per step over the measured read rate (and, for comparison, the copy rate)."""
    step_bytes = result["weight_bytes_per_step"] + result["cache_bytes_per_step"]
    for name, rate in bandwidth.items():
        limit = result["batch"] * rate / step_bytes
        result[f"limit_tokens_per_s_{name}"] = limit
        result[f"share_of_limit_{name}"] = result["tokens_per_s"] / limit
    return result


def side_by_side(model, bandwidth: dict, rounds: int, **decode_args) -> dict:
    """Decode with the fast paths and with the reference paths, alternating ``rounds`` times; medians and ratio."""
    runs: dict[str, list[dict]] = {"fast": [], "reference": []}
    for round_ in range(rounds):
        for name in ("fast", "reference"):
            with_reference_paths(model, name == "reference")
            cache_class = DynamicCache if name == "reference" else InPlaceCache
            runs[name].append(with_limits(decode(model, cache_class=cache_class, **decode_args), bandwidth))
            log(f"  round {round_ + 1}/{rounds} {name}: {runs[name][-1]['tokens_per_s']:.2f} tok/s")
        with_reference_paths(model, False)
    result = {}
    for name, results in runs.items():
        speeds = [r["tokens_per_s"] for r in results]
        result[name] = min(results, key=lambda r: abs(r["tokens_per_s"] - statistics.median(speeds))) | {
            "tokens_per_s": statistics.median(speeds), "runs_tokens_per_s": speeds}
    result["fast"] = with_limits(result["fast"], bandwidth)
    result["reference"] = with_limits(result["reference"], bandwidth)
    result["speedup"] = result["fast"]["tokens_per_s"] / result["reference"]["tokens_per_s"]
    return result


def with_reference_paths(model, enabled: bool) -> None:
    """Switch to the straightforward paths: eager (absorbed) attention math, the per-expert mask loop and plain
    ``F.linear`` products (not split over the threads; bf16 decode steps on oneDNN)."""
    language_module.linear = reference_linear if enabled else fast_linear
    language_module.decode_kernels = reference_kernels if enabled else fast_kernels
    model.language.config._attn_implementation = "eager" if enabled else "sdpa"
    for module in model.modules():
        if isinstance(module, DeepseekV2MoE):
            module.reference = enabled


def incremental_prefill_memory(model, inputs, chunk_size: int, device: str) -> dict:
    """Peak memory of chunked prefill against weights + final cache + one chunk's activations."""
    weights = tensor_bytes(model.parameters())
    with torch.no_grad():
        ids = inputs.input_ids[:, :chunk_size]
        with PeakMemory(device) as chunk_peak:
            model.language.model(input_ids=ids, use_cache=True)
        with PeakMemory(device) as base:
            pass
        with PeakMemory(device) as peak:
            _, cache = model.incremental_prefilling(
                inputs.input_ids, inputs.images, inputs.images_seq_mask, inputs.images_spatial_crop,
                inputs.attention_mask, chunk_size=chunk_size,
            )  # fmt: skip
    cache_bytes = tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
    chunk_activations = max(chunk_peak.peak - base.peak, 0)
    budget = (weights if device.startswith("cuda") else base.peak) + cache_bytes + chunk_activations
    return dict(chunk_size=chunk_size, peak_bytes=peak.peak, weights_bytes=weights, cache_bytes=cache_bytes,
                chunk_activation_bytes=chunk_activations, ratio_to_budget=peak.peak / budget)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, default=4, help="language layers (the real models have 12/27/30)")
    parser.add_argument("--vision-layers", type=int, default=27)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=256, help="text prompt length before decoding")
    parser.add_argument("--long-context", type=int, default=1446,
                        help="also decode after this many tokens (the one-image prompt's length); 0 skips")  # fmt: skip
    parser.add_argument("--reference", action="store_true",
                        help="time every decode side by side with the reference paths (alternating runs, medians)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side-by-side figure")
    parser.add_argument("--skip-vision", action="store_true", help="decode figures only")
    parser.add_argument("--json", type=Path, help="write all numbers to this file")
    parser.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), args.device

    report: dict = dict(variant=args.variant, layers=args.layers, vision_layers=args.vision_layers,
                        dtype=args.dtype, device=device, threads=torch.get_num_threads(),
                        device_name=torch.cuda.get_device_name() if device.startswith("cuda") else os.uname().machine,
                        machine=machine())  # fmt: skip
    log(f"{report['machine']}; measuring memory bandwidth")
    bandwidth = memory_bandwidth(device)
    report["copy_bytes_per_s"], report["read_bytes_per_s"] = bandwidth["copy"], bandwidth["read"]
    log(f"read {bandwidth['read'] / 1e9:.1f} GB/s, copy {bandwidth['copy'] / 1e9:.1f} GB/s; building the model")
    model = build_model(args.variant, args.layers, args.vision_layers, dtype, device)
    report["weights_bytes"] = tensor_bytes(model.parameters())
    if not args.skip_vision:
        vision_and_prefill(model, report, device)
    decodes = {"decode_batch1": dict(batch=1, prompt_length=args.prompt_length)}
    if args.long_context:
        decodes["decode_batch1_long_context"] = dict(batch=1, prompt_length=args.long_context)
    decodes["decode_batch8"] = dict(batch=8, prompt_length=args.prompt_length)
    decodes["decode_batch8_copies"] = dict(batch=8, prompt_length=args.prompt_length, distinct_rows=False)
    for name, decode_args in decodes.items():
        log(f"{name}: {decode_args}")
        decode_args |= dict(steps=args.decode_steps, device=device)
        if args.reference:
            report[name] = side_by_side(model, bandwidth, args.rounds, **decode_args)
        else:
            report[name] = {"fast": with_limits(decode(model, **decode_args), bandwidth)}
    table = format_table(report)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.record:
        with open(REPO / "benchmarks" / "RESULTS.md", "a") as results:
            command = "python benchmarks/bench.py " + " ".join(os.sys.argv[1:])
            results.write(f"\n### {report['machine']['date']}: `{command}`\n\n```\n{table}\n```\n")
        log("appended to benchmarks/RESULTS.md")


def vision_and_prefill(model, report: dict, device: str) -> None:
    """Preprocessing, vision tower + projector, prefill with one and three images, incremental prefill memory."""
    processor = DeepseekVLV2Processor.from_pretrained(GOLDEN / "checkpoints" / "vl2-tiny-random")

    one_image = prompt_inputs(processor, ["visual_grounding_1.jpeg"], device)
    three_images = prompt_inputs(processor, ["multi_image_1.jpeg", "multi_image_2.jpeg", "multi_image_3.jpeg"], device)
    t: dict = {}
    with timed("cpu", t, "preprocess"):
        for _ in range(3):
            prompt_inputs(processor, ["visual_grounding_1.jpeg"], "cpu")
    report["preprocess_ms_per_image"] = 1000 * t["preprocess"] / 3
    with torch.no_grad():
        model.encode_tiles(one_image.images[0, :1])  # warm-up
    embeds = {}
    for name, inputs in (("prefill_one_image", one_image), ("prefill_three_images", three_images)):
        log(f"{name}: vision and prefill")
        embeds[name], seconds = image_embeddings(model, inputs, device)
        tiles = int((inputs.images_spatial_crop.prod(-1) + 1)[inputs.images_spatial_crop[..., 0] > 0].sum())
        lm = prefill(model, inputs, embeds[name], device, logits_to_keep=1)
        report[name] = lm | {"tokens": inputs.input_ids.shape[1], "tiles": tiles, "vision_seconds": seconds,
                             "total_tokens_per_s": inputs.input_ids.shape[1] / (seconds + lm["seconds"])}  # fmt: skip
    report["vision_ms_per_tile"] = 1000 * min(report[k]["vision_seconds"] / report[k]["tiles"] for k in embeds)
    log("prefill with logits at every position; incremental prefill memory")
    report["prefill_full_vocab_logits"] = prefill(model, one_image, embeds["prefill_one_image"], device, logits_to_keep=0)
    report["incremental_prefill"] = incremental_prefill_memory(model, one_image, 512, device)


def format_table(r: dict) -> str:
    mib, gbs, m = 2**20, 1e9, r["machine"]
    lines = [f"DeepSeek-VL2 {r['variant']} shapes, {r['layers']} language / {r['vision_layers']} vision layers, "
             f"{r['dtype']} on {r['device']} ({r['device_name']}, {r['threads']} threads); weights "
             f"{r['weights_bytes'] / mib:.0f} MiB",
             f"{m['date']}; {m['cpu']}; flags {' '.join(m['cpu_flags']) or 'none'} (torch uses {m['torch_cpu_capability']}); "
             f"torch {m['torch']}; read {r['read_bytes_per_s'] / gbs:.1f} GB/s (the bound), copy "
             f"{r['copy_bytes_per_s'] / gbs:.1f} GB/s"]  # fmt: skip
    rows = []
    if "prefill_one_image" in r:
        rows += [("image preprocessing", f"{r['preprocess_ms_per_image']:.1f} ms/image"),
                 ("vision + projector", f"{r['vision_ms_per_tile']:.1f} ms/tile")]  # fmt: skip
        for key in ("prefill_one_image", "prefill_three_images"):
            p = r[key]
            rows.append((f"{key} ({p['tokens']} tok, {p['tiles']} tiles)",
                         f"prepare_inputs_embeds {p['vision_seconds']:.2f} s; LM {p['tokens_per_s']:.0f} tok/s, "
                         f"with vision {p['total_tokens_per_s']:.0f} tok/s, peak {p['peak_bytes'] / mib:.0f} MiB"))  # fmt: skip
        full, inc = r["prefill_full_vocab_logits"], r["incremental_prefill"]
        rows.append(("  one image, logits at every position",
                     f"LM {full['tokens_per_s']:.0f} tok/s, peak {full['peak_bytes'] / mib:.0f} MiB"))  # fmt: skip
        rows.append((f"incremental prefill chunk {inc['chunk_size']}",
                     f"peak {inc['peak_bytes'] / mib:.0f} MiB = {inc['ratio_to_budget']:.2f} x (weights+cache+chunk)"))  # fmt: skip
    for key in ("decode_batch1", "decode_batch1_long_context", "decode_batch8", "decode_batch8_copies"):
        if key not in r:
            continue
        fast = r[key]["fast"]
        value = (f"{fast['tokens_per_s']:.2f} tok/s = {100 * fast['share_of_limit_read']:.0f}% of the read-rate bound "
                 f"{fast['limit_tokens_per_s_read']:.2f} ({fast['context_tokens']} tokens of context, "
                 f"{fast['distinct_experts_per_layer']:.1f} experts/layer)")  # fmt: skip
        if "reference" in r[key]:
            ref = r[key]["reference"]
            value += (f"; reference paths {ref['tokens_per_s']:.2f} tok/s -> {r[key]['speedup']:.2f}x "
                      f"(runs {', '.join(f'{v:.2f}' for v in fast['runs_tokens_per_s'])} vs "
                      f"{', '.join(f'{v:.2f}' for v in ref['runs_tokens_per_s'])})")  # fmt: skip
        rows.append((key.replace("_", " "), value))
    rows.append(("cache per token and layer", f"{r['decode_batch1']['fast']['cache_bytes_per_token_layer']:.0f} bytes"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(lines + [f"  {name:<{width}}  {value}" for name, value in rows])


if __name__ == "__main__":
    main()
