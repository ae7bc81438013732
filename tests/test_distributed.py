"""VLPredictor (the Ray Data callable) on the golden Tiny checkpoint: in-process, pickled, and on a local Ray
cluster with two actors, against VLChat and the local `deepseek-vl2 batch` command."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from deepseek_vl.distributed import RESULT_COLUMNS, VLPredictor, run_ray_batch
from golden import GOLDEN, checkpoint

TINY = str(checkpoint("tiny"))
SMALL_IMAGE = GOLDEN / "images" / "tiny_8x8.png"
GIRAFFES = GOLDEN / "images" / "visual_grounding_1.jpeg"


@pytest.fixture(scope="module")
def predictor() -> VLPredictor:
    return VLPredictor(TINY, device="cpu", max_new_tokens=4)


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
    out = predictor(batch)
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


def test_rows_without_prompt_or_messages_are_errors(predictor: VLPredictor) -> None:
    out = predictor({"id": [1, 2], "prompt": [None, "a"], "messages": [None, '[{"role": "user", "content": "b"}]']})
    assert all('either "messages"' in error for error in out["error"])


def test_predictor_survives_pickling(predictor: VLPredictor) -> None:
    """Ray ships the class and its constructor arguments; an instance pickles too (e.g. for task pools)."""
    clone = pickle.loads(pickle.dumps(predictor))
    batch = {"prompt": ["Hello"]}
    assert clone(batch)["text"] == predictor(batch)["text"]


def test_bad_constructor_options_fail_early() -> None:
    with pytest.raises(ValueError, match="unknown generation options"):
        VLPredictor(TINY, max_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        VLPredictor(TINY, temperature=-1)


@pytest.mark.slow
def test_local_ray_cluster_gives_the_local_batch_answers(tmp_path: Path) -> None:
    """Two CPU actors on a local `ray.init()`: the records equal the local batch command's, a failing row included."""
    from deepseek_vl.serve.cli import main

    (tmp_path / "pic.png").write_bytes(SMALL_IMAGE.read_bytes())
    requests = [
        {"id": "a", "prompt": "Describe the image.", "images": ["pic.png"]},
        {"id": "b", "prompt": "<|ref|>The giraffe<|/ref|>.", "images": [str(GIRAFFES)]},
        {"id": "c", "messages": [{"role": "user", "content": "Hello"}], "max_new_tokens": 2},
        {"id": "d", "prompt": "What is this?", "images": ["missing.png"]},
        {"id": 5, "messages": [{"role": "user", "content": "<image> vs <image>"}], "images": ["pic.png", "pic.png"]},
    ]
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in requests))
    local = tmp_path / "local.jsonl"
    assert main(["batch", str(source), str(local), "--model", TINY, "--max-new-tokens", "3", "--batch-size", "2"]) == 0
    expected = [json.loads(line) for line in local.read_text().splitlines()]

    rows = [(n, request) for n, request in enumerate(requests, 1)]
    kwargs = {"model": TINY, "device": "cpu", "max_new_tokens": 3, "base_dir": str(tmp_path)}
    records = list(run_ray_batch(rows, kwargs, concurrency=2, batch_size=2))
    assert records == sorted(expected, key=lambda record: record["line"])
    assert "missing.png" in records[3]["error"] and records[3]["id"] == "d"
