"""bf16 vs int8 vs int4 vs nf4 weights (deepseek_vl/quantization.py), side by side in one run, on the real layer shapes.

    flock /tmp/heavy.lock python benchmarks/bench_quant.py --variant small --layers 3
    flock /tmp/heavy.lock python benchmarks/bench_quant.py --variant tiny --modes bf16,int8+head,int4+head
    python benchmarks/bench_quant.py --variant tiny --layers 4 --device cuda

A mode "X+head" is X with ``quantize_lm_head=True``.

A random-weight bf16 checkpoint with the real Tiny/Small shapes (fewer language layers, one vision layer: decoding
never runs the vision tower) is saved in shards, then loaded three ways. Per mode: model bytes, peak memory while
loading (in a fresh process: anonymous RSS on CPU, the allocator on CUDA; mmapped shard pages are page cache, not
counted: transformers' bf16 load keeps bf16 tensors mapped from the file, so its anonymous peak is near zero), time to
first token of a text prompt, decode tok/s at batch 1 and 8 beside the read-rate limit (bytes a step reads / the
measured read rate), and peak memory while generating. Full-model sizes are counted exactly on the meta device;
full-model decode speed is extrapolated from the measured parts of a step: ``lm_head`` alone (timed on its own) plus
the full model's layer count times the measured time per layer (the rest of the step over the layers here).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import PRESETS, build_model, log, machine, memory_bandwidth, synchronize, tensor_bytes  # noqa: E402

from deepseek_vl.models import DeepseekVLV2ForCausalLM  # noqa: E402
from deepseek_vl.models.cache import InPlaceCache  # noqa: E402
from deepseek_vl.models.language import DeepseekV2MoE, decode_kernels  # noqa: E402
from deepseek_vl.quantization import replace_linears  # noqa: E402

MODES = ("bf16", "int8", "int4", "nf4")
GIB = 2**30
FULL_LAYERS = {"tiny": 12, "small": 27, "base": 30}


class PeakAnon:
    """Peak anonymous memory (heap, tensors; not mmapped file pages) during a block, sampled every millisecond."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    @staticmethod
    def anon() -> int:
        return status_bytes("RssAnon")

    def __enter__(self) -> PeakAnon:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self.anon()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self.anon())

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.anon())
        self.growth = self.peak - self.base


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers; an NF4 weight still on meta (not yet packed) counted as it will be stored."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    packed = sum(t.numel() * t.element_size() - nf4_bytes(t.numel()) for t in tensors.values()
                 if type(t).__name__ == "Params4bit" and t.is_meta)  # fmt: skip
    return tensor_bytes(tensors.values()) - packed


def nf4_bytes(numel: int) -> int:
    """NF4 storage: half a byte per weight, a uint8 scale per block of 64, a float32 scale per 256 of those."""
    blocks = math.ceil(numel / 64)
    return numel // 2 + blocks + 4 * math.ceil(blocks / 256)


def step_bytes(model, distinct: list[float]) -> float:
    """Bytes one decode step reads: the language model but the embedding table and the unchosen experts."""
    language = model.language
    moes = [m for m in language.modules() if isinstance(m, DeepseekV2MoE)]
    dense = model_bytes(language) - model_bytes(language.model.embed_tokens)
    routed = sum(model_bytes(m.experts) for m in moes)
    return dense - routed + sum(n * model_bytes(m.experts[0]) for n, m in zip(distinct, moes))


def quantize_arguments(mode: str) -> dict:
    """"bf16" -> none, "int8" -> quantize="int8", "int4+head" -> quantize="int4", quantize_lm_head=True."""
    if mode == "bf16":
        return {}
    name, _, head = mode.partition("+")
    return {"quantize": name, **({"quantize_lm_head": True} if head == "head" else {})}


def load(folder: Path, mode: str, device: str) -> DeepseekVLV2ForCausalLM:
    quantize = quantize_arguments(mode)
    placement = {"device_map": device} if device != "cpu" else {}
    return DeepseekVLV2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, **placement, **quantize).eval()


