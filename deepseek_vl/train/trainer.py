"""Fine-tuning glue over ``transformers.Trainer``: load -> data -> LoRA / QLoRA / full -> train -> save.

The loop itself is Trainer's (accelerate underneath), so ``torchrun`` / ``accelerate launch`` give DDP, FSDP or
DeepSpeed without code here. The model's loss is the next-token cross-entropy summed over the label tokens and
divided by the label tokens of the whole global batch (Trainer's ``num_items_in_batch``), so gradient accumulation
and any number of processes give the same update as one process on the whole batch. The MoE balance loss adds its gradient
inside the model, as in the official training code.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer import SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, sort_checkpoints

from deepseek_vl.models.language import DeepseekV2MoE
from deepseek_vl.options import model_reference
from deepseek_vl.train.collate import Collator, check_rows, context_length
from deepseek_vl.train.data import DataError, Example
from deepseek_vl.train.lora import TrainableParts, apply_lora, count_parameters, prepare_full
from deepseek_vl.train.merge import add_official_dtype_key

METHODS = ("lora", "qlora", "full")
FSDP_UNITS = ["DeepseekV2DecoderLayer", "Block"]  # the model's _no_split_modules: decoder layer, ViT block
# FSDP2 (torch fully_shard through accelerate), one unit per decoder layer and per vision block, parameters re-sharded
# after each unit's forward (ZeRO-3-like); accelerate gives the input embedding its own unit, the rest is the root unit.
FSDP_CONFIG = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_layer_cls_to_wrap": FSDP_UNITS,
               "reshard_after_forward": True}  # fmt: skip
RUN_FILE = "finetune_run.json"  # in --output and each checkpoint-N: what --resume must match


@dataclass
class FinetuneConfig:
    """Everything a run needs; the CLI flags map one to one."""

    model: str
    output: str
    method: str = "lora"
    parts: TrainableParts = field(default_factory=TrainableParts)
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 2e-4
    optimizer: str = "adamw_torch"  # any transformers optim name ("sgd", "adamw_torch_fused", "paged_adamw_8bit", ...)
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_length: int | None = None
    gradient_checkpointing: bool = True
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int = 500
    save_total_limit: int | None = 3
    seed: int = 42
    dtype: str = "auto"
    resume: str | bool | None = None
    num_workers: int = 0
    fsdp: bool = False  # shard with FSDP, one unit per decoder layer and per vision block (under torchrun/accelerate)
    deepspeed: str | None = None  # a DeepSpeed JSON config (ZeRO-2/3), passed to Trainer as is


@dataclass
class Summary:
    """This run's numbers: after --resume, steps, tokens and tokens/s count only the steps run now."""

    trainable_parameters: int
    total_parameters: int
    steps: int
    train_loss: float  # mean over this run's steps
    tokens: int
    tokens_per_second: float
    peak_memory_bytes: int
    seconds: float
    eval_loss: float | None = None
    last_loss: float = math.nan  # the last logged train loss (of the final step)
    start_step: int = 0  # the step resumed from
    final_step: int = 0


def check_config(config: FinetuneConfig, lora_settings: Sequence[str] = ()) -> None:
    """Refuse settings that would be silently ignored or would not do what the README promises.

    ``lora_settings``: the LoRA numbers given explicitly ("lora_rank", ... as the CLI knows them), which --method full
    would ignore as well.
    """
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
    counts = {
        "--batch-size": config.batch_size, "--grad-accum": config.grad_accum, "--lr": config.learning_rate,
        "--logging-steps": config.logging_steps, "--save-steps": config.save_steps, "--eval-steps": config.eval_steps,
        "--max-length": config.max_length, "--lora-rank": config.lora_rank, "--lora-alpha": config.lora_alpha,
        "--max-steps": None if config.max_steps == -1 else config.max_steps,  # -1: as many as --epochs make
        "--epochs": config.epochs if config.max_steps == -1 else None,
    }  # fmt: skip
    if bad := [f"{flag} {value}" for flag, value in counts.items() if value is not None and not value > 0]:
        raise ValueError(f"{', '.join(bad)}: must be above 0 (Trainer would fail mid-way or train nothing)")
    if not 0 <= config.lora_dropout < 1:
        raise ValueError(f"--lora-dropout {config.lora_dropout}: must be in [0, 1)")
    if config.parts.lora_vision and config.parts.train_vision:
        raise ValueError("choose one of --lora-vision and --train-vision")
    if config.method == "full":
        lora_only = [*lora_settings, *(name for name in ("lora_experts", "train_router", "lora_vision")
                                       if getattr(config.parts, name))]  # fmt: skip
        given = ["--" + name.replace("_", "-") for name in lora_only]
        if given:
            raise ValueError(
                f"{', '.join(given)}: LoRA settings, ignored by --method full, which trains every language-model "
                "weight (routed experts and routers included); drop them (for the vision tower: --train-vision)"
            )
        if config.dtype == "bfloat16":
            raise ValueError(
                "--method full keeps float32 master weights (bf16 mixed precision on a GPU is automatic): drop "
                "--dtype bfloat16, whose pure bf16 weights would lose small updates to rounding"
            )


