"""Fine-tuning as a newcomer uses it: every data problem in one run, resuming after Ctrl-C or with other settings,
flags that Trainer would choke on, the summary's parameter counts, and what merge and --adapter say and write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from golden import GOLDEN, checkpoint

pytest.importorskip("peft")

from deepseek_vl.serve.cli import main  # noqa: E402
from deepseek_vl.train import trainer  # noqa: E402
from deepseek_vl.train.data import scan_jsonl  # noqa: E402
from deepseek_vl.train.lora import TrainableParts, count_parameters  # noqa: E402
from deepseek_vl.train.trainer import FinetuneConfig, prepare_output, run_record  # noqa: E402

TINY = checkpoint("tiny")
IMAGE = GOLDEN / "images" / "tiny_8x8.png"
CHAT = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
LONG = {"messages": [CHAT[0], {"role": "assistant", "content": "a b c d e f g h i j k l m n o p"}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(trainer, "load_model", refuse)


def test_finetune_lists_format_and_token_problems_of_train_and_eval_in_one_run(tmp_path, capsys, no_model) -> None:
    """Not the train file's format errors first, then (once fixed) its over-long rows, then the eval file's."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}, "{oops", LONG])
    evaluation = write_jsonl(tmp_path / "val.jsonl", [LONG, {"messages": CHAT[:1]}])
    args = ["finetune", "--model", str(TINY), "--data", str(train), "--eval-data", str(evaluation), "--max-length", "12"]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "4 bad row(s)" in err and "Traceback" not in err, err
    for where in (f"{train}:2: not valid JSON", f"{train}:3: the conversation is", f"{evaluation}:1: the conversation is",
                  f"{evaluation}:2: the conversation must end"):  # fmt: skip
        assert where in err, (where, err)
    assert not (tmp_path / "out").exists()


def test_validate_shows_its_progress_through_the_rows(tmp_path: Path, capsys) -> None:
    """Checking is a few ms a row (more with images): minutes for a large file, silent before."""
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}] * 3)
    assert main(["finetune", "--model", str(TINY), "--data", str(data), "--validate"]) == 0
    assert "checking rows" in capsys.readouterr().err


def whole_checkpoint(folder: Path, config: FinetuneConfig) -> Path:
    """A checkpoint-N as Trainer and the run callback leave it (the files the checks read)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "trainer_state.json").write_text("{}")
    (folder / trainer.RUN_FILE).write_text(json.dumps(run_record(config)))
    return folder


def test_resume_refuses_a_checkpoint_cut_off_while_saving_and_names_the_last_whole_one(tmp_path: Path) -> None:
    config = FinetuneConfig(model=str(TINY), output=str(tmp_path / "out"), resume=True)
    whole_checkpoint(tmp_path / "out" / "checkpoint-2", config)
    (tmp_path / "out" / "checkpoint-4").mkdir()  # Ctrl-C while Trainer wrote the adapter: no trainer_state.json yet
    (tmp_path / "out" / "checkpoint-4" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"checkpoint-4.*incomplete.*the latest whole one: .*checkpoint-2"):
        prepare_output(config)
    (tmp_path / "out" / "checkpoint-4" / "adapter_config.json").unlink()  # an empty folder: not "trained with full"
    with pytest.raises(ValueError, match="incomplete") as error:
        prepare_output(config)
    assert "'full'" not in str(error.value)
    assert prepare_output(FinetuneConfig(**vars(config) | {"resume": str(tmp_path / "out" / "checkpoint-2")}))


@pytest.mark.parametrize(("setting", "shown"), [("optimizer", "optimizer 'adamw_torch' (this run: 'sgd')"),
                                                ("learning_rate", "learning_rate 0.0002 (this run: 0.001)")])
def test_resume_refuses_another_optimizer_or_learning_rate(tmp_path: Path, setting: str, shown: str) -> None:
    """Trainer loads the checkpoint's optimizer and scheduler state: another --optim failed deep in torch
    (KeyError 'momentum' for sgd), another --lr was silently replaced by the checkpoint's."""
    config = FinetuneConfig(model=str(TINY), output=str(tmp_path / "out"), resume=True)
    whole_checkpoint(tmp_path / "out" / "checkpoint-2", config)
    changed = FinetuneConfig(**vars(config) | {setting: {"optimizer": "sgd", "learning_rate": 1e-3}[setting]})
    with pytest.raises(ValueError, match="cannot resume") as error:
        prepare_output(changed)
    assert shown in str(error.value)


@pytest.mark.parametrize("flags", [["--grad-accum", "0"], ["--max-steps", "0"], ["--epochs", "0"],
                                   ["--batch-size", "-1"], ["--lora-dropout", "1"], ["--lr", "0"]])  # fmt: skip
