"""Fine-tuning on the golden Tiny checkpoint: data rows, labels, LoRA targets, a real LoRA run, reload, merge, resume."""

from __future__ import annotations

import codecs
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from golden import GOLDEN, checkpoint, processor_case

pytest.importorskip("peft")

from deepseek_vl.grounding import parse_grounding  # noqa: E402
from deepseek_vl.train.collate import Collator  # noqa: E402
from deepseek_vl.train.data import DataError, grounding_text, read_jsonl, scan_jsonl  # noqa: E402
from deepseek_vl.train.lora import TrainableParts, apply_lora, lora_target_regex  # noqa: E402

TINY = checkpoint("tiny")
IMAGE = GOLDEN / "images" / "tiny_8x8.png"
GIRAFFES = GOLDEN / "images" / "visual_grounding_1.jpeg"  # 724 x 1086


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


TRAIN_ROWS = [
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
    {"messages": [{"role": "user", "content": "<image>\nWhat is this?", "images": [str(IMAGE)]},
                  {"role": "assistant", "content": "A tiny square."}]},
    {"messages": [{"from": "human", "value": "Say hello."}, {"from": "gpt", "value": "Hello there!"}]},
    {"messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two, three."}]},
]  # fmt: skip


@pytest.fixture(scope="module")
def processor():
    from deepseek_vl.models import DeepseekVLV2Processor

    return DeepseekVLV2Processor.from_pretrained(TINY)


# --- data -----------------------------------------------------------------------------------------------------