def run_record(config: FinetuneConfig) -> dict[str, Any]:
    """The settings a checkpoint's weights and optimizer state depend on. The optimizer and learning rate are here as
    Trainer resumes them from the checkpoint: another --optim fails in torch, another --lr is silently not used."""
    record = {"method": config.method, "model": model_reference(config.model), "optimizer": config.optimizer,
              "learning_rate": config.learning_rate}  # fmt: skip
    if config.method != "full":
        record["lora_rank"] = config.lora_rank
    return record | {"parts": asdict(config.parts)}


def prepare_output(config: FinetuneConfig) -> str | None:
    """Check --output before anything loads; the checkpoint to resume from (None for a fresh run).

    A fresh run needs an empty or new folder: Trainer would mix its checkpoints with a previous run's, and
    --resume would later pick the highest-numbered one, whichever run it came from.
    """
    output = Path(config.output)
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {str(output)!r} is a file; give a folder for the adapter and checkpoints")
    if not config.resume:
        if output.is_dir() and any(output.iterdir()):
            raise ValueError(
                f"--output {str(output)!r} is not empty (a previous run?); choose a new folder, or pass --resume to "
                "continue the run saved there"
            )
        return None
    if config.resume is True:
        checkpoint = get_last_checkpoint(str(output)) if output.is_dir() else None
        if checkpoint is None:
            raise ValueError(f"--resume: no {PREFIX_CHECKPOINT_DIR}-N folder in {str(output)!r} to continue from")
    else:
        checkpoint = str(config.resume)
        if not Path(checkpoint).is_dir():
            raise ValueError(f"--resume {checkpoint!r} is not a folder; pass a {PREFIX_CHECKPOINT_DIR}-N folder")
    check_checkpoint(Path(checkpoint), config)
    return checkpoint


def check_checkpoint(checkpoint: Path, config: FinetuneConfig, layout: dict[str, Any] | None = None) -> None:
    """The checkpoint must come from a run like this one (another method or model would fail to load or mix runs)
    and be whole: Trainer writes trainer_state.json after the weights and optimizer state, so a run stopped while
    saving leaves a checkpoint without it (and maybe with cut-off weights). ``layout``: the trainer's
    (``FinetuneTrainer.layout``), once it is built."""
    record_file, ours = checkpoint / RUN_FILE, run_record(config) | (layout or {})
    if record_file.is_file():
        saved = json.loads(record_file.read_text(encoding="utf-8"))
    elif (checkpoint / "adapter_config.json").is_file():  # from before run records: its files tell the method
        saved = {"method": "lora or qlora"} if config.method == "full" else {}
    else:
        saved = {"method": "full"} if (checkpoint / "config.json").is_file() and config.method != "full" else {}
    differ = [
        f"{key} {saved[key]!r} (this run: {value!r})" for key, value in ours.items() if saved.get(key, value) != value
    ]
    if differ:
        raise ValueError(
            f"cannot resume from {str(checkpoint)!r}: it was trained with {'; '.join(differ)}; resume with the same "
            "settings (global batch: --batch-size x --grad-accum x processes), or start a new run in an empty --output"
        )
    if not (checkpoint / TRAINER_STATE_NAME).is_file():
        whole = [path for path in sort_checkpoints(str(checkpoint.parent)) if Path(path, TRAINER_STATE_NAME).is_file()]
        earlier = f" (the latest whole one: {whole[-1]})" if whole else ""
        raise ValueError(
            f"cannot resume from {str(checkpoint)!r}: it is incomplete, with no {TRAINER_STATE_NAME} (the run stopped "
            f"while saving it?); delete it and resume from an earlier checkpoint{earlier}"
        )


