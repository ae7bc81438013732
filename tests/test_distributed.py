"""VLPredictor (the Ray Data callable) on the golden Tiny checkpoint: in-process, pickled, and on a local Ray
cluster with two actors, against VLChat and the local `deepseek-vl2 batch` command."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from deepseek_vl.distributed import RESULT_COLUMNS, VLPredictor
from golden import GOLDEN, checkpoint

TINY = str(checkpoint("tiny"))
SMALL_IMAGE = GOLDEN / "images" / "tiny_8x8.png"
GIRAFFES = GOLDEN / "images" / "visual_grounding_1.jpeg"


@pytest.fixture(scope="module")
def predictor() -> VLPredictor:
    return VLPredictor(TINY, device="cpu", max_new_tokens=4)


def columns(out: dict) -> dict[str, list]:
    """A predictor's output as Python lists (the result columns are Arrow arrays)."""
    return {key: values.to_pylist() if hasattr(values, "to_pylist") else list(values) for key, values in out.items()}


def test_a_batch_of_columns_is_answered_row_by_row(predictor: VLPredictor) -> None:
    """numpy columns as Ray hands them over: a path, raw bytes, a JSON messages cell, a bad image, a bad option."""
    batch = {
        "id": np.array(["a", "b", "c", "d", "e"], dtype=object),
        "prompt": np.array(["Describe.", "What is it?", None, "Hi", "Hi"], dtype=object),
        "messages": np.array([None, None, json.dumps([{"role": "user", "content": "Hello"}]), None, None]),
        "images": np.array([np.array([str(SMALL_IMAGE)]), [SMALL_IMAGE.read_bytes()], None, ["/no/such.png"], None],
                           dtype=object),  # fmt: skip
        "max_new_tokens": np.array([np.nan, 2, np.nan, np.nan, -1]),
    }
    out = columns(predictor(batch))
    assert list(out["id"]) == ["a", "b", "c", "d", "e"]  # passed through
    assert set(RESULT_COLUMNS) <= set(out)
    pipe = predictor.pipe
    expected = [
        pipe.chat([{"role": "user", "content": "Describe.", "images": [str(SMALL_IMAGE)]}], max_new_tokens=4),
        pipe.chat([{"role": "user", "content": "What is it?", "images": [str(SMALL_IMAGE)]}], max_new_tokens=2),
        pipe.chat([{"role": "user", "content": "Hello"}], max_new_tokens=4),
    ]
    for row, result in enumerate(expected):
        assert out["text"][row] == result.text and out["error"][row] is None
        assert out["prompt_tokens"][row] == result.prompt_tokens
        assert out["completion_tokens"][row] == result.completion_tokens
        assert out["finish_reason"][row] == result.finish_reason and out["boxes"][row] == []
    assert "/no/such.png" in out["error"][3] and out["text"][3] is None
    assert "max_new_tokens must be an integer >= 1" in out["error"][4]


def test_seeded_sampled_rows_are_the_answers_chat_gives_for_the_seed(predictor: VLPredictor) -> None:
    """Two equal seeded rows used to share one batch, so one generator: the second row drew other tokens."""
    row = {"prompt": "Tell me a story.", "temperature": 1.0, "seed": 0, "max_new_tokens": 6}
    records = predictor.answer_rows([row, row, {**row, "seed": 1}])
    alone = [predictor.pipe.chat([{"role": "user", "content": row["prompt"]}], temperature=1.0, seed=seed,
                                 max_new_tokens=6).text for seed in (0, 0, 1)]  # fmt: skip
    assert [record["text"] for record in records] == alone


def test_rows_without_prompt_or_messages_are_errors(predictor: VLPredictor) -> None:
    batch = {"id": [1, 2], "prompt": [None, "a"], "messages": [None, '[{"role": "user", "content": "b"}]']}
    out = columns(predictor(batch))
    assert all('either "messages"' in error for error in out["error"])


def test_predictor_survives_pickling(predictor: VLPredictor) -> None:
    """Ray ships the class and its constructor arguments; an instance pickles too (e.g. for task pools)."""
    clone = pickle.loads(pickle.dumps(predictor))
    batch = {"prompt": ["Hello"]}
    assert columns(clone(batch))["text"] == columns(predictor(batch))["text"]


def test_bad_constructor_options_fail_early() -> None:
    with pytest.raises(ValueError, match="unknown generation options"):
        VLPredictor(TINY, max_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        VLPredictor(TINY, temperature=-1)


def test_ray_run_refuses_a_missing_model_folder_before_starting_ray(tmp_path) -> None:
    from deepseek_vl.distributed import run_ray_batch
    from deepseek_vl.options import ModelLoadError

    with pytest.raises(ModelLoadError, match="does not exist"):
        next(run_ray_batch([(1, {"prompt": "Hi"})], {"model": str(tmp_path / "nowhere")}))


@pytest.mark.slow
def test_ray_data_map_batches_as_documented() -> None:
    """The README's usage on a local `ray.init()`: two CPU actors, rows as Ray Data hands them over."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    rows = [
        {"id": "a", "prompt": "Describe.", "images": [str(SMALL_IMAGE)]},
        {"id": "b", "prompt": "<|ref|>The giraffe<|/ref|>.", "images": [str(GIRAFFES)]},
        {"id": "c", "prompt": "What is this?", "images": ["/no/such.png"]},
        {"id": "d", "prompt": "Hello", "images": []},
    ]
    dataset = ray.data.from_items(rows, override_num_blocks=2).map_batches(
        VLPredictor, fn_constructor_kwargs={"model": TINY, "device": "cpu", "max_new_tokens": 3},
        compute=ray.data.ActorPoolStrategy(size=2), batch_size=2,
    )  # fmt: skip
    answered = {row["id"]: row for row in dataset.take_all()}
    local = VLPredictor(TINY, device="cpu", max_new_tokens=3)
    for row in rows:
        expected = local.answer_rows([{"prompt": row["prompt"], "images": row["images"]}])[0]
        got = answered[row["id"]]
        assert {key: got[key] for key in expected} == expected
    assert "/no/such.png" in answered["c"]["error"] and answered["a"]["error"] is None


def test_loading_options_reach_vlchat(monkeypatch) -> None:
    from deepseek_vl.chat import VLChat

    seen = {}
    monkeypatch.setattr(VLChat, "from_pretrained", classmethod(lambda cls, model, **kwargs: seen.update(kwargs)))
    VLPredictor("some/model", device="cpu", dtype="bfloat16", quantize="int8", adapter="lora/")
    assert seen == {"device": "cpu", "dtype": "bfloat16", "progress": False, "quantize": "int8", "adapter": "lora/"}
