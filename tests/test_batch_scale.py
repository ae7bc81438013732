"""`deepseek-vl2 batch` beyond one process: --shard I/N + --merge (Slurm arrays), Parquet input, and --ray on a
local Ray cluster with two actors; each compared with the plain local run on the golden Tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deepseek_vl.distributed import parse_shard, shard_path
from deepseek_vl.serve.cli import main
from golden import GOLDEN, checkpoint

TINY = str(checkpoint("tiny"))
SMALL_IMAGE = GOLDEN / "images" / "tiny_8x8.png"
REQUESTS = [
    {"id": "a", "prompt": "Describe the image.", "images": ["pic.png"]},
    {"id": "b", "messages": [{"role": "user", "content": "Hello"}], "max_new_tokens": 2},
    {"id": "c", "prompt": "What is this?", "images": ["missing.png"]},
    {"id": 4, "messages": [{"role": "user", "content": "<image> vs <image>"}], "images": ["pic.png", "pic.png"]},
    {"id": "e", "prompt": "Hi there"},
]


def write_requests(folder: Path) -> Path:
    (folder / "pic.png").write_bytes(SMALL_IMAGE.read_bytes())
    source = folder / "requests.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS))
    return source


def batch(source: Path, output: Path, *flags: str) -> int:
    return main(["batch", str(source), str(output), "--model", TINY, "--max-new-tokens", "3", *flags])


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The plain run, one request at a time (so every other run can be compared token for token)."""
    folder = tmp_path_factory.mktemp("local")
    source = write_requests(folder)
    assert batch(source, folder / "answers.jsonl", "--batch-size", "1") == 1  # line 3 fails: exit 1
    return source, records(folder / "answers.jsonl")


def test_shard_spec() -> None:
    assert parse_shard("0/4") == (0, 4) and parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "1", "a/b", "-1/2", "1/0"):
        with pytest.raises(ValueError, match="I/N"):
            parse_shard(bad)
    assert shard_path(Path("out/answers.jsonl"), 1, 3) == Path("out/answers.shard-1-of-3.jsonl")


def test_bad_shard_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", "in.jsonl", "out.jsonl", "--shard", "2/2"])
    assert exit_info.value.code == 2 and "0 <= I < N" in capsys.readouterr().err


def test_shards_then_merge_equal_the_plain_run(local, tmp_path: Path) -> None:
    source, expected = local
    output = tmp_path / "answers.jsonl"
    assert batch(source, output, "--batch-size", "1", "--shard", "0/2") == 1  # lines 1, 3, 5 (3 fails)
    assert batch(source, output, "--batch-size", "1", "--shard", "1/2") == 0  # lines 2, 4
    assert [r["line"] for r in records(tmp_path / "answers.shard-0-of-2.jsonl")] == [1, 3, 5]
    assert [r["line"] for r in records(tmp_path / "answers.shard-1-of-2.jsonl")] == [2, 4]
    assert not output.exists()
    assert main(["batch", str(source), str(output), "--merge", "2"]) == 1  # merged, but line 3 is an error
    assert records(output) == expected


def test_merge_reports_missing_and_unfinished_shards(local, tmp_path: Path, capsys) -> None:
    source, expected = local
    output = tmp_path / "answers.jsonl"
    assert main(["batch", str(source), str(output), "--merge", "2"]) == 2
    assert "missing shard outputs" in capsys.readouterr().err
    first = [r for r in expected if r["line"] in (1, 5)]  # shard 0 stopped before line 3
    (tmp_path / "answers.shard-0-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first))
    (tmp_path / "answers.shard-1-of-2.jsonl").write_text("")
    assert main(["batch", str(source), str(output), "--merge", "2"]) == 1
    assert "2 of 5 lines answered" in capsys.readouterr().err
    assert [r["line"] for r in records(output)] == [1, 5]


def test_parquet_input_gives_the_jsonl_answers(local, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    source, expected = local
    rows = [dict(r) for r in REQUESTS]
    for row in rows:  # Parquet columns have one type: ids as strings, messages as JSON text
        row["id"] = str(row["id"])
        if "messages" in row:
            row["messages"] = json.dumps(row["messages"])
    parquet = source.with_suffix(".parquet")  # beside the JSONL file: image paths are relative to the input
    columns = ("id", "prompt", "messages", "images", "max_new_tokens")
    pq.write_table(pa.table({key: [row.get(key) for row in rows] for key in columns}), parquet)
    assert batch(parquet, tmp_path / "answers.jsonl", "--batch-size", "1") == 1
    got = records(tmp_path / "answers.jsonl")
    drop = ("id", "request_sha256")
    assert [{k: v for k, v in r.items() if k not in drop} for r in got] == [
        {k: v for k, v in r.items() if k not in drop} for r in expected
    ]


@pytest.mark.slow
def test_ray_batch_equals_the_local_batch_and_resumes(tmp_path: Path) -> None:
    """`batch --ray --concurrency 2` on a local Ray cluster: the local command's records (the failing line
    included), and a second run finds everything done."""
    source = write_requests(tmp_path)
    assert batch(source, tmp_path / "local.jsonl", "--batch-size", "2") == 1
    ray_output = tmp_path / "ray.jsonl"
    assert batch(source, ray_output, "--batch-size", "2", "--ray", "--concurrency", "2") == 1
    assert records(ray_output) == records(tmp_path / "local.jsonl")
    assert "missing.png" in records(ray_output)[2]["error"]
    before = ray_output.read_text()
    assert batch(source, ray_output, "--ray", "--concurrency", "2") == 1  # resumed: nothing left to answer
    assert ray_output.read_text() == before
