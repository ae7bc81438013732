"""One fine-tuning run for tests/test_train_dist_review.py:
`torchrun --nproc-per-node N tests/train_dist_review_worker.py SPEC`.

SPEC is a JSON file: `data`, `output` and FinetuneConfig fields (`batch_size`, `grad_accum`, `max_steps`, `epochs`,
`method`, `fsdp`, `deepspeed`, `resume`, ...) plus optional `eval_data` and `aux_loss_alpha` (the MoE balance loss
weight, raised so that its share of the update shows above float32 noise). Plain SGD and no warm-up or dropout: the
update is the gradient, so equal gradients give equal weights. The run is `finetune`'s, as the CLI runs it (checks,
--resume, saving); the rank-0 process writes OUTPUT/result.json: the log history, the final eval loss, the lengths of
the rows each process trained on, or, when finetune refuses the run, its message as `error`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from golden import checkpoint  # noqa: E402

import deepseek_vl.train.trainer as training  # noqa: E402
from deepseek_vl.train.data import read_jsonl  # noqa: E402

torch.set_num_threads(1)
spec = json.loads(Path(sys.argv[1]).read_text())
data, evaluation = read_jsonl(spec.pop("data")), spec.pop("eval_data", None)
evaluation = read_jsonl(evaluation) if evaluation else None
alpha = spec.pop("aux_loss_alpha", None)
settings = dict(model=str(checkpoint("tiny")), learning_rate=0.05, optimizer="sgd", logging_steps=1, save_steps=100,
                warmup_ratio=0.0, lora_dropout=0.0)  # fmt: skip
config = training.FinetuneConfig(**(settings | spec))
seen: list[int] = []  # the length (tokens) of each row this process trained on: the rows have different lengths
built = []
build_trainer = training.build_trainer


def recording_build(config, model, *args):
    """finetune's trainer, with the balance loss weight set and each trained row recorded."""
    if alpha is not None:
        (
            model.get_base_model() if hasattr(model, "get_base_model") else model
        ).config.language_config.aux_loss_alpha = alpha
    trainer = build_trainer(config, model, *args)
    train_step = trainer.training_step

    def recording_step(model, inputs, num_items_in_batch=None):
        labelled = (inputs["labels"] != -100).any(dim=1)
        seen.extend(inputs["attention_mask"][labelled].sum(dim=1).tolist())
        return train_step(model, inputs, num_items_in_batch)

    trainer.training_step = recording_step
    built.append(trainer)
    return trainer


training.build_trainer = recording_build
try:
    summary = training.finetune(config, data, evaluation)
except ValueError as error:  # a refused run: every process refuses it alike
    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(config.output) / "result.json").write_text(json.dumps({"error": str(error)}))
    sys.exit(0)
trainer = built[0]
everyone = [None] * trainer.args.world_size
if dist.is_initialized():
    dist.all_gather_object(everyone, seen)
else:
    everyone = [seen]
if trainer.is_world_process_zero():
    result = {"world": trainer.args.world_size, "log": trainer.state.log_history, "eval_loss": summary.eval_loss,
              "rows": everyone, "tokens": trainer.state.num_input_tokens_seen,
              "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]}  # fmt: skip
    (Path(config.output) / "result.json").write_text(json.dumps(result))
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
