"""``deepseek-vl2 finetune`` and ``deepseek-vl2 merge``: argument parsing only; the work is in trainer.py/merge.py.

Nothing heavy is imported until a command runs, so ``deepseek-vl2 --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from pathlib import Path

METHODS = ("lora", "qlora", "full")


def add_finetune_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune on your conversations (LoRA, QLoRA or full)",
        description="Fine-tune DeepSeek-VL2 on a JSONL file of conversations (one per line; see the README's\n"
        "fine-tuning section for the row format, grounding boxes included). Saves a LoRA adapter (or, with\n"
        "--method full, a full checkpoint) and the processor to --output; checkpoints every --save-steps.",
        epilog="examples:\n"
        "  deepseek-vl2 finetune --model deepseek-ai/deepseek-vl2-tiny --data train.jsonl --validate\n"
        "  deepseek-vl2 finetune --model deepseek-ai/deepseek-vl2-tiny --data train.jsonl --eval-data val.jsonl "
        "--output out/\n"
        "  torchrun --nproc-per-node 4 -m deepseek_vl finetune --model ... --data train.jsonl --output out/\n"
        "  deepseek-vl2 generate 'Describe this.' -i photo.jpg --adapter out/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="deepseek-ai/deepseek-vl2-tiny", help="base model: Hub id or folder")
    parser.add_argument("--data", required=True, metavar="JSONL", help="training conversations, one JSON per line")
    parser.add_argument("--eval-data", metavar="JSONL", help="held-out conversations for the eval loss")
    parser.add_argument("--output", default="out", metavar="FOLDER", help="where the adapter/model and checkpoints go")
    parser.add_argument("--method", choices=METHODS, default="lora", help="lora (default), qlora (NF4 base), full")
    parser.add_argument("--validate", action="store_true",
                        help="check every row, list every bad one, print token statistics; no training")  # fmt: skip
    parser.add_argument(
        "--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
        help="continue from the latest checkpoint in --output, or from the given checkpoint-N folder",
    )  # fmt: skip
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max-steps", type=int, default=-1, help="stop after N optimizer steps (overrides --epochs)")
    train.add_argument("--batch-size", type=int, default=1, help="conversations per device and step")
    train.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    train.add_argument("--lr", type=float, default=None, help="learning rate (default: 2e-4 LoRA, 1e-5 full)")
    train.add_argument("--optim", default="adamw_torch", help="a transformers optimizer name (default: %(default)s)")
    train.add_argument("--max-length", type=int, default=None,
                       help="refuse conversations longer than N tokens (the model's context is always a limit)")  # fmt: skip
    train.add_argument("--no-gradient-checkpointing", action="store_true", help="faster, much more memory")
    train.add_argument("--logging-steps", type=int, default=10)
    train.add_argument("--eval-steps", type=int, default=None, help="default: --save-steps")
    train.add_argument("--save-steps", type=int, default=500)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (launch with torchrun)")
    train.add_argument("--deepspeed", metavar="JSON", help="a DeepSpeed config file (ZeRO-2/3; needs deepspeed)")
    train.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="base weights; auto = bf16 for LoRA on a GPU, else float32")  # fmt: skip
    lora = parser.add_argument_group("what trains")
    lora.add_argument("--lora-rank", type=int, default=None, help="default: 16")
    lora.add_argument("--lora-alpha", type=int, default=None, help="default: 32")
    lora.add_argument("--lora-dropout", type=float, default=None, help="default: 0.05")
    lora.add_argument("--lora-experts", action="store_true", help="LoRA on every routed expert too (many params)")
    lora.add_argument("--train-router", action="store_true", help="train the MoE routers")
    lora.add_argument("--lora-vision", action="store_true", help="LoRA on the vision tower's blocks")
    lora.add_argument("--train-vision", action="store_true", help="train the vision tower fully")
    lora.add_argument("--train-projector", action="store_true", help="train the vision-language projector")
    parser.set_defaults(handler=finetune_command)


def add_merge_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model: a full checkpoint folder",
        description="Write base model + LoRA adapter as a full checkpoint with the official weight names and\n"
        "config (loads unchanged here and in the official code). The merge runs in float32.",
        epilog="example:\n  deepseek-vl2 merge --adapter out/ --output merged/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--adapter", required=True, metavar="FOLDER", help="the --output folder of finetune")
    parser.add_argument("--output", required=True, metavar="FOLDER", help="new folder for the merged checkpoint")
    parser.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="saved weights; auto = the base checkpoint's dtype")  # fmt: skip
    parser.set_defaults(handler=merge_command)


def require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise ValueError("fine-tuning needs peft: pip install 'deepseek-vl2[train]'")


def finetune_command(args: argparse.Namespace) -> int:
    require_peft()
    from transformers.trainer_utils import get_last_checkpoint

    from deepseek_vl.train.data import DataError, scan_jsonl
    from deepseek_vl.train.lora import TrainableParts
    from deepseek_vl.train.trainer import FinetuneConfig, check_config, finetune, format_summary, prepare_output

    lora_settings = {"lora_rank": args.lora_rank, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout}
    given = {name: value for name, value in lora_settings.items() if value is not None}
    config = FinetuneConfig(
        model=args.model, output=args.output, method=args.method,
        parts=TrainableParts(args.lora_experts, args.train_router, args.lora_vision, args.train_vision,
                             args.train_projector),
        **given, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        learning_rate=args.lr if args.lr is not None else (1e-5 if args.method == "full" else 2e-4),
        optimizer=args.optim, max_length=args.max_length, gradient_checkpointing=not args.no_gradient_checkpointing,
        logging_steps=args.logging_steps, eval_steps=args.eval_steps, save_steps=args.save_steps, seed=args.seed,
        dtype=args.dtype, resume=args.resume, fsdp=args.fsdp, deepspeed=args.deepspeed,
    )  # fmt: skip
    check_config(config, list(given))
    files = [("train", args.data), *([("eval", args.eval_data)] if args.eval_data else [])]
    if args.validate:
        return validate_command(args, [(name, path, *scan_jsonl(path)) for name, path in files])
    prepare_output(config)  # before the data and the model load: a wrong --output fails at once
    scanned = [(name, path, *scan_jsonl(path)) for name, path in files]
    if any(problems for *_, problems in scanned):  # with the token checks of the other rows: one run lists them all
        raise DataError(check_data(args, scanned)[1])
    train, evaluation = scanned[0][2], scanned[1][2] if args.eval_data else None
    print(f"Fine-tuning {args.model} ({args.method}) on {len(train)} conversations from {args.data}", file=sys.stderr)
    try:
        summary = finetune(config, train, evaluation)
    except KeyboardInterrupt:
        checkpoint = get_last_checkpoint(args.output) if Path(args.output).is_dir() else None
        if checkpoint:
            print(f"\nstopped; the last checkpoint is {checkpoint}: continue with --resume", file=sys.stderr)
        raise
    print(format_summary(summary, args.output))
    return 0


def check_data(args: argparse.Namespace, files: list[tuple[str, str, list, list[str]]]) -> tuple[list, list[str]]:
    """Every check of every row in one pass (format, then tokens, images and lengths of the rows that parse): each
    file's (name, sizes of its good rows as check_rows gives them, its number of bad rows) and every problem, in file
    and line order."""
    from deepseek_vl.chat import resolve_model_folder
    from deepseek_vl.models import DeepseekVLV2Processor
    from deepseek_vl.train.collate import Collator, check_rows, context_length

    folder = resolve_model_folder(args.model)
    collator = Collator(DeepseekVLV2Processor.from_pretrained(folder), args.max_length, context_length(folder))
    checked, problems = [], []
    for name, path, examples, format_problems in files:
        sizes, token_problems = check_rows(collator, examples, progress=True)
        prefix = f"{Path(path)}:"
        problems += sorted(format_problems + token_problems, key=lambda problem: line_number(problem, prefix))
        checked.append((name, sizes, len(format_problems) + len(token_problems)))
    return checked, problems


def validate_command(args: argparse.Namespace, files: list[tuple[str, str, list, list[str]]]) -> int:
    """check_data's problems, and the token-length statistics of the good rows."""
    checked, problems = check_data(args, files)
    for name, sizes, bad in checked:
        if sizes:
            lengths = [tokens for tokens, _, _ in sizes]
            print(
                f"{name}: {len(sizes)} conversations, {sum(images for *_, images in sizes)} images, tokens per "
                f"conversation min {min(lengths)} median {statistics.median(lengths):.0f} max {max(lengths)}, "
                f"{sum(lengths):,} tokens, {sum(labels for _, labels, _ in sizes):,} answer (label) tokens"
                + (" (the valid rows)" if bad else "")
            )
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print(f"{len(problems)} row(s) would fail; fix them before training", file=sys.stderr)
        return 2
    print("all rows are valid")
    return 0


def line_number(problem: str, prefix: str) -> int:
    """The line of a "file:line: problem" message (0 for a whole-file one), to list problems in file order."""
    line = problem.removeprefix(prefix).split(":", 1)[0]
    return int(line) if line.isdigit() else 0


def merge_command(args: argparse.Namespace) -> int:
    require_peft()
    from deepseek_vl.train.merge import merge_to_checkpoint

    output = merge_to_checkpoint(args.adapter, args.output, model=args.model, dtype=args.dtype)
    print(f"merged checkpoint written to {output}")
    return 0