def check_random_state(checkpoint: Path, processes: int, config: FinetuneConfig) -> None:
    """Trainer restores each process's random state from the file that process saved: resumed on another number of
    processes, LoRA dropout draws its masks from other random streams than the run that saved the checkpoint."""
    saved = len(list(checkpoint.glob("rng_state_*.pth"))) or 1
    if saved != processes and config.method != "full" and config.lora_dropout > 0:
        warnings.warn(
            f"resuming {str(checkpoint)!r}, saved by {saved} process(es), on {processes}: the data order, optimizer "
            f"state and step carry over, but the dropout masks (--lora-dropout {config.lora_dropout}) come from "
            "other random streams than in an uninterrupted run",
            stacklevel=2,
        )


def resolve_dtype(name: str, method: str) -> torch.dtype:
    """auto: bf16 weights for LoRA on a GPU (LoRA weights stay fp32), fp32 master weights for full fine-tuning."""
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if torch.cuda.is_available() and method != "full" else torch.float32


def check_base_weights(folder: Path, method: str) -> None:
    """A checkpoint saved quantized trains only as QLoRA's own nf4 base: peft has no LoRA layer for the int8 / int4
    modules, and their integer weights cannot take full fine-tuning's updates."""
    from deepseek_vl.chat import saved_quantization

    saved = saved_quantization(folder)
    if saved is not None and not (method == "qlora" and saved == "nf4"):
        raise ValueError(
            f"{folder} holds {saved} weights, which --method {method} cannot train: fine-tune the full-precision "
            "model (--method qlora quantizes it to nf4 itself), then quantize the merged result"
        )


def load_model(config: FinetuneConfig, processor=None):
    """The base model (4-bit NF4 for QLoRA) wrapped for the method, and its processor (loaded unless given)."""
    from deepseek_vl.chat import resolve_model_folder
    from deepseek_vl.models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor

    check_config(config)
    set_seed(config.seed)  # the LoRA initialisation is random: same seed, same run, however many processes
    folder = resolve_model_folder(config.model)
    check_base_weights(folder, config.method)
    processor = processor or DeepseekVLV2Processor.from_pretrained(folder)
    dtype = resolve_dtype(config.dtype, config.method)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if config.method == "qlora":  # deepseek_vl.quantization's nf4: bitsandbytes Linear4bit (CPU or CUDA)
        check_qlora()
        kwargs.update(quantize="nf4", device_map=str(PartialState().device))  # this process's GPU, or the CPU
    model = DeepseekVLV2ForCausalLM.from_pretrained(folder, **kwargs)
    model.config.use_cache = False
    # recorded in the adapter as its base model: a relative folder would not resolve from elsewhere
    model.name_or_path = model.config._name_or_path = model_reference(config.model)
    if config.method == "qlora":
        # peft wraps a Linear4bit with its 4-bit LoRA layer (whose merge dequantizes) only on a model marked so. Not
        # peft's prepare_model_for_kbit_training: it would upcast the unquantized vision tower, embeddings and lm_head
        # to float32; norms and routers already compute in float32, and Trainer's non-reentrant checkpointing needs
        # no input gradients.
        model.is_loaded_in_4bit = True
    if config.method == "full":
        return prepare_full(model, config.parts), processor
    return apply_lora(model, config.parts, config.lora_rank, config.lora_alpha, config.lora_dropout), processor


