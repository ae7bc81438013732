"""Accumulated and data-parallel fine-tuning equal one process on the whole batch: rows with very different answer
lengths, an image in some rows only, the MoE balance loss raised so that its share of the update shows, a dataset
that does not divide into the global batch (accelerate would repeat rows), and the eval loss. --resume on the same or
another number of processes, the adapters and full models that DDP, FSDP and ZeRO-2 runs save, QLoRA on 2 processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from golden import GOLDEN, checkpoint

pytest.importorskip("peft")

from deepseek_vl.train.collate import Collator  # noqa: E402
from deepseek_vl.train.data import parse_row, read_jsonl  # noqa: E402
from deepseek_vl.train.trainer import RUN_FILE, FinetuneConfig, build_trainer, finetune, load_model  # noqa: E402

TINY = checkpoint("tiny")
IMAGE = GOLDEN / "images" / "tiny_8x8.png"
STORY = ("Once upon a time there was a small square of eight by eight pixels that wanted to become a large photograph "
         "of giraffes on the savanna, and it trained every day until it could.")  # fmt: skip
ROWS = [  # label tokens: 3, 39, 3 (an image in the first row only)
    {"messages": [{"role": "user", "content": "<image>\nDescribe this picture.", "images": [str(IMAGE)]},
                  {"role": "assistant", "content": "Yes."}]},
    {"messages": [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": STORY}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
]  # fmt: skip
EVAL_ROWS = [ROWS[2], ROWS[1], ROWS[0]]
ALPHA = 0.1  # the balance loss weight (0.001 in the released models): its gradient then moves the weights visibly


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def lora_run(output: Path, data, evaluation=None, **overrides):
    """An in-process LoRA run, plain SGD without warm-up or dropout (the update is the gradient): the trainer and the
    trained weights."""
    settings = dict(model=str(TINY), output=str(output), max_steps=2, learning_rate=0.05, optimizer="sgd",
                    logging_steps=1, save_steps=100, warmup_ratio=0.0, lora_dropout=0.0)  # fmt: skip
    config = FinetuneConfig(**(settings | overrides))
    model, processor = load_model(config)
    model.get_base_model().config.language_config.aux_loss_alpha = ALPHA
    trainer = build_trainer(config, model, processor, data, evaluation)
    trainer.train()
    return trainer, {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_accumulated_micro_batches_make_the_whole_batch_step_balance_loss_included(tmp_path: Path) -> None:
    """--grad-accum 2 --batch-size 1 == --batch-size 2. Each micro-batch added its balance-loss gradient at full
    weight, so accumulating N micro-batches counted it N times (the language-model loss was right)."""
    data = read_jsonl(write_jsonl(tmp_path / "train.jsonl", ROWS[:2]))
    whole, expected = lora_run(tmp_path / "whole", data, batch_size=2)
    accumulated, got = lora_run(tmp_path / "accumulated", data, batch_size=1, grad_accum=2)
    losses = [[entry["loss"] for entry in t.state.log_history if "loss" in entry] for t in (whole, accumulated)]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), atol=1e-5, rtol=1e-5)
    assert max(float(v.abs().max()) for k, v in expected.items() if "lora_B" in k) > 1e-3  # it trained
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, atol=1e-5, rtol=1e-4, msg=name)
    assert all(moe.aux_loss_weight == 1.0 for moe in accumulated.moe_layers)  # the model is left as loaded


def test_eval_loss_is_the_label_token_mean_over_the_eval_set_whatever_the_batch(tmp_path: Path, processor) -> None:
    """Trainer's eval loss is a mean of batch means: with a 3-token and a 39-token answer in different batches it
    changed with --batch-size. Now: the summed loss over every label token of the set, divided by their number."""
    data = read_jsonl(write_jsonl(tmp_path / "train.jsonl", ROWS[:1]))
    evaluation = read_jsonl(write_jsonl(tmp_path / "val.jsonl", EVAL_ROWS))
    trainer, _ = lora_run(tmp_path / "out", data, evaluation, max_steps=1)
    model = trainer.model.eval()
    collator = Collator(processor)
    with torch.no_grad():
        total, count = 0.0, 0
        for row in evaluation:  # one row at a time: each row's summed loss
            batch = collator([row])
            total += model(**batch, num_items_in_batch=1).loss.item()
            count += int((batch["labels"][:, 1:] != -100).sum())
    for batch_size in (1, 2, 3):
        trainer.args.per_device_eval_batch_size = batch_size
        assert trainer.evaluate()["eval_loss"] == pytest.approx(total / count, rel=1e-5), batch_size


@pytest.fixture(scope="module")
def processor():
    from deepseek_vl.models import DeepseekVLV2Processor

    return DeepseekVLV2Processor.from_pretrained(TINY)


def torchrun(spec: dict, processes: int) -> tuple[dict, dict | None]:
    """tests/train_dist_review_worker.py under torchrun: (its result.json, the saved adapter or full model weights;
    None for a refused run). OUTPUT may hold the checkpoint to --resume from."""
    output = Path(spec["output"])
    output.mkdir(parents=True, exist_ok=True)
    spec_file = output.with_suffix(".json")
    spec_file.write_text(json.dumps(spec))
    worker = Path(__file__).with_name("train_dist_review_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               str(worker), str(spec_file)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((output / "result.json").read_text())
    if "error" in result:
        return result, None
    weights = output / "adapter_model.safetensors"
    return result, load_file(weights if weights.is_file() else output / "model.safetensors")


@pytest.mark.slow  # two torchrun launches: about 40 s on 2 cores
def test_two_processes_on_rows_that_do_not_fill_the_last_global_batch_equal_one_process(tmp_path: Path) -> None:
    """3 rows, 2 processes x 1 row == 1 process x 2 rows, over a whole epoch with an eval after each step.

    accelerate filled the last global batch by repeating the epoch's first row on the second process: that row was
    trained twice (its tokens counted twice in the loss) and the eval loss counted a repeated row as well.
    """
    data, evaluation = write_jsonl(tmp_path / "train.jsonl", ROWS), write_jsonl(tmp_path / "val.jsonl", EVAL_ROWS)
    spec = {"data": str(data), "eval_data": str(evaluation), "epochs": 1, "eval_steps": 1, "aux_loss_alpha": ALPHA}
    one, weights_one = torchrun(spec | {"output": str(tmp_path / "one"), "batch_size": 2}, processes=1)
    two, weights_two = torchrun(spec | {"output": str(tmp_path / "two"), "batch_size": 1}, processes=2)
    assert two["world"] == 2 and len(one["losses"]) == len(two["losses"]) == 2
    trained = [sorted(length for process in run["rows"] for length in process) for run in (one, two)]
    assert len(set(trained[0])) == 3 and trained[1] == trained[0], two["rows"]  # every row once, none twice
    assert two["tokens"] == one["tokens"]
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    evals = [[entry["eval_loss"] for entry in run["log"] if "eval_loss" in entry] for run in (one, two)]
    torch.testing.assert_close(torch.tensor(evals[1]), torch.tensor(evals[0]), atol=1e-5, rtol=1e-5)
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_resume_refuses_another_global_batch_or_engine_and_takes_the_same_batch_accumulated(tmp_path: Path) -> None:
    """Trainer finds the rows a checkpoint has trained by counting batches: resumed with another global batch
    (--batch-size x --grad-accum x processes) it skipped the wrong rows, on another learning-rate schedule, silently.
    A checkpoint of another engine (FSDP, DeepSpeed: other files) failed deep in Trainer or torch after the model
    loaded. Both are refused, naming the setting; the same global batch made another way resumes, with a warning
    when dropout's random streams cannot carry over to another number of processes."""
    data = read_jsonl(write_jsonl(tmp_path / "train.jsonl", ROWS))
    settings = {"model": str(TINY), "output": str(tmp_path / "out"), "max_steps": 1, "batch_size": 2, "save_steps": 1,
                "learning_rate": 0.05, "optimizer": "sgd", "warmup_ratio": 0.0, "lora_dropout": 0.0}  # fmt: skip
    finetune(FinetuneConfig(**settings), data)
    resumed = settings | {"max_steps": 2, "resume": True}
    with pytest.raises(ValueError, match=r"global_batch 2 \(this run: 1\).*--batch-size x --grad-accum x processes"):
        finetune(FinetuneConfig(**resumed | {"batch_size": 1}), data)
    record = tmp_path / "out" / "checkpoint-1" / RUN_FILE
    saved = record.read_text()
    assert json.loads(saved)["engine"] == "ddp"
    record.write_text(json.dumps(json.loads(saved) | {"engine": "fsdp"}))
    with pytest.raises(ValueError, match=r"engine 'fsdp' \(this run: 'ddp'\)"):
        finetune(FinetuneConfig(**resumed), data)
    record.write_text(saved)
    rng = tmp_path / "out" / "checkpoint-1" / "rng_state.pth"
    for process in (0, 1):  # as 2 processes save it
        shutil.copyfile(rng, rng.with_name(f"rng_state_{process}.pth"))
    rng.unlink()
    with pytest.warns(UserWarning, match=r"saved by 2 process\(es\), on 1: .* dropout masks"):
        summary = finetune(FinetuneConfig(**resumed | {"batch_size": 1, "grad_accum": 2, "lora_dropout": 0.1}), data)
    assert (summary.start_step, summary.final_step) == (1, 2)


ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
         "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
         "zero_allow_untested_optimizer": True}  # the README's config  # fmt: skip


