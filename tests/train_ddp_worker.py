"""One LoRA fine-tuning run for the data-parallel tests: `torchrun --nproc-per-node N tests/train_ddp_worker.py DATA OUT B MODE [vision]`.

B is the per-process batch; MODE `fsdp` shards the model with the `finetune --fsdp` configuration, `zero2` runs it
under DeepSpeed ZeRO-2 (`finetune --deepspeed`, the config below), `ddp` is plain data parallel; `vision` also trains the vision tower (LoRA, `--lora-vision`) and the projector (fully, `--train-projector`). The
rank-0 process writes OUT/result.json (losses) and the adapter to OUT. Plain SGD: Adam's first steps are
sign(gradient), which turns float32 rounding noise in near-zero gradients into full steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import FSDPModule

sys.path.insert(0, str(Path(__file__).parent))
from golden import checkpoint  # noqa: E402

from deepseek_vl.train.data import read_jsonl  # noqa: E402
from deepseek_vl.train.lora import TrainableParts  # noqa: E402
from deepseek_vl.train.trainer import FinetuneConfig, build_trainer, load_model  # noqa: E402

torch.set_num_threads(1)
data, output, batch = read_jsonl(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
mode, vision = sys.argv[4], sys.argv[5:] == ["vision"]
ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
         "zero_allow_untested_optimizer": True}  # the README's config
deepspeed = output / "zero2.json" if mode == "zero2" else None  # "auto": filled in from the Trainer's arguments
if deepspeed:
    output.mkdir(parents=True, exist_ok=True)
    deepspeed.write_text(json.dumps(ZERO2))
config = FinetuneConfig(model=str(checkpoint("tiny")), output=str(output), max_steps=3, batch_size=batch,
                        learning_rate=0.05, optimizer="sgd", logging_steps=1, save_steps=100, warmup_ratio=0.0, lora_dropout=0.0, fsdp=mode == "fsdp",
                        deepspeed=str(deepspeed) if deepspeed else None,
                        parts=TrainableParts(lora_vision=vision, train_projector=vision))
model, processor = load_model(config)
trainer = build_trainer(config, model, processor, data, None)
trainer.train()
trainer.save_model(str(output))
if trainer.is_world_process_zero():
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    units = [type(module).__name__ for module in trainer.model.modules() if isinstance(module, FSDPModule)]
    engine = trainer.model_wrapped
    zero = engine.zero_optimization_stage() if type(engine).__name__ == "DeepSpeedEngine" else None
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    (output / "result.json").write_text(json.dumps({"losses": losses, "world": trainer.args.world_size, "fsdp_units": units,
                                                    "zero_stage": zero, "backend": backend, "log": trainer.state.log_history}))