def decode(model, batch: int, prompt: int, steps: int, device: str) -> dict:
    """Greedy decode after a random text prompt: time to first token, tok/s, distinct experts per layer."""
    language = model.language
    moes = [m for m in language.modules() if isinstance(m, DeepseekV2MoE)]
    distinct = [0.0] * len(moes)
    counting = {"on": False}

    def count(i: int):
        def hook(_module, _args, output) -> None:
            if counting["on"]:
                distinct[i] += output[0].unique().numel() / steps
        return hook

    hooks = [m.gate.register_forward_hook(count(i)) for i, m in enumerate(moes)]
    ids = torch.randint(100, 100000, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.no_grad(), PeakAnon(device) as peak:
            synchronize(device)
            start = time.perf_counter()
            out = language(input_ids=ids, cache=InPlaceCache(), use_cache=True, logits_to_keep=1)
            cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            synchronize(device)
            ttft = time.perf_counter() - start
            language(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1)  # warm-up step
            counting["on"] = True
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                token = language(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
            synchronize(device)
            seconds = time.perf_counter() - start
            hidden = torch.randn(batch, 1, language.lm_head.in_features, dtype=torch.bfloat16, device=device)
            with decode_kernels(hidden, hidden.dtype):  # the kernels the decode step runs it with
                start = time.perf_counter()
                for _ in range(steps):  # lm_head alone: the part of a step that does not grow with the layers
                    language.lm_head(hidden)
                synchronize(device)
                head_seconds = (time.perf_counter() - start) / steps
    finally:
        for hook in hooks:
            hook.remove()
    cache_bytes = tensor_bytes(t for layer in cache.layers for t in (layer.keys, layer.values))
    return dict(ttft_s=ttft, tokens_per_s=batch * steps / seconds, bytes_per_step=step_bytes(model, distinct) + cache_bytes,
                peak_generating_bytes=model_bytes(model) + peak.growth, step_s=seconds / steps,
                lm_head_s=head_seconds)  # fmt: skip


def measure_load_in_subprocess(folder: Path, mode: str, device: str) -> dict:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_quant; "
            f"bench_quant.measure_load({str(folder)!r}, {mode!r}, {device!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure_load(folder: str, mode: str, device: str) -> None:
    """In a fresh process: model bytes, peak memory growth while loading, load time (printed as JSON)."""
    before = status_bytes("VmRSS")
    with PeakAnon(device) as peak:
        start = time.perf_counter()
        model = load(Path(folder), mode, device)
        seconds = time.perf_counter() - start
    print(json.dumps(dict(model_bytes=model_bytes(model), load_s=seconds, peak_load_bytes=peak.growth,
                          peak_load_rss_bytes=status_bytes("VmHWM") - before)))  # fmt: skip


def status_bytes(field: str) -> int:
    """A field of /proc/self/status in bytes (VmHWM: peak resident set, file-backed pages included)."""
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith(field + ":"))


def full_sizes(variant: str, modes: list[str]) -> dict[str, dict[str, float]]:
    """Exact bytes of the full model (real layer and vision counts) per mode, counted on the meta device."""
    sizes = {}
    for mode in modes:
        model = build_model(variant, FULL_LAYERS[variant], 27, torch.bfloat16, "meta")
        if mode != "bf16":
            arguments = quantize_arguments(mode)
            replace_linears(model, arguments["quantize"], torch.bfloat16, False, None, "quantize_lm_head" in arguments)
        language = model.language
        moes = [m for m in language.modules() if isinstance(m, DeepseekV2MoE)]
        dense = model_bytes(language) - model_bytes(language.model.embed_tokens) - sum(model_bytes(m.experts) for m in moes)
        sizes[mode] = dict(total=model_bytes(model), decode_step_b1=dense + sum(6 * model_bytes(m.experts[0]) for m in moes))
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, default=4, help="language layers (the real models have 12/27/30)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="decode measurements per figure (median)")
    parser.add_argument("--shard-size", default="400MB", help="checkpoint shard size: the loader's unit")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, bf16 first; X+head: lm_head too")
    parser.add_argument("--json", type=Path, help="write all numbers to this file")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "bf16" or any(quantize_arguments(m).get("quantize", "int8") not in MODES for m in modes):
        parser.error(f"--modes: bf16 first, then any of {', '.join(MODES[1:])} (each optionally with +head)")

    report: dict = dict(machine=machine(), variant=args.variant, layers=args.layers, device=args.device,
                        prompt_length=args.prompt_length, mode_names=modes)
    report["bandwidth"] = bandwidth = memory_bandwidth(args.device)
    log(f"read rate {bandwidth['read'] / 1e9:.1f} GB/s, copy rate {bandwidth['copy'] / 1e9:.1f} GB/s")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.manual_seed(0)
        source = build_model(args.variant, args.layers, 1, torch.bfloat16, "cpu")
        source.save_pretrained(folder, max_shard_size=args.shard_size)
        del source
        gc.collect()
        shards = sorted(folder.glob("*.safetensors"))
        report["largest_shard_bytes"] = max(f.stat().st_size for f in shards)
        log(f"checkpoint: {len(shards)} shards, largest {report['largest_shard_bytes'] / GIB:.2f} GiB")
        results = report["modes"] = {}
        models = {}
        for mode in modes:  # each load in a fresh process: freed memory of an earlier load would hide its peak
            results[mode] = measure_load_in_subprocess(folder, mode, args.device)
            models[mode] = load(folder, mode, args.device)
            log(f"{mode}: {results[mode]['model_bytes'] / GIB:.2f} GiB, load peak "
                f"{results[mode]['peak_load_bytes'] / GIB:.2f} GiB in {results[mode]['load_s']:.1f} s")
        ids = torch.randint(100, 100000, (1, args.prompt_length), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = models["bf16"].language(input_ids=ids.to(args.device)).logits.float()[0]  # (T, vocab)
            for mode in modes:  # teacher-forced agreement with the bf16 model at every prompt position
                got = models[mode].language(input_ids=ids.to(args.device)).logits.float()[0]
                results[mode]["top1_agreement"] = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
                results[mode]["relative_logit_error"] = ((got - want).norm(dim=-1) / want.norm(dim=-1)).mean().item()
        for batch in (1, 8):
            runs = {mode: [] for mode in modes}
            for _ in range(args.rounds):  # alternating, so a busy moment of the host hits every mode alike
                for mode in modes:
                    runs[mode].append(decode(models[mode], batch, args.prompt_length, args.decode_steps, args.device))
            for mode in modes:
                best = {k: statistics.median(run[k] for run in runs[mode]) for k in runs[mode][0]}
                best["limit_tokens_per_s"] = batch * bandwidth["read"] / best["bytes_per_step"]
                results[mode][f"batch{batch}"] = best
                log(f"{mode} batch {batch}: {best['tokens_per_s']:.1f} tok/s (limit {best['limit_tokens_per_s']:.1f}), "
                    f"ttft {best['ttft_s'] * 1000:.0f} ms")
        for mode in modes:
            r = results[mode]
            r["peak_generating_bytes"] = max(r["batch1"]["peak_generating_bytes"], r["batch8"]["peak_generating_bytes"])
    report["full_models"] = {v: full_sizes(v, modes) for v in FULL_LAYERS}
    print(format_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def full_decode_s(result: dict, layers: int, full_layers: int) -> float:
    """Seconds per batch-1 step of the full model: lm_head as measured, plus the measured time per layer x layers."""
    step, head = result["batch1"]["step_s"], result["batch1"]["lm_head_s"]
    return head + (step - head) / layers * full_layers


def format_table(r: dict) -> str:
    names, modes, bf16 = r["mode_names"], r["modes"], r["modes"]["bf16"]
    rows = [f"## {r['variant']} shapes, {r['layers']} language layers, {r['device']} ({r['machine']['date']}, "
            f"read rate {r['bandwidth']['read'] / 1e9:.1f} GB/s)", "", "| | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|"]  # fmt: skip

    def row(label, cell):
        rows.append(f"| {label} | " + " | ".join(cell(modes[m], m) for m in names) + " |")

    row("model bytes", lambda x, m: f"{x['model_bytes'] / GIB:.2f} GiB ({x['model_bytes'] / bf16['model_bytes']:.2f}x)")
    row(f"peak memory while loading, resident incl. mmapped file pages (largest shard "
        f"{r['largest_shard_bytes'] / GIB:.2f} GiB)", lambda x, m: f"{x['peak_load_rss_bytes'] / GIB:.2f} GiB "
        f"({x['peak_load_rss_bytes'] / x['model_bytes']:.2f}x model)")  # fmt: skip
    row("peak anonymous memory while loading (heap, not file pages)", lambda x, m: f"{x['peak_load_bytes'] / GIB:.2f} GiB")

    row("load time", lambda x, m: f"{x['load_s']:.1f} s")
    for b in (1, 8):
        row(f"decode batch {b}, tok/s (read-rate limit)", lambda x, m, b=b: f"**{x[f'batch{b}']['tokens_per_s']:.1f}** "
            f"({x[f'batch{b}']['limit_tokens_per_s']:.1f}), {x[f'batch{b}']['tokens_per_s'] / bf16[f'batch{b}']['tokens_per_s']:.2f}x bf16")  # fmt: skip
    row("batch-1 step: lm_head / the rest per layer", lambda x, m: f"{x['batch1']['lm_head_s'] * 1000:.1f} / "
        f"{(x['batch1']['step_s'] - x['batch1']['lm_head_s']) / r['layers'] * 1000:.1f} ms")  # fmt: skip
    row("teacher-forced top-1 agreement with bf16 / mean relative logit error",
        lambda x, m: f"{x['top1_agreement']:.3f} / {x['relative_logit_error']:.4f}")
    row(f"time to first token, {r['prompt_length']}-token prompt", lambda x, m: f"{x['batch1']['ttft_s'] * 1000:.0f} ms")
    row("model + peak growth while generating (batch 8)", lambda x, m: f"{x['peak_generating_bytes'] / GIB:.2f} GiB")
    full = FULL_LAYERS[r["variant"]]
    bf16_full = full_decode_s(bf16, r["layers"], full)
    row(f"full {r['variant']} ({full} layers) batch-1 decode, extrapolated: tok/s, vs bf16",
        lambda x, m: f"~{1 / full_decode_s(x, r['layers'], full):.1f}, **{bf16_full / full_decode_s(x, r['layers'], full):.2f}x**")
    rows += ["", "Full models, exact bytes:", "", "| model | " + " | ".join(names) + " |",
             "|---" * (len(names) + 1) + "|"]  # fmt: skip
    for variant, sizes in r["full_models"].items():
        rows.append(f"| {variant} | " + " | ".join(f"{sizes[m]['total'] / GIB:.1f} GiB" for m in names) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