def answer_logits(chat) -> torch.Tensor:
    """The model's logits over the image row and the story row, batched (right-padded)."""
    rows = [parse_row(json.dumps(row), line, IMAGE.parent) for line, row in enumerate(ROWS[:2], 1)]
    batch = Collator(chat.processor)(rows)
    with torch.no_grad():
        return chat.model(**{key: value for key, value in batch.items() if key != "labels"}).logits


@pytest.mark.slow  # seven torchrun launches: about 110 s on 2 cores
def test_resumed_two_process_runs_and_other_process_counts_continue_the_uninterrupted_run(tmp_path: Path) -> None:
    """3 rows, a global batch of 2, 3 steps (the second fills the epoch's last global batch), resumed after step 1 or 2.

    FSDP 2 -> 2 failed: torch cannot load an FSDP optimizer state that holds no tensor (plain SGD's). DDP 1 -> 2 and
    2 -> 1 (with --grad-accum 2) and ZeRO-2 2 -> 2 each continue with the uninterrupted run's rows, losses and
    weights. The adapters saved by the FSDP and ZeRO-2 runs load (VLChat ``adapter=``) and merge into the
    1-process run's model.
    """
    pytest.importorskip("deepspeed")
    from deepseek_vl.chat import VLChat
    from deepseek_vl.train.merge import merge_to_checkpoint

    zero2 = tmp_path / "ds_config.json"
    zero2.write_text(json.dumps(ZERO2))
    spec = {"data": str(write_jsonl(tmp_path / "train.jsonl", ROWS)), "max_steps": 3, "save_steps": 1,
            "aux_loss_alpha": ALPHA}  # fmt: skip
    runs = {}

    def run(name: str, processes: int, resume: Path | None = None, **settings) -> None:
        output = tmp_path / name
        if resume is not None:
            shutil.copytree(resume, output / resume.name)
            settings["resume"] = str(output / resume.name)
        runs[name] = torchrun(spec | settings | {"output": str(output)}, processes)

    run("one", 1, batch_size=2)
    run("fsdp", 2, batch_size=1, fsdp=True)
    run("fsdp 2 -> 2", 2, tmp_path / "fsdp" / "checkpoint-1", batch_size=1, fsdp=True)
    run("ddp 1 -> 2", 2, tmp_path / "one" / "checkpoint-1", batch_size=1)
    run("ddp 2 -> 1", 1, tmp_path / "ddp 1 -> 2" / "checkpoint-2", batch_size=1, grad_accum=2)
    run("zero2", 2, batch_size=1, deepspeed=str(zero2))
    run("zero2 2 -> 2", 2, tmp_path / "zero2" / "checkpoint-1", batch_size=1, deepspeed=str(zero2))
    one, expected = runs.pop("one")
    trained = one["rows"][0]  # the rows of steps 1, 2 and 3: 2, 1 and 2 of them
    assert len(trained) == 5 and max(float(v.abs().max()) for k, v in expected.items() if "lora_B" in k) > 1e-3
    for name, (result, weights) in runs.items():
        assert "error" not in result, (name, result)
        done = 3 if "2 -> 1" in name else 2 if "->" in name else 0  # rows trained before the checkpoint
        assert sorted(length for rows in result["rows"] for length in rows) == sorted(trained[done:]), name
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5,
                                   msg=name)  # fmt: skip
        for key, value in expected.items():
            torch.testing.assert_close(weights[key], value, atol=1e-5, rtol=1e-4, msg=f"{name}: {key}")
    reference = answer_logits(VLChat.from_pretrained(TINY, device="cpu", dtype="float32", adapter=tmp_path / "one"))
    for name in ("fsdp", "zero2"):
        adapter = VLChat.from_pretrained(TINY, device="cpu", dtype="float32", adapter=tmp_path / name)
        merged = merge_to_checkpoint(tmp_path / name, tmp_path / f"{name} merged", dtype="float32")
        for chat in (adapter, VLChat.from_pretrained(merged, device="cpu", dtype="float32")):
            torch.testing.assert_close(answer_logits(chat), reference, atol=1e-4, rtol=1e-4, msg=name)