def check_qlora() -> None:
    """QLoRA's 4-bit NF4 base needs bitsandbytes: say what to install instead of failing deep in the loader."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("--method qlora needs bitsandbytes: pip install 'deepseek-vl2[train]'") from None


def training_arguments(config: FinetuneConfig, has_eval: bool) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=config.output,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        optim=config.optimizer,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        lr_scheduler_type="cosine",
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps or config.save_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        label_names=["labels"],
        prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=config.num_workers,
        report_to="none",
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
        fsdp=config.fsdp,
        fsdp_config=FSDP_CONFIG if config.fsdp else None,
        deepspeed=config.deepspeed,
    )


class FinetuneTrainer(Trainer):
    """Trainer whose N processes and accumulated micro-batches make one process's step on the whole batch, whose FSDP
    also runs on CPU processes (gloo), and whose processes all run the vision tower each step.

    accelerate evens out an epoch's (or the eval set's) last global batch by repeating rows from its start on the
    processes that have too few: those rows would be trained (and evaluated) twice. They are cut off here; a process
    left with none keeps one row without labels, whose gradient is zero, to stay in step with the others' collectives.
    The MoE balance loss, a mean over rows that each micro-batch adds as a gradient, is weighted by the micro-batch's
    share of the step's rows; the eval loss is the mean over every label token of the eval set.

    accelerate 1.16 only switches to FSDP for accelerator devices (AcceleratorState: the ``fsdp_plugin`` is taken in
    the MULTI_GPU/NPU/XPU/... branch); on MULTI_CPU it drops the plugin and silently wraps the model in DDP instead.
    torch's FSDP2 ``fully_shard`` itself works on CPU with gloo, so the state is switched to FSDP here.

    A process whose batch has no image would skip the vision tower, while the others run it: sharded vision blocks
    gather their weights collectively (FSDP), and trained vision or projector weights reduce their gradients
    collectively (DDP), so either would wait for ever. Then every process runs it (``vision_in_lockstep``).
    """

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        on_cpu = state.distributed_type == DistributedType.MULTI_CPU
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled and on_cpu:
            state.distributed_type = DistributedType.FSDP  # also in PartialState, which every new AcceleratorState copies
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True
        unwrapped = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        trains_vision = any(p.requires_grad for name, p in unwrapped.named_parameters()
                            if name.startswith(("vision.", "projector.")))  # fmt: skip
        if self.is_fsdp_enabled or (self.args.world_size > 1 and trains_vision):
            unwrapped.vision_in_lockstep = True
        self.moe_layers = [module for module in unwrapped.modules() if isinstance(module, DeepseekV2MoE)]
        self.step_rows = 0  # the rows of the current optimizer step, over its micro-batches and processes
        self.eval_totals = torch.zeros(2, dtype=torch.float64)  # summed eval loss, label tokens

    def layout(self) -> dict[str, Any]:
        """What a checkpoint of this run resumes into: the same engine, whose checkpoint files differ (a DDP one is a
        1-process one), and the same global batch, since Trainer finds the rows already trained by counting batches
        (another size would skip rows or train them twice). ZeRO's optimizer state is split over the processes: for
        DeepSpeed, the same number of processes too (FSDP's checkpoint holds the whole state)."""
        engine = "deepspeed" if self.is_deepspeed_enabled else "fsdp" if self.is_fsdp_enabled else "ddp"
        args = self.args
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        layout = {"engine": engine, "global_batch": batch}
        return layout | ({"processes": args.world_size} if engine == "deepspeed" else {})

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """torch cannot load an FSDP optimizer state that holds no tensor (AssertionError "Expected device to be
        set"), as plain SGD's: there, only the learning-rate schedule is restored, into the optimizer too."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # under accelerate's wrapper
        stateless = isinstance(optimizer, torch.optim.SGD) and not any(g["momentum"] for g in optimizer.param_groups)
        if checkpoint is None or not (self.is_fsdp_enabled and stateless):
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.lr_scheduler.load_state_dict(torch.load(Path(checkpoint, SCHEDULER_NAME), weights_only=True))
        for group, rate in zip(optimizer.param_groups, self.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = rate

    def without_repeats(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch without the rows accelerate repeated into the dataloader's last global batch (see the class)."""
        state = self.accelerator.gradient_state
        if self.args.world_size == 1 or not state.end_of_dataloader or state.remainder <= 0:
            return batch
        size = len(batch["labels"])  # every process's batch is full, repeats included
        real = min(max(state.remainder - self.args.process_index * size, 0), size)
        kept = {key: value[: max(real, 1)] for key, value in batch.items()}
        if not real:
            kept["labels"] = torch.full_like(kept["labels"], -100)
        return kept

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The step's micro-batches (repeats cut off) and their label tokens; their rows, all processes', in step_rows."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(self.without_repeats(next(epoch_iterator)))
            except StopIteration:
                break
        rows = torch.tensor(sum(labelled_rows(batch) for batch in batches), device=device)
        self.step_rows = int(self.accelerator.reduce(rows, "sum")) if self.args.world_size > 1 else int(rows)
        return batches, self._get_num_items_in_batch(batches, device)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Weights the balance loss by this micro-batch's share of the step's rows, times the processes (whose
        gradients are averaged): the micro-batches then add up to one process's balance loss on the whole batch."""
        share = labelled_rows(inputs) * self.args.world_size / max(self.step_rows, 1)
        for moe in self.moe_layers:
            moe.aux_loss_weight = share
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            for moe in self.moe_layers:
                moe.aux_loss_weight = 1.0

    def _track_num_input_tokens(self, inputs: dict[str, torch.Tensor]) -> None:
        """Trainer's count of the tokens trained (tokens/s), the stand-in row's left out."""
        labelled = (inputs["labels"] != -100).any(dim=1)
        super()._track_num_input_tokens({key: inputs[key][labelled] for key in ("input_ids", "attention_mask")})

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):  # fmt: skip
        """Trainer's loop with the loss over every label token of the eval set. Trainer's own is a mean of batch
        means: it changes with the batch size and the number of processes, and counts the repeated rows."""
        self.eval_totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        totals = self.accelerator.reduce(self.eval_totals, "sum") if self.args.world_size > 1 else self.eval_totals
        output.metrics[f"{metric_key_prefix}_loss"] = (totals[0] / totals[1]).item()
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """The batch's loss summed over its label tokens (repeats cut off), added with their count to eval_totals."""
        inputs = self.without_repeats(self._prepare_inputs(inputs))
        with torch.no_grad():
            total = model(**inputs, num_items_in_batch=1).loss.detach()
        count = (inputs["labels"][:, 1:] != -100).sum()
        self.eval_totals += torch.stack([total.double(), count.double()])
        return total, None, None