def test_flags_trainer_cannot_use_are_refused_before_loading(tmp_path: Path, capsys, no_model, flags) -> None:
    """--grad-accum 0 was a ZeroDivisionError traceback, --max-steps 0 trained one step, --epochs 0 saved an
    untrained adapter; all after the model loaded."""
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}])
    args = ["finetune", "--model", str(TINY), "--data", str(data), "--output", str(tmp_path / "out"), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"error: {flags[0]} " in err and "Traceback" not in err, err


def test_ctrl_c_says_which_checkpoint_resume_continues_from(tmp_path: Path, capsys, monkeypatch) -> None:
    def interrupted(config, train, evaluation=None):
        (Path(config.output) / "checkpoint-3").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "finetune", interrupted)
    data = write_jsonl(tmp_path / "train.jsonl", [{"messages": CHAT}])
    main(["finetune", "--model", str(TINY), "--data", str(data), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"the last checkpoint is {tmp_path / 'out' / 'checkpoint-3'}: continue with --resume" in err, err


def test_summary_counts_4bit_weights_whole_and_fully_trained_modules_once() -> None:
    """QLoRA's NF4 weights pack two per byte (the total came out short); peft keeps a frozen original beside each
    fully trained module's copy (the total counted the projector twice)."""
    pytest.importorskip("bitsandbytes")
    from deepseek_vl.models import DeepseekVLV2ForCausalLM
    from deepseek_vl.train.trainer import load_model

    plain = sum(p.numel() for p in DeepseekVLV2ForCausalLM.from_pretrained(TINY).parameters())
    counts = {}
    for name, settings in {"lora": {}, "qlora": {"method": "qlora"},
                           "projector": {"parts": TrainableParts(train_projector=True)}}.items():  # fmt: skip
        model, _ = load_model(FinetuneConfig(model=str(TINY), output="unused", **settings))
        counts[name] = count_parameters(model)
    projector = sum(p.numel() for p in DeepseekVLV2ForCausalLM.from_pretrained(TINY).projector.parameters())
    lora_weights = counts["lora"][0]
    assert counts["lora"][1] == counts["qlora"][1] == counts["projector"][1] == plain + lora_weights
    assert counts["qlora"][0] == lora_weights and counts["projector"][0] == lora_weights + projector


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """An untrained adapter of the golden Tiny (its LoRA B is zero: merging it leaves the weights as they are)."""
    from deepseek_vl.models import DeepseekVLV2ForCausalLM
    from deepseek_vl.train.lora import apply_lora

    folder = tmp_path_factory.mktemp("adapter")
    network = DeepseekVLV2ForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    network.name_or_path = str(TINY)
    apply_lora(network, TrainableParts()).save_pretrained(folder)
    return folder


def test_merged_folder_has_the_base_tokenizer_files_as_released_and_one_dtype(adapter: Path, tmp_path: Path) -> None:
    """Re-saved by transformers 5, tokenizer_config.json named a TokenizersBackend class and extra_special_tokens the
    official code (transformers 4.38) does not know, and special_tokens_map.json was missing; the sub-configs kept
    the merge's float32 as their dtype beside a bfloat16 torch_dtype."""
    from deepseek_vl.train.merge import merge_to_checkpoint

    merged = merge_to_checkpoint(adapter, tmp_path / "merged")
    for name in ("processor_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"):
        assert (merged / name).read_bytes() == (TINY / name).read_bytes(), name
    config = json.loads((merged / "config.json").read_text())
    dtypes = {config.get("torch_dtype"), *(section.get(key) for section in (config, *config.values())
              if isinstance(section, dict) for key in ("dtype", "torch_dtype"))} - {None}  # fmt: skip
    assert dtypes == {"bfloat16"}


def test_adapter_errors_say_what_the_folder_is(tmp_path: Path, capsys) -> None:
    (tmp_path / "run" / "checkpoint-6").mkdir(parents=True)  # a run stopped before its final save
    (tmp_path / "run" / "checkpoint-6" / "adapter_config.json").write_text("{}")
    cases = {
        str(TINY): "is a full model checkpoint",  # also what finetune --method full writes
        str(tmp_path / "run"): f"its latest checkpoint, {tmp_path / 'run' / 'checkpoint-6'}, is one",
        str(tmp_path / "nowhere"): "is not a LoRA adapter folder (it does not exist)",
    }
    for folder, expected in cases.items():
        assert main(["merge", "--adapter", folder, "--output", str(tmp_path / "merged")]) == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err


def test_relative_image_paths_are_reported_where_they_were_looked_for(tmp_path: Path, monkeypatch) -> None:
    """Relative to the data file, shown and kept as absolute paths (a relative --data gave "looked at missing.png")."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(IMAGE.read_bytes())
    rows = [{"messages": [{"role": "user", "content": "<image>", "images": [name]}, CHAT[1]]}
            for name in ("a.png", "missing.png", ".")]  # fmt: skip
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    (example,), problems = scan_jsonl("data/train.jsonl")
    assert example.images == [str(tmp_path / "data" / "a.png")]
    assert problems == [
        f"data/train.jsonl:2: image 'missing.png' not found (looked at {tmp_path / 'data' / 'missing.png'})",
        f"data/train.jsonl:3: image '.' is a folder (looked at {tmp_path / 'data'})",
    ]
