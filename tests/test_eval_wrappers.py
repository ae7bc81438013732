"""The VLMEvalKit-compatible class and the lmms-eval plugin on a tiny local task with the golden Tiny checkpoint:
their answers are VLChat's for the prompt each toolkit's DeepSeek-VL2 integration builds."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from PIL import Image

from deepseek_vl.chat import VLChat
from deepseek_vl.eval.vlmevalkit import DeepSeekVL2
from golden import GOLDEN, checkpoint

TINY = str(checkpoint("tiny"))
IMAGE = str(GOLDEN / "images" / "tiny_8x8.png")
SECOND = str(GOLDEN / "images" / "gray_300x200.png")


@pytest.fixture(scope="module")
def vlmeval() -> DeepSeekVL2:
    return DeepSeekVL2(TINY, device="cpu", max_new_tokens=5)


def test_vlmevalkit_interleaved_message(vlmeval: DeepSeekVL2) -> None:
    message = [{"type": "image", "value": IMAGE}, {"type": "text", "value": "What is it?"}]
    expected = vlmeval.pipe.chat([{"role": "user", "content": "<image>\nWhat is it?"}], [IMAGE], max_new_tokens=5)
    assert vlmeval.generate(message, dataset="DocVQA_VAL") == expected.text.rstrip(".")
    turns = [{"role": "user", "content": message}]
    assert vlmeval.chat(turns, dataset="DocVQA_VAL") == expected.text.rstrip(".")


def test_vlmevalkit_mmmu_prompt(vlmeval: DeepSeekVL2) -> None:
    """VLMEvalKit's MMMU prompt, as its DeepSeek-VL2 wrapper rewrites it, with the first image enlarged 2x."""
    question = "Question: Which is brighter, <image 1> or <image 2>?\nOptions:\nA. first\nB. second\n" \
               "Please select the correct answer from the options above. \n"  # fmt: skip
    images = [{"type": "image", "value": IMAGE}, {"type": "image", "value": SECOND}]
    message = [*images, {"type": "text", "value": question}]
    prompt = "<image><image>\n<image 1><image 2> Which is brighter, <image 1> or <image 2>?\nA. first\nB. second\n" \
             "Answer with the option's letter from the given choices directly. Answer the question using a single " \
             "word or phrase.\n \n"  # fmt: skip
    first = Image.open(IMAGE).convert("RGB").resize((16, 16), Image.BILINEAR)
    expected = vlmeval.pipe.chat([{"role": "user", "content": prompt}], [first, SECOND], max_new_tokens=5)
    assert vlmeval.generate(message, dataset="MMMU_DEV_VAL") == expected.text.rstrip(".")


def test_lmms_eval_plugin(vlmeval: DeepSeekVL2) -> None:
    if not os.environ.get("DEEPSEEK_VL_REQUIRE_LMMS_EVAL"):  # .ci/run's third step sets it, with lmms-eval installed
        pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is the optional [eval] extra")
    from deepseek_vl.eval.lmms_eval_plugin import DeepseekVL2, manifest

    model = DeepseekVL2(pretrained=TINY, device="cpu", batch_size="2", max_new_tokens="4")
    docs = [{"image": Image.open(IMAGE)}, {"image": Image.open(SECOND)}, {"image": Image.open(IMAGE)}]
    model.task_dict = {"tiny_task": {"test": docs}}
    requests = [
        SimpleNamespace(args=("What is it?", {"until": ["\n\n"]}, lambda doc: [doc["image"]], 0, "tiny_task", "test")),
        SimpleNamespace(args=("Describe.", {"max_new_tokens": 3}, lambda doc: [doc["image"]], 1, "tiny_task", "test")),
        SimpleNamespace(args=("Colour?", {"until": ["\n\n"]}, lambda doc: [doc["image"]], 2, "tiny_task", "test")),
    ]
    answers = model.generate_until(requests)
    pipe: VLChat = vlmeval.pipe
    expected = [
        pipe.chat([{"role": "user", "content": "What is it?"}], [IMAGE], max_new_tokens=4, stop=["\n\n"]).text,
        pipe.chat([{"role": "user", "content": "Describe."}], [SECOND], max_new_tokens=3).text,
        pipe.chat([{"role": "user", "content": "Colour?"}], [IMAGE], max_new_tokens=4, stop=["\n\n"]).text,
    ]
    assert answers == expected
    assert manifest().simple_class_path == "deepseek_vl.eval.lmms_eval_plugin.DeepseekVL2"


def lmms_plugin():
    if not os.environ.get("DEEPSEEK_VL_REQUIRE_LMMS_EVAL"):
        pytest.importorskip("lmms_eval.api.model", reason="lmms-eval is the optional [eval] extra")
    from deepseek_vl.eval import lmms_eval_plugin

    return lmms_eval_plugin


def test_lmms_eval_builds_the_model_as_its_evaluator_does(vlmeval: DeepSeekVL2) -> None:
    """lmms-eval's `simple_evaluate` adds its --batch_size, --max_batch_size and --device to the model_args."""
    plugin = lmms_plugin()
    model = plugin.DeepseekVL2.create_from_arg_string(
        f"pretrained={TINY},max_new_tokens=3", {"batch_size": "2", "max_batch_size": 8, "device": "cpu"}
    )
    model.task_dict = {"tiny_task": {"test": [{"image": IMAGE}]}}
    request = SimpleNamespace(args=("What is it?", {}, lambda doc: [doc["image"]], 0, "tiny_task", "test"))
    # an image given as a path (not only as a PIL image) reaches the model
    expected = vlmeval.pipe.chat([{"role": "user", "content": "What is it?"}], [IMAGE], max_new_tokens=3).text
    assert model.generate_until([request]) == [expected]


def test_lmms_eval_refuses_bad_model_args_before_loading(monkeypatch) -> None:
    plugin = lmms_plugin()
    monkeypatch.setattr(VLChat, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("model loaded")))
    with pytest.raises(ValueError, match=r"unknown model_args \['max_tokens'\]"):
        plugin.DeepseekVL2(pretrained=TINY, max_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        plugin.DeepseekVL2(pretrained=TINY, temperature=-1)