def test_both_layouts_multi_turn_text_only_and_several_images(tmp_path: Path) -> None:
    shutil.copy(IMAGE, tmp_path / "a.png")
    rows = [
        {"messages": [{"role": "user", "content": "<image>\n<image>\nSame?", "images": ["a.png", str(IMAGE)]},
                      {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Sure?"},
                      {"role": "assistant", "content": "Sure."}]},
        {"messages": [{"role": "user", "content": "First <image> then <image>?"},
                      {"role": "assistant", "content": "Both."}], "images": ["a.png", "a.png"]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hi."}]},
        {"messages": [{"role": "user", "content": "Describe."}, {"role": "assistant", "content": "Dark."}],
         "images": ["a.png"]},
    ]  # fmt: skip
    examples = read_jsonl(write_jsonl(tmp_path / "train.jsonl", rows))
    assert [e.line for e in examples] == [1, 2, 3, 4]
    assert examples[0].images == [str(tmp_path / "a.png"), str(IMAGE)]
    assert [m["role"] for m in examples[0].messages] == ["user", "assistant", "user", "assistant"]
    assert examples[1].messages[0]["images"] == [str(tmp_path / "a.png")] * 2
    assert examples[2].images == [] and examples[2].messages[0]["role"] == "system"
    assert examples[3].messages[0]["content"] == "<image>\nDescribe."  # ms-swift rows without tags


def test_boxes_are_written_as_the_model_emits_them_and_parse_back(tmp_path: Path) -> None:
    boxes = [{"label": "giraffe", "box_pixels": [420, 0, 724, 917]}, {"label": "giraffe", "box_pixels": [3, 5, 200, 300]},
             {"label": "tree", "box_pixels": [0.5, 10, 100.25, 1086]}]  # fmt: skip
    row = {"messages": [{"role": "user", "content": "<image>\nFind them.", "images": [str(GIRAFFES)]},
                        {"role": "assistant", "content": "Here:", "boxes": boxes}]}  # fmt: skip
    (example,) = read_jsonl(write_jsonl(tmp_path / "g.jsonl", [row]))
    answer = example.messages[1]["content"]
    assert answer == (
        "Here:<|ref|>giraffe<|/ref|><|det|>[[580, 0, 999, 844], [4, 5, 276, 276]]<|/det|>"
        "<|ref|>tree<|/ref|><|det|>[[1, 9, 138, 999]]<|/det|>"
    )
    parsed = parse_grounding(answer, image_sizes=[(724, 1086)])
    assert not parsed.problems and [b.label for b in parsed.boxes] == ["giraffe", "giraffe", "tree"]
    for box, given in zip(parsed.boxes, boxes):
        half_unit = (724 / 999 / 2, 1086 / 999 / 2) * 2
        assert all(abs(p - g) <= h + 1e-9 for p, g, h in zip(box.pixels, given["box_pixels"], half_unit))


def test_bad_rows_are_all_reported_with_line_numbers(tmp_path: Path) -> None:
    good = json.dumps(TRAIN_ROWS[0])
    rows = [
        good,
        "{not json",
        good,
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "<image>\nx", "images": ["missing.png"]},
                      {"role": "assistant", "content": "x"}]},
        {"messages": [{"role": "user", "content": "<image>\nx", "images": [str(GIRAFFES)]},
                      {"role": "assistant", "content": "", "boxes": [{"label": "a", "box_pixels": [10, 10, 5000, 20]}]}]},
        {"messages": [{"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "x"}],
         "images": [str(IMAGE)]},
        {"messages": [{"role": "user", "content": "<image>\nx", "images": [str(GIRAFFES)]},
                      {"role": "assistant", "content": "", "boxes": [{"label": "a<|/ref|>", "box_pixels": [1, 1, 5, 5]}]}]},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    before = path.read_bytes()
    with pytest.raises(DataError) as caught:
        read_jsonl(path)
    problems = caught.value.problems
    assert [p.split(":")[1] for p in problems] == ["2", "4", "5", "6", "7", "8", "9"]
    assert "not valid JSON" in problems[0] and "end with an assistant" in problems[1] and "'robot'" in problems[2]
    assert "missing.png" in problems[3] and "x1 < x2 <= 724" in problems[4] and "2 <image> tags" in problems[5]
    assert "'a<|/ref|>' contains the token markup" in problems[6]
    with pytest.raises(ValueError, match="a label is plain text"):
        grounding_text("<|det|>x", [[1, 1, 5, 5]], (10, 10))
    assert path.read_bytes() == before


# --- labels and tokens ----------------------------------------------------------------------------------------


def test_labels_cover_only_the_answers_and_padding_is_right(tmp_path: Path, processor) -> None:
    rows = [TRAIN_ROWS[0], {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>\nWhat is this?", "images": [str(IMAGE)]},
        {"role": "assistant", "content": "A square."}, {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Black."}]}]  # fmt: skip
    batch = Collator(processor)(read_jsonl(write_jsonl(tmp_path / "t.jsonl", rows)))
    ids, labels, attention = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tokenizer = processor.tokenizer
    answers = [tokenizer.decode(ids[row][labels[row] != -100]) for row in range(2)]
    eos = tokenizer.eos_token
    assert answers == [f"Blue.{eos}", f"A square.{eos}Black.{eos}"]
    assert torch.equal(labels[labels != -100], ids[labels != -100])
    short = int(attention[0].sum())
    assert bool(attention[0, :short].all()) and not bool(attention[0, short:].any())  # right padding
    assert bool((labels[0, short:] == -100).all()) and bool((ids[0, short:] == processor.pad_id).all())
    assert not bool((labels[batch["images_seq_mask"]] != -100).any())


def test_training_tokens_equal_inference_and_the_official_training_mode(tmp_path: Path, processor) -> None:
    info, golden = processor_case("08_training_mode")
    conversation = info["inputs"]["samples"][0]["conversation"]
    row = {"messages": [
        {"role": "user", "content": conversation[0]["content"], "images": [str(GIRAFFES)]},
        {"role": "assistant", "content": conversation[1]["content"]}]}  # fmt: skip
    (example,) = read_jsonl(write_jsonl(tmp_path / "o.jsonl", [row]))
    batch = Collator(processor)([example])
    assert torch.equal(batch["input_ids"], golden["input_ids"])
    assert torch.equal(batch["images_seq_mask"], golden["images_seq_mask"].bool())
    prompt = [{**example.messages[0]}, {"role": "assistant", "content": ""}]
    from deepseek_vl.utils.io import load_image

    inference = processor.process_one(conversations=prompt, images=[load_image(GIRAFFES)], inference_mode=True)
    assert torch.equal(batch["input_ids"][0, : len(inference)], inference.input_ids)
    assert int((batch["labels"][0, : len(inference)] != -100).sum()) == 0  # the prompt is never a target


# --- what trains ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["tiny", "small", "base"])
def test_default_lora_targets_are_attention_dense_mlp_and_shared_experts(variant: str) -> None:
    from deepseek_vl.models import DeepseekVLV2ForCausalLM

    model = apply_lora(DeepseekVLV2ForCausalLM.from_pretrained(checkpoint(variant)), TrainableParts())
    trainable = {n.removeprefix("base_model.model.").split(".lora_")[0] for n, p in model.named_parameters()
                 if p.requires_grad}  # fmt: skip
    attention = {"tiny": {"q_proj", "k_proj", "v_proj", "o_proj"}}.get(
        variant, {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    )
    expected = {f"language.model.layers.{i}.self_attn.{name}" for i in range(3) for name in attention}
    expected |= {f"language.model.layers.0.mlp.{name}" for name in ("gate_proj", "up_proj", "down_proj")}
    expected |= {f"language.model.layers.{i}.mlp.shared_experts.{name}" for i in (1, 2)
                 for name in ("gate_proj", "up_proj", "down_proj")}  # fmt: skip
    assert trainable == expected


def test_expert_router_and_vision_options() -> None:
    import re

    regex = re.compile(lora_target_regex(TrainableParts(lora_experts=True, lora_vision=True)))
    assert regex.fullmatch("language.model.layers.5.mlp.experts.63.down_proj")
    assert regex.fullmatch("vision.blocks.3.attn.qkv")
    assert not regex.fullmatch("language.model.layers.5.mlp.gate") and not regex.fullmatch("language.lm_head")
    from deepseek_vl.models import DeepseekVLV2ForCausalLM

    model = apply_lora(DeepseekVLV2ForCausalLM.from_pretrained(checkpoint("base")), TrainableParts(train_router=True))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.endswith("mlp.gate.modules_to_save.default.weight") for n in names)
    assert not any("e_score_correction_bias" in n or n.startswith("base_model.model.vision") for n in names)
    model.train()(input_ids=torch.tensor([[0, 5, 6, 7, 8]]), labels=torch.tensor([[0, 5, 6, 7, 8]])).loss.backward()
    trained_copy = model.get_parameter("base_model.model.language.model.layers.1.mlp.gate.modules_to_save.default.weight")
    assert trained_copy.grad is not None and trained_copy.grad.abs().sum() > 0  # the trainable copy routes


# --- a real run -------------------------------------------------------------------------------------------------


def finetune_run(output: Path, data: list, **overrides):
    from deepseek_vl.train.trainer import FinetuneConfig, build_trainer, load_model

    settings = dict(model=str(TINY), output=str(output), max_steps=12, batch_size=2, learning_rate=3e-2,
                    logging_steps=1, save_steps=4, warmup_ratio=0.0, lora_dropout=0.0)  # fmt: skip
    config = FinetuneConfig(**(settings | overrides))
    model, processor = load_model(config)
    trainer = build_trainer(config, model, processor, data, None)
    trainer.train(resume_from_checkpoint=config.resume)
    trainer.save_model(str(output))
    processor.save_pretrained(str(output))
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, processor):
    folder = tmp_path_factory.mktemp("finetune")
    data = read_jsonl(write_jsonl(folder / "train.jsonl", TRAIN_ROWS))
    trainer, losses = finetune_run(folder / "out", data)
    return trainer.model.eval(), losses, folder / "out", data


def test_lora_run_drives_the_loss_down(trained) -> None:
    model, losses, output, _ = trained
    network = model.base_model.model
    assert all(layer.gradient_checkpointing for layer in network.language.model.layers)  # on by default
    assert network.vision.grad_checkpointing  # vision blocks too
    assert len(losses) == 12
    assert losses[-1] < 0.5 * losses[0], losses
    assert (output / "adapter_model.safetensors").is_file() and (output / "processor_config.json").is_file()


def batch_of(processor, data):
    batch = Collator(processor)(data)
    return {k: v for k, v in batch.items() if k != "labels"}


def final_hidden(model, inputs) -> torch.Tensor:
    """The last normed hidden states, which the frozen lm_head projects: equal states, equal logits (projecting every
    position onto the 129,280-word vocabulary would take most of a test's time)."""
    with torch.no_grad():
        return model(**inputs, use_cache=False, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]


def test_reloaded_adapter_reproduces_the_trained_model(trained, processor) -> None:
    from peft import PeftModel

    from deepseek_vl.models import DeepseekVLV2ForCausalLM

    model, _, output, data = trained
    inputs = batch_of(processor, data)
    reloaded = PeftModel.from_pretrained(DeepseekVLV2ForCausalLM.from_pretrained(TINY, dtype=torch.float32), str(output)).eval()
    base = DeepseekVLV2ForCausalLM.from_pretrained(TINY, dtype=torch.float32).eval()
    expected, got, untrained = (final_hidden(m, inputs) for m in (model, reloaded, base))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (untrained - expected).abs().max() > 1e-2


def test_merged_checkpoint_has_official_keys_and_gives_the_same_greedy_tokens(trained, processor, tmp_path) -> None:
    from deepseek_vl.chat import VLChat
    from deepseek_vl.train.merge import merge_to_checkpoint

    model, _, output, _ = trained
    merged = merge_to_checkpoint(output, tmp_path / "merged", dtype="float32")
    with safe_open(TINY / "model.safetensors", "pt") as a, safe_open(merged / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(a.get_slice(k).get_shape() == b.get_slice(k).get_shape() for k in a.keys())
    config, official = (json.loads((folder / "config.json").read_text()) for folder in (merged, TINY))
    for section in ("", "vision_config", "projector_config", "language_config"):  # every official entry, unchanged
        ours, theirs = (config.get(section, {}) if section else config), (official[section] if section else official)
        for key, value in theirs.items():
            if key not in ("transformers_version", "torch_dtype") and not isinstance(value, dict):
                assert ours[key] == value, (section, key)
    assert config["torch_dtype"] == config["language_config"]["torch_dtype"] == "float32"
    assert (merged / "processor_config.json").is_file() and (merged / "tokenizer.json").is_file()

    messages = [{"role": "user", "content": "Count to three."}]
    unmerged = VLChat(model.base_model.model, processor)  # LoRA layers still separate
    from_folder = VLChat.from_pretrained(merged, device="cpu", dtype="float32")
    from_adapter = VLChat.from_pretrained(TINY, device="cpu", dtype="float32", adapter=output)
    answers = [chat.chat(messages, max_new_tokens=12) for chat in (unmerged, from_folder, from_adapter)]
    assert answers[0].completion_tokens == 12 or answers[0].finish_reason == "stop"
    assert answers[0].text == answers[1].text == answers[2].text


def test_resume_continues_the_same_loss_curve(trained, tmp_path) -> None:
    _, losses, output, data = trained
    resumed = tmp_path / "resumed"
    shutil.copytree(output / "checkpoint-8", resumed / "checkpoint-8")
    _, tail = finetune_run(resumed, data, resume=str(resumed / "checkpoint-8"))  # steps 9..12 run again
    assert len(tail) == 12 and tail[:8] == losses[:8]  # the first 8 come from the checkpoint's trainer state
    torch.testing.assert_close(torch.tensor(tail[8:]), torch.tensor(losses[8:]), atol=1e-5, rtol=1e-5)


# --- QLoRA ------------------------------------------------------------------------------------------------------


def wide_tiny(folder: Path) -> Path:
    """The golden Tiny with a 128-wide language model (NF4 blocks are 64 weights; the golden model is 16 wide), the
    golden weights where the shape is unchanged (vision tower), the others random, float32, with its processor."""
    from deepseek_vl.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM

    config = DeepseekVLV2Config.from_pretrained(TINY)
    config.language_config.hidden_size, config.projector_config.n_embed = 128, 128
    config.language_config.intermediate_size, config.language_config.moe_intermediate_size = 256, 64
    torch.manual_seed(0)
    model = DeepseekVLV2ForCausalLM(config)
    golden = load_file(TINY / "model.safetensors")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in golden and golden[name].shape == parameter.shape:
                parameter.copy_(golden[name])
            elif parameter.dim() == 2:  # unit-scale activations, so that the logits are not all near zero
                parameter.normal_(std=parameter.shape[1] ** -0.5)
    model.save_pretrained(folder)
    for file in TINY.iterdir():
        if file.name not in ("config.json", "model.safetensors"):
            shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def qlora_trained(tmp_path_factory):
    """A LoRA run on the widened Tiny loaded as a 4-bit NF4 base (bitsandbytes; on CPU it dequantizes per matmul)."""
    pytest.importorskip("bitsandbytes")
    folder = tmp_path_factory.mktemp("qlora")
    base = wide_tiny(folder / "base")
    data = read_jsonl(write_jsonl(folder / "train.jsonl", TRAIN_ROWS))
    trainer, losses = finetune_run(folder / "out", data, model=str(base), method="qlora", batch_size=4, max_steps=8,
                                   learning_rate=1e-2)  # every row in each step: the same batch, a smooth curve
    return trainer.model.eval(), losses, folder / "out", data, base


def nf4_base(folder: Path):
    from deepseek_vl.models import DeepseekVLV2ForCausalLM

    model = DeepseekVLV2ForCausalLM.from_pretrained(folder, quantize="nf4", device_map="cpu", dtype=torch.float32)
    model.is_loaded_in_4bit = True  # as the trainer marks it: peft's 4-bit LoRA layer
    return model


def test_qlora_trains_only_lora_on_an_nf4_language_model(qlora_trained) -> None:
    from bitsandbytes.nn import Params4bit

    model, losses, _, _, base = qlora_trained
    network = model.base_model.model
    quantized = {n.removesuffix(".weight") for n, p in network.named_parameters() if isinstance(p, Params4bit)}
    linears = {n.removesuffix(".base_layer") for n, m in network.named_modules()
               if isinstance(m, torch.nn.Linear) and ".lora_" not in n}  # fmt: skip
    # every linear of the decoder layers (Tiny has no kv_b_proj, which would stay unquantized), nothing else
    assert {n.removesuffix(".base_layer") for n in quantized} == {n for n in linears if n.startswith("language.model.layers.")}
    assert any(".mlp.experts." in n for n in quantized) and any(".shared_experts." in n for n in quantized)
    for name, parameter in network.named_parameters():  # vision, projector, routers, embeddings, lm_head, norms
        if not isinstance(parameter, Params4bit):
            assert parameter.dtype == torch.float32, name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    lora_layers = {type(m).__module__ + "." + type(m).__name__ for m in network.modules() if hasattr(m, "lora_A")}
    assert lora_layers == {"peft.tuners.lora.bnb.Linear4bit"}  # every default target is quantized in Tiny
    fresh = dict(nf4_base(base).named_parameters())
    for name, parameter in network.named_parameters():
        if isinstance(parameter, Params4bit):  # the frozen 4-bit bytes are the loaded ones, untouched by training
            assert torch.equal(parameter.data, fresh[name.replace(".base_layer", "")].data), name
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses


def label_loss(model, processor, data) -> float:
    """The loss on the rows; train mode with labels projects only the labelled positions onto the vocabulary."""
    with torch.no_grad():
        loss = model.train()(**Collator(processor)(data), use_cache=False).loss.item()
    model.eval()
    return loss


def test_qlora_adapter_reloads_and_carries_over_to_the_full_precision_base(qlora_trained, processor, tmp_path) -> None:
    """Reloaded onto a fresh NF4 base, the adapter reproduces the trained model exactly. On the float32 base it was
    not trained on, it keeps what training gained: the NF4 base is the float32 one plus a rounding error (each weight
    one of 16 levels per block of 64), which the adapter never saw, so the training-row loss moves by about the two
    bases' own loss gap (here: bases 12.14 float32 / 12.04 NF4; with the adapter 5.13 / 5.02, a 0.11 move against a
    7-nat gain). Asserted: the move is under 10% of the gain. The merged float32 checkpoint equals base + adapter."""
    from peft import PeftModel

    from deepseek_vl.models import DeepseekVLV2ForCausalLM
    from deepseek_vl.train.merge import merge_to_checkpoint

    model, _, output, data, folder = qlora_trained
    inputs = batch_of(processor, data)
    reloaded = PeftModel.from_pretrained(nf4_base(folder), str(output)).eval()
    expected, got = (final_hidden(m, inputs) for m in (model, reloaded))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    base = DeepseekVLV2ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    untrained, trained = label_loss(base, processor, data), label_loss(model, processor, data)
    on_full = PeftModel.from_pretrained(base, str(output)).eval()
    carried = label_loss(on_full, processor, data)
    assert trained < 0.6 * untrained
    assert abs(carried - trained) < 0.1 * (untrained - trained), (untrained, trained, carried)
    merged = DeepseekVLV2ForCausalLM.from_pretrained(merge_to_checkpoint(output, tmp_path / "m", dtype="float32")).eval()
    torch.testing.assert_close(final_hidden(merged, inputs), final_hidden(on_full, inputs), atol=1e-4, rtol=1e-4)


# --- data parallel ----------------------------------------------------------------------------------------------


def torchrun_worker(data: Path, output: Path, processes: int, batch: int, mode: str, parts: str) -> tuple[dict, dict]:
    """tests/train_ddp_worker.py under torchrun: (its result.json, the saved adapter weights)."""
    import subprocess

    worker = Path(__file__).with_name("train_ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
               str(worker), str(data), str(output), str(batch), mode, parts]  # fmt: skip  (--standalone: a free port)
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((output / "result.json").read_text()), load_file(output / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    """The references, run once per trained set: 1 process with both rows in its batch (one text-only row, one
    image row: different lengths)."""
    folder = tmp_path_factory.mktemp("one_process")
    data = write_jsonl(folder / "train.jsonl", TRAIN_ROWS[:2])
    runs = {}

    def run(parts: str):
        if parts not in runs:
            runs[parts] = torchrun_worker(data, folder / parts, processes=1, batch=2, mode="ddp", parts=parts)
        return data, *runs[parts]

    return run


@pytest.mark.slow  # torchrun launches: about 2 min on 2 cores for all five
@pytest.mark.parametrize(("mode", "parts"), [("ddp", "language"), ("ddp", "vision"), ("fsdp", "language"),
                                             ("fsdp", "vision"), ("zero2", "language")])  # fmt: skip
def test_two_process_gloo_run_equals_one_process_on_the_same_global_batch(one_process_runs, mode, parts, tmp_path):
    """torchrun, 2 CPU processes on gloo with 1 row each == 1 process with both rows: losses and updated weights.

    The two rows differ in length (one has an image), so this also checks that the loss is normalised by the
    global label-token count and that the balance loss ignores the padding of the single-process batch. FSDP (the
    `finetune --fsdp` configuration) shards every decoder layer and vision block; the process with the text-only
    row still runs the vision blocks in step with the other (their weights are gathered collectively). `vision`
    also trains the vision tower (LoRA) and the projector (fully): then the text-only process's vision and
    projector gradients (zero) join the reduction, under DDP as under FSDP. `zero2` is DeepSpeed ZeRO-2 (optimizer
    state and gradients partitioned) on its CPU accelerator, whose collectives are gloo's.
    """
    if mode == "zero2":
        pytest.importorskip("deepspeed")
    data, one, weights_one = one_process_runs(parts)
    two, weights_two = torchrun_worker(data, tmp_path / mode, processes=2, batch=1, mode=mode, parts=parts)
    assert one["world"] == 1 and two["world"] == 2 and len(one["losses"]) == 3
    if mode == "fsdp":
        config = json.loads((TINY / "config.json").read_text())
        layers, blocks = config["language_config"]["num_hidden_layers"], config["vision_config"]["layers"]
        assert two["fsdp_units"][0] == "FSDPPeftModel"  # the root; accelerate also makes the embedding a unit
        assert two["fsdp_units"].count("FSDPDeepseekV2DecoderLayer") == layers and two["fsdp_units"].count("FSDPBlock") == blocks
    else:
        assert two["fsdp_units"] == []
    assert two["zero_stage"] == (2 if mode == "zero2" else None) and two["backend"] == "gloo"
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), atol=1e-5, rtol=1e-5)
    assert one["losses"][-1] < one["losses"][0]
    assert weights_one.keys() == weights_two.keys()
    moved = {k: float(v.abs().max()) for k, v in weights_one.items() if "lora_B" in k}  # lora_B starts at 0
    assert max(moved.values()) > 1e-3  # the update is not nothing
    if parts == "vision":
        assert max(v for k, v in moved.items() if ".vision." in k) > 1e-3
        base = load_file(TINY / "model.safetensors")
        projector = {k.removeprefix("base_model.model."): v for k, v in weights_one.items() if ".projector." in k}
        assert projector.keys() == {k for k in base if k.startswith("projector.")}
        assert all(not torch.equal(v, base[k].float()) for k, v in projector.items())
    for name, value in weights_one.items():
        torch.testing.assert_close(weights_two[name], value, atol=1e-5, rtol=1e-4, msg=name)


# --- command line -----------------------------------------------------------------------------------------------


def test_finetune_fsdp_flag_shards_per_decoder_layer_and_vision_block(tmp_path: Path, monkeypatch, capsys) -> None:
    """`finetune --fsdp` -> the FSDP2 configuration the 2-process test runs; without it, no FSDP."""
    from deepseek_vl.models import DeepseekVLV2ForCausalLM
    from deepseek_vl.serve.cli import main
    from deepseek_vl.train import trainer

    seen = []

    def record(config, train, evaluation=None):
        seen.append(trainer.training_arguments(config, has_eval=False))
        return trainer.Summary(0, 1, 0, 0.0, 0, 0.0, 0, 0.0)

    monkeypatch.setattr(trainer, "finetune", record)
    data = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS[:1])
    for extra in (["--fsdp"], []):
        assert main(["finetune", "--model", str(TINY), "--data", str(data), "--output", str(tmp_path / "out"), *extra]) == 0
    sharded, plain = seen
    assert plain.fsdp_plugin_args is None
    plugin = sharded.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    units = plugin["transformer_cls_names_to_wrap"].split(",")
    assert units == ["DeepseekV2DecoderLayer", "Block"]
    model = DeepseekVLV2ForCausalLM.from_pretrained(TINY)
    names = [type(module).__name__ for module in model.modules()]
    assert names.count("DeepseekV2DecoderLayer") == len(model.language.model.layers)
    assert names.count("Block") == len(model.vision.blocks)


def test_finetune_validate_reports_statistics(tmp_path: Path, capsys) -> None:
    from deepseek_vl.serve.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    assert main(["finetune", "--model", str(TINY), "--data", str(data), "--validate"]) == 0
    out = capsys.readouterr().out
    assert "train: 4 conversations, 1 images" in out and "all rows are valid" in out
    assert main(["finetune", "--model", str(TINY), "--data", str(data), "--validate", "--max-length", "100"]) == 2
    err = capsys.readouterr().err
    assert f"{data}:2: the conversation is 4" in err and "over the limit of 100" in err and "1 row(s) would fail" in err


def test_finetune_bad_rows_and_qlora_without_bitsandbytes_are_one_clear_error(tmp_path: Path, capsys, monkeypatch):
    from deepseek_vl.serve.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [TRAIN_ROWS[0], "[]", {"messages": []}])
    assert main(["finetune", "--model", str(TINY), "--data", str(bad), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "2 bad row(s)" in err and f"{bad}:2:" in err and f"{bad}:3:" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    good = write_jsonl(tmp_path / "good.jsonl", TRAIN_ROWS[:1])
    code = main(["finetune", "--model", str(TINY), "--data", str(good), "--method", "qlora", "--output",
                 str(tmp_path / "q")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--method qlora needs bitsandbytes" in err and "Traceback" not in err


def test_merge_command_and_help_stay_light(trained, tmp_path: Path, capsys) -> None:
    import subprocess

    from deepseek_vl.serve.cli import main

    _, _, output, _ = trained
    assert main(["merge", "--adapter", str(output), "--output", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "x")]) == 2
    assert "not a LoRA adapter folder" in capsys.readouterr().err
    probe = "import sys; from deepseek_vl.serve.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


# --- every check before training, all problems at once ----------------------------------------------------------

CHAT = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_malformed_conversations_bytes_and_keys_are_each_a_line_error(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "assistant", "content": "A"}]},
        {"messages": [CHAT[0], CHAT[0], CHAT[1]]},
        {"messages": [CHAT[0], CHAT[1], CHAT[1]]},
        {"messages": [CHAT[0], {"role": "assistant", "content": " "}, *CHAT]},
        {"messages": [CHAT[0], {"role": "assistant", "content": "A", "bboxes": []}]},
        {"messages": [{"role": "user", "content": "<image>x", "image": str(IMAGE)}, CHAT[1]]},
        {"messages": CHAT, "sytem": "typo"},
        {"messages": [{"role": "system", "content": "See <image>"}, *CHAT]},
        {"messages": [{"role": "system", "content": "S"}, *CHAT], "system": "S"},
        {"system": "Be brief.", "messages": CHAT},
    ]  # fmt: skip
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    path.write_bytes(codecs.BOM_UTF8 + path.read_bytes() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    examples, problems = scan_jsonl(path)
    expected = [
        (1, "must start with a user message"),
        (2, "messages 0 and 1 are both user messages"),
        (3, "messages 1 and 2 are both assistant messages"),
        (4, "message 1: the assistant answer is empty"),
        (5, "unknown key 'bboxes'; did you mean 'boxes'?"),
        (6, "unknown key 'image'; did you mean 'images'?"),
        (7, "the row has an unknown key 'sytem'; did you mean 'system'?"),
        (8, "message 0 (system): <image> may only appear in user messages"),
        (9, 'either as "system" or as a system message'),
        (11, "not UTF-8 (byte 0xe9"),
    ]  # fmt: skip
    assert len(problems) == len(expected), problems
    for problem, (line, text) in zip(problems, expected):
        assert problem.startswith(f"{path}:{line}: ") and text in problem, problem
    (example,) = examples  # line 10, after the BOM: a top-level system (ms-swift's sharegpt layout) is the system turn
    assert example.line == 10 and example.messages[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(ValueError, match="is a folder; pass the JSONL file itself"):
        scan_jsonl(tmp_path)


def truncated_jpeg(folder: Path) -> Path:
    data = GIRAFFES.read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not decode
    return folder / "cut.jpg"


def test_validate_lists_every_problem_of_every_check_in_one_run(tmp_path: Path, capsys) -> None:
    """Format errors and token-level ones (over the model's context, a truncated JPEG) together, in line order,
    all 25 of them (no "... and N more")."""
    from deepseek_vl.serve.cli import main

    context = json.loads((TINY / "config.json").read_text())["language_config"]["max_position_embeddings"]
    long_row = {"messages": [CHAT[0], {"role": "assistant", "content": "hello " * context}]}
    cut = {"messages": [{"role": "user", "content": "<image>", "images": [str(truncated_jpeg(tmp_path))]}, CHAT[1]]}
    rows = [TRAIN_ROWS[0], long_row, cut, *[{"messages": [CHAT[0]]}] * 22, "{oops"]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    assert main(["finetune", "--model", str(TINY), "--data", str(data), "--validate"]) == 2
    out, err = capsys.readouterr()
    listed = [line for line in err.splitlines() if line.startswith(f"{data}:")]
    assert [int(line.split(":")[1]) for line in listed] == list(range(2, 27))
    assert f"over the limit of {context} (the model's context, max_position_embeddings)" in listed[0]
    assert "cut.jpg" in listed[1] and "truncated" in listed[1] and "not valid JSON" in listed[-1]
    assert "25 row(s) would fail" in err and "more" not in err and "train: 1 conversations" in out


def test_finetune_refuses_bad_rows_flags_and_outputs_before_loading_the_model(tmp_path: Path, capsys, monkeypatch):
    from deepseek_vl.serve.cli import main
    from deepseek_vl.train import trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(trainer, "load_model", no_model)
    good = write_jsonl(tmp_path / "good.jsonl", TRAIN_ROWS[:1])
    cut = {"messages": [{"role": "user", "content": "<image>", "images": [str(truncated_jpeg(tmp_path))]}, CHAT[1]]}
    bad = write_jsonl(tmp_path / "bad.jsonl", [TRAIN_ROWS[0], cut])
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "checkpoint-9").mkdir()
    stale = tmp_path / "stale"
    (stale / "checkpoint-4").mkdir(parents=True)
    (stale / "checkpoint-4" / trainer.RUN_FILE).write_text(json.dumps({"method": "full", "model": str(TINY)}))
    cases = [
        (["--data", str(bad), "--max-length", "9"], [f"{bad}:1: the conversation is 1", "limit of 9 (--max-length)"]),
        (["--data", str(bad)], [f"{bad}:2:", "truncated"]),
        (["--output", str(good)], ["is a file"]),
        (["--output", str(tmp_path / "used")], ["is not empty", "--resume"]),
        (["--output", str(tmp_path / "new"), "--resume"], ["no checkpoint-N folder"]),
        (["--output", str(stale), "--resume"], ["cannot resume from", "method 'full' (this run: 'lora')"]),
        (["--method", "full", "--lora-rank", "8", "--train-router"], ["--lora-rank, --train-router: LoRA settings"]),
        (["--method", "full", "--dtype", "bfloat16"], ["float32 master weights"]),
    ]  # fmt: skip
    for extra, expected in cases:
        defaults = [item for pair in (("--data", str(good)), ("--output", str(tmp_path / "out"))) if pair[0] not in extra
                    for item in pair]  # fmt: skip
        assert main(["finetune", "--model", str(TINY), *defaults, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert all(text in err for text in expected) and "Traceback" not in err, (extra, err)
    assert not (tmp_path / "out").exists()


def test_summary_counts_this_run_logs_the_last_step_and_evaluates_once(tmp_path: Path, monkeypatch, capsys) -> None:
    """Fewer steps than --logging-steps still log a loss; the final eval (here at the last step) runs once; after
    --resume the summary counts only the steps run now; a relative --model is recorded as an absolute path."""
    from deepseek_vl.train.trainer import FinetuneConfig, finetune, format_summary

    data = read_jsonl(write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS))
    monkeypatch.chdir(TINY.parent)
    settings = {"model": TINY.name, "output": str(tmp_path / "out"), "max_steps": 2, "logging_steps": 10,
                "save_steps": 2}  # fmt: skip
    first = finetune(FinetuneConfig(**settings), data, data[:1])
    out = capsys.readouterr().out
    assert "step 2/2  loss" in out and out.count("eval loss") == 1
    assert first.steps == 2 and first.start_step == 0 and first.eval_loss is not None
    adapter = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(TINY.resolve())

    second = finetune(FinetuneConfig(**settings | {"max_steps": 3, "resume": True}), data, data[:1])
    assert (second.steps, second.start_step, second.final_step) == (1, 2, 3)
    assert 0 < second.tokens < first.tokens  # this run's one row, not the checkpoint's two as well
    losses = [entry["loss"] for entry in json.loads((tmp_path / "out" / "checkpoint-3" / "trainer_state.json")
              .read_text())["log_history"] if "loss" in entry]  # fmt: skip
    assert second.last_loss == losses[-1]
    assert "trained 1 steps (resumed at step 2, now at 3)" in format_summary(second, str(tmp_path / "out"))


def test_merge_output_checks_and_an_adapter_of_another_model_size(trained, tmp_path: Path, capsys) -> None:
    from deepseek_vl.models import DeepseekVLV2Config, DeepseekVLV2ForCausalLM
    from deepseek_vl.serve.cli import main
    from deepseek_vl.train.merge import merge_adapter

    _, _, output, _ = trained
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    for target in (tmp_path / "full", tmp_path / "full" / "x"):
        assert main(["merge", "--adapter", str(output), "--output", str(target)]) == 2
        err = capsys.readouterr().err
        assert ("is not empty" in err or "is a file" in err) and "Traceback" not in err
    config = DeepseekVLV2Config.from_pretrained(TINY)
    config.language_config.hidden_size = config.projector_config.n_embed = 32  # another model size
    with pytest.raises(ValueError, match=rf"trained on {re.escape(os.path.abspath(TINY))}, not this model: \d+ of its"):
        merge_adapter(DeepseekVLV2ForCausalLM(config), output)