def labelled_rows(batch: dict[str, torch.Tensor]) -> int:
    """Rows with an answer to learn: all but the stand-in row of a process that has none (every real row has one)."""
    return int((batch["labels"] != -100).any(dim=1).sum())


def build_trainer(
    config: FinetuneConfig, model, processor, train: list[Example], evaluation: list[Example] | None
) -> Trainer:
    context = model.config.language_config.max_position_embeddings
    trainer = FinetuneTrainer(
        model=model,
        args=training_arguments(config, bool(evaluation)),
        data_collator=Collator(processor, config.max_length, context),
        train_dataset=train,
        eval_dataset=evaluation or None,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LineProgress())
    trainer.add_callback(RunCallback(run_record(config) | trainer.layout()))
    return trainer


def finetune(config: FinetuneConfig, train: list[Example], evaluation: list[Example] | None = None) -> Summary:
    """Check, train, save the adapter (or the full model) and the processor to config.output, and summarise.

    Every row is tokenised (images decoded, lengths checked against --max-length and the model's context) before
    the model loads: a bad row would otherwise stop the run when it comes up, with nothing saved.
    """
    from deepseek_vl.chat import resolve_model_folder
    from deepseek_vl.models import DeepseekVLV2Processor

    check_config(config)
    checkpoint = prepare_output(config)
    folder = resolve_model_folder(config.model)
    check_base_weights(folder, config.method)  # before the rows are checked, which can take minutes
    processor = DeepseekVLV2Processor.from_pretrained(folder)
    collator = Collator(processor, config.max_length, context_length(folder))
    # one bar under torchrun; not PartialState(), which would set up the distributed state before TrainingArguments
    # gives it its settings
    first = os.environ.get("RANK", "0") == "0"
    _, problems = check_rows(collator, [*train, *(evaluation or [])], progress=first)
    if problems:
        raise DataError(problems)
    model, processor = load_model(config, processor)
    trainer = build_trainer(config, model, processor, train, evaluation)
    if checkpoint:
        check_checkpoint(Path(checkpoint), config, trainer.layout())
        check_random_state(Path(checkpoint), trainer.args.world_size, config)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - start
    trainer.save_model(config.output)
    if trainer.is_world_process_zero():
        processor.save_pretrained(config.output)
        write_run_record(Path(config.output), run_record(config))
        if config.method == "full":  # a model folder, read by the official code as well (as merge writes it)
            add_official_dtype_key(Path(config.output) / "config.json", resolve_dtype(config.dtype, config.method))
    state = trainer.state
    evaluated = [entry for entry in state.log_history if "eval_loss" in entry]
    if not evaluation:
        eval_loss = None
    elif evaluated and evaluated[-1]["step"] == state.global_step:  # Trainer just evaluated the final weights
        eval_loss = evaluated[-1]["eval_loss"]
    else:
        eval_loss = trainer.evaluate()["eval_loss"]
    trainable, total = count_parameters(model)
    run = next(callback for callback in trainer.callback_handler.callbacks if isinstance(callback, RunCallback))
    tokens = int(state.num_input_tokens_seen) - run.start_tokens
    losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
    return Summary(
        trainable_parameters=trainable,
        total_parameters=total,
        steps=state.global_step - run.start_step,
        train_loss=result.training_loss,
        tokens=tokens,
        tokens_per_second=tokens / seconds if seconds else math.nan,
        peak_memory_bytes=peak_memory(),
        seconds=seconds,
        eval_loss=eval_loss,
        last_loss=losses[-1] if losses else math.nan,
        start_step=run.start_step,
        final_step=state.global_step,
    )