def changed_official_entries(official: dict, saved: dict, prefix: str = "") -> list[str]:
    """The official config's entries missing from a saved config or changed in it (its dtype aside)."""
    changed = []
    for key, value in official.items():
        if key in ("torch_dtype", "transformers_version"):
            continue
        if isinstance(value, dict) and isinstance(saved.get(key), dict):
            changed += changed_official_entries(value, saved[key], f"{prefix}{key}.")
        elif saved.get(key, ...) != value:
            changed.append(f"{prefix}{key}")
    return changed


@pytest.mark.slow  # five torchrun launches: about 75 s on 2 cores
def test_full_and_qlora_fine_tuning_on_two_processes_equal_one_process(tmp_path: Path) -> None:
    """--method full under DDP and FSDP saves the 1-process run's model: the official weight names and config (its
    torch_dtype was missing: transformers 5 writes only dtype, the official code reads torch_dtype), loaded by
    AutoModelForCausalLM and VLChat. --method qlora runs on 2 CPU processes (each its own NF4 copy) and equals one."""
    from transformers import AutoModelForCausalLM

    from deepseek_vl.chat import VLChat
    from deepseek_vl.models import DeepseekVLV2ForCausalLM

    spec = {"data": str(write_jsonl(tmp_path / "train.jsonl", ROWS)), "max_steps": 2, "aux_loss_alpha": ALPHA}
    full = spec | {"method": "full", "learning_rate": 0.01}
    one, expected = torchrun(full | {"output": str(tmp_path / "one"), "batch_size": 2}, processes=1)
    official = load_file(TINY / "model.safetensors")
    assert expected.keys() == official.keys()
    assert max(float((expected[key] - official[key].float()).abs().max()) for key in official) > 1e-3  # it trained
    reference = answer_logits(VLChat.from_pretrained(tmp_path / "one", device="cpu", dtype="float32"))
    base_config = json.loads((TINY / "config.json").read_text())
    for mode in ("ddp", "fsdp"):
        folder = tmp_path / mode
        result, weights = torchrun(full | {"output": str(folder), "batch_size": 1, "fsdp": mode == "fsdp"}, processes=2)
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
        assert weights.keys() == official.keys(), mode
        for key, value in expected.items():
            torch.testing.assert_close(weights[key], value, atol=1e-5, rtol=1e-4, msg=f"{mode}: {key}")
        config = json.loads((folder / "config.json").read_text())
        assert changed_official_entries(base_config, config) == [], mode
        assert config["torch_dtype"] == config["language_config"]["torch_dtype"] == "float32"  # the official key
        assert type(AutoModelForCausalLM.from_pretrained(folder)) is DeepseekVLV2ForCausalLM
        logits = answer_logits(VLChat.from_pretrained(folder, device="cpu", dtype="float32"))
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4, msg=mode)
    qlora = spec | {"method": "qlora"}
    one, expected = torchrun(qlora | {"output": str(tmp_path / "qlora one"), "batch_size": 2}, processes=1)
    two, weights = torchrun(qlora | {"output": str(tmp_path / "qlora two"), "batch_size": 1}, processes=2)
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    for key, value in expected.items():
        torch.testing.assert_close(weights[key], value, atol=1e-5, rtol=1e-4, msg=key)
