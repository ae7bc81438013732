"""VLPredictor as Ray Data hands it batches (numpy, pandas, pyarrow; struct cells with null fields), the Arrow types of
its result columns, column mistakes, and `batch --ray` when the actors cannot load the model; on the golden Tiny
checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from golden import GOLDEN, checkpoint

from deepseek_vl.distributed import RESULT_COLUMNS, VLPredictor, result_types
from deepseek_vl.serve.cli import main

TINY = str(checkpoint("tiny"))
SMALL_IMAGE = str(GOLDEN / "images" / "tiny_8x8.png")


@pytest.fixture(scope="module")
def predictor(tiny) -> VLPredictor:
    """A predictor over the shared Tiny model (its own VLChat, so settings such as max_image_pixels stay its own)."""
    from deepseek_vl.chat import VLChat

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            VLChat, "from_pretrained", classmethod(lambda cls, model, **kwargs: VLChat(tiny.model, tiny.processor))
        )
        yield VLPredictor(TINY, max_new_tokens=3)


def answer(predictor: VLPredictor, prompt: str, **options) -> str:
    return predictor.pipe.chat([{"role": "user", "content": prompt}], **{"max_new_tokens": 3} | options).text


def test_result_columns_have_one_arrow_type_whatever_the_rows(predictor: VLPredictor) -> None:
    """A batch whose rows all failed used to give null columns (boxes list<null> when no box was found): Parquet
    files of one job with several schemas, unreadable as one dataset."""
    failed, answered = predictor({"prompt": np.array([None], dtype=object)}), predictor({"prompt": np.array(["Hi"])})
    tables = [pa.table({column: out[column] for column in RESULT_COLUMNS}) for out in (failed, answered)]
    assert all(dict(zip(t.column_names, t.schema.types)) == result_types() for t in tables)
    both = pa.concat_tables(tables).to_pylist()
    assert 'either "messages"' in both[0]["error"] and both[0]["text"] is None
    assert both[1]["text"] == answer(predictor, "Hi") and both[1]["error"] is None and both[1]["boxes"] == []


def test_pandas_and_arrow_batches_come_back_in_their_format(predictor: VLPredictor) -> None:
    """batch_format="pandas" used to come back as lists with NaN for a missing string (pickled by Ray, unreadable by
    read_parquet); batch_format="pyarrow" failed. Passed-through columns keep their values and types."""
    messages = [None, '[{"role": "user", "content": "x"}]']
    frame = pd.DataFrame({"id": [7, 8], "prompt": ["Hi", None], "messages": messages})
    out = predictor(frame)
    assert isinstance(out, pd.DataFrame) and out[["id", "prompt", "messages"]].equals(frame)
    table = pa.Table.from_pandas(out)
    assert {name: table.schema.field(name).type for name in RESULT_COLUMNS} == result_types()
    assert table["text"].to_pylist() == [answer(predictor, "Hi"), answer(predictor, "x")]

    turn = {"role": "user", "content": "<image> What?", "images": [SMALL_IMAGE]}
    rows = pa.table({"id": ["a"], "messages": [[turn]]})
    out = predictor(rows)
    assert out.schema == pa.schema([*rows.schema, *(pa.field(name, kind) for name, kind in result_types().items())])
    expected = predictor.pipe.chat([turn], max_new_tokens=3)
    assert out["text"].to_pylist() == [expected.text] and out["prompt_tokens"].to_pylist() == [expected.prompt_tokens]


def test_null_fields_of_struct_cells_are_absent(predictor: VLPredictor) -> None:
    """Arrow gives each struct cell every field of its column: an unset option came as None ("temperature must be a
    number ..., got None") and failed the row."""
    batch = {
        "messages": np.array([[{"role": "user", "content": "Hi", "images": None, "name": None}]] * 2, dtype=object),
        "options": np.array([{"temperature": None, "max_new_tokens": 2, "system_prompt": None},
                             {"temperature": 0.0, "max_new_tokens": None, "system_prompt": "Be brief."}]),
    }  # fmt: skip
    out = predictor(batch)
    assert pa.array(out["error"]).to_pylist() == [None, None]  # pa.array: the test fails on the values, not the type
    assert pa.array(out["text"]).to_pylist() == [answer(predictor, "Hi", max_new_tokens=2),
                                       answer(predictor, "Hi", system_prompt="Be brief.")]  # fmt: skip


def test_column_mistakes_are_refused(predictor: VLPredictor) -> None:
    """A "text" or "error" column was overwritten by the answers; an "image" column was ignored (answers without
    the image). A string cell for "images" was "not valid JSON"."""
    with pytest.raises(ValueError, match=r"columns \['text'\], which VLPredictor writes"):
        predictor({"prompt": np.array(["Hi"]), "text": np.array(["kept?"])})
    with pytest.raises(ValueError, match='reads images from the column "images"'):
        predictor({"prompt": np.array(["Hi"]), "image": np.array([SMALL_IMAGE])})
    error = pa.array(predictor({"prompt": np.array(["Hi"]), "images": np.array([SMALL_IMAGE])})["error"])[0].as_py()
    assert "must be a list" in error and "put the image in a list" in error


def test_batch_ray_gives_the_actors_max_image_pixels(tiny, tmp_path, monkeypatch) -> None:
    """`batch --max-image-pixels N --ray` answered on the actors with VLChat's default limit instead of N."""
    from deepseek_vl import distributed
    from deepseek_vl.chat import VLChat

    seen = {}

    def run_ray_batch(rows, predictor_kwargs, **kwargs):
        seen.update(predictor_kwargs)
        return iter(())

    monkeypatch.setattr(distributed, "run_ray_batch", run_ray_batch)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    main(["batch", str(source), str(tmp_path / "out.jsonl"), "--model", TINY, "--ray", "--max-image-pixels", "10"])
    monkeypatch.setattr(
        VLChat, "from_pretrained", classmethod(lambda cls, model, **kwargs: VLChat(tiny.model, tiny.processor))
    )
    record = VLPredictor(**seen).answer_rows([{"prompt": "What?", "images": [SMALL_IMAGE]}])[0]  # as an actor
    assert "pixels" in record.get("error", "") and "10" in record["error"]


@pytest.mark.slow
def test_ray_job_output_round_trips_and_batch_ray_names_a_model_the_actors_cannot_load(
    tiny, tmp_path, monkeypatch, capsys
) -> None:
    """read_parquet -> map_batches(VLPredictor) -> write_parquet with one batch of failed rows and one of answers
    (the written files used to have two schemas: read_parquet failed "Unsupported cast from string to null");
    `batch --ray` with a model folder the actors cannot load (was a Ray traceback, exit 1) or named relative to a
    folder the actors do not run in (loaded as a Hub id)."""
    import pyarrow.parquet as pq
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "prompt": ["Hi", "Hello", None, None]}), tmp_path / "q.parquet")
    answered = ray.data.read_parquet(str(tmp_path / "q.parquet")).map_batches(
        VLPredictor, fn_constructor_kwargs={"model": TINY, "device": "cpu", "dtype": "float32", "max_new_tokens": 3},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=2,
    )  # fmt: skip
    answered.write_parquet(str(tmp_path / "answers"))
    rows = sorted(pq.read_table(tmp_path / "answers").to_pylist(), key=lambda row: row["id"])
    for row, prompt in zip(rows, ["Hi", "Hello"]):
        assert row["text"] == tiny.chat([{"role": "user", "content": prompt}], max_new_tokens=3).text
    assert [row["error"] is None for row in rows] == [True, True, False, False]

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    (tmp_path / "empty").mkdir()
    assert main(["batch", str(source), str(tmp_path / "out.jsonl"), "--model", str(tmp_path / "empty"), "--ray"]) == 2
    assert "the Ray actors could not load the model" in capsys.readouterr().err
    (tmp_path / "tiny").symlink_to(TINY)
    monkeypatch.chdir(tmp_path)
    assert main(["batch", "in.jsonl", "out.jsonl", "--model", "tiny", "--ray", "--dtype", "float32",
                 "--max-new-tokens", "3"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "out.jsonl").read_text())["text"] == rows[0]["text"]