def write_run_record(folder: Path, record: dict[str, Any]) -> None:
    (folder / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


class RunCallback(TrainerCallback):
    """Remembers where this run started (for the summary after --resume), logs the final step's loss even when it
    is not a --logging-steps multiple, and writes the run record into each checkpoint (checked by --resume)."""

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.start_step = self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step, self.start_tokens = state.global_step, int(state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            write_run_record(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", self.record)


def peak_memory() -> int:
    """Peak GPU memory allocated on CUDA, else the process's peak resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class LineProgress(ProgressCallback):
    """The progress bar, with one readable line per logging step (loss, eval loss, lr) instead of a dict."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        fields = [f"step {state.global_step}/{state.max_steps}"]
        for key, label in (("loss", "loss"), ("eval_loss", "eval loss"), ("learning_rate", "lr"),
                           ("grad_norm", "grad norm")):  # fmt: skip
            if key in logs:
                fields.append(f"{label} {logs[key]:.4g}")
        if len(fields) > 1:
            write = self.training_bar.write if self.training_bar is not None else print
            write("  ".join(fields))


def format_summary(summary: Summary, output: str) -> str:
    share = summary.trainable_parameters / max(summary.total_parameters, 1)
    resumed = f" (resumed at step {summary.start_step}, now at {summary.final_step})" if summary.start_step else ""
    lines = [
        f"trained {summary.steps} steps{resumed} in {summary.seconds:.1f} s; last train loss {summary.last_loss:.4f}, "
        f"mean over this run {summary.train_loss:.4f}"
        + (f"; eval loss {summary.eval_loss:.4f}" if summary.eval_loss is not None else ""),
        f"trainable parameters {summary.trainable_parameters:,} of {summary.total_parameters:,} ({share:.2%})",
        (
            f"{summary.tokens:,} tokens, {summary.tokens_per_second:,.1f} tokens/s; peak memory "
            f"{summary.peak_memory_bytes / 2**30:.2f} GiB"
        ),
        f"saved to {Path(output).resolve()}",
    ]
    return "\n".join(lines)
