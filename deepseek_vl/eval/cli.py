"""`deepseek-vl2 eval`: a benchmark's standard metric on a local data file, with per-sample predictions.

Parser building imports only the standard library; the model, Ray and the tasks load when the command runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "evaluate"]

TASK_NAMES = ("refcoco", "docvqa", "vqa", "mmmu-style")

DESCRIPTION = """\
Run a benchmark's data file through the model and compute its standard metric:
  refcoco     grounding accuracy: IoU >= 0.5 between the first predicted box and "bbox" (COCO [x, y, w, h], pixels)
  docvqa      ANLS against "answers"
  vqa         VQA accuracy (official answer normalisation) against the 10 human "answers"
  mmmu-style  multiple-choice accuracy: the option letter read from the answer vs "answer"
Data lines (JSONL; image paths relative to the data file):
  {"id": 1, "image": "coco/1.jpg", "expression": "the man on the left", "bbox": [10, 20, 100, 200]}
  {"id": 2, "image": "doc.png", "question": "What is the date?", "answers": ["1 May 2020", "May 1, 2020"]}
  {"id": 3, "images": ["a.png"], "question": "Which ...? <image 1>", "options": ["x", "y"], "answer": "B"}
Writes OUTPUT_DIR/TASK_predictions.jsonl (one line per sample: prompt, answer, score, details) and
OUTPUT_DIR/TASK_summary.json (the metric, counts, settings), and prints the summary.
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from deepseek_vl.serve.cli import add_model_arguments

    parser = subparsers.add_parser(
        "eval", help="compute a benchmark metric (RefCOCO, DocVQA, VQA, MMMU-style) on a local data file",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--task", required=True, choices=TASK_NAMES, help="the benchmark format and metric")
    parser.add_argument("--data", required=True, metavar="DATA.jsonl", help="the samples, one JSON object per line")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate the first N samples only")
    parser.add_argument("--output-dir", default="eval_results", metavar="DIR", help="default: %(default)s")
    parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="default: %(default)s")
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, metavar="N", help="longest answer (default: 64 for every task)"
    )
    parser.add_argument(
        "--engine", action="store_true",
        help="answer through the continuous-batching engine (--batch-size rows at once) instead of fixed batches",
    )  # fmt: skip
    parser.add_argument("--ray", action="store_true", help="answer on a Ray cluster (pip install '.[distributed]')")
    parser.add_argument("--ray-address", metavar="ADDR", help="an existing cluster (default: start a local one)")
    parser.add_argument("--concurrency", type=_positive_int, default=1, metavar="N", help="Ray model replicas")
    parser.add_argument("--num-gpus", type=float, default=0, metavar="G", help="GPUs per Ray replica (default 0)")
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the answers an earlier (interrupted) run wrote to OUTPUT_DIR for the same lines, model and "
             "settings; answer only the rest",
    )  # fmt: skip
    add_model_arguments(parser)
    parser.set_defaults(handler=run_eval)


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def run_eval(args: argparse.Namespace) -> int:
    summary = evaluate(
        args.task, Path(args.data), model=args.model, device=args.device, dtype=args.dtype, limit=args.limit,
        output_dir=Path(args.output_dir), batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        engine=args.engine, ray=args.ray, ray_address=args.ray_address, concurrency=args.concurrency,
        num_gpus=args.num_gpus, loading={key: getattr(args, key, None) for key in ("quantize", "adapter")},
        resume=args.resume,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


def evaluate(
    task_name: str,
    data: Path,
    *,
    model: str,
    device: str = "auto",
    dtype: str = "auto",
    limit: int | None = None,
    output_dir: Path = Path("eval_results"),
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    engine: bool = False,
    ray: bool = False,
    ray_address: str | None = None,
    concurrency: int = 1,
    num_gpus: float = 0,
    loading: dict[str, Any] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Answer and score every sample; returns the summary (also written to OUTPUT_DIR/TASK_summary.json).

    `loading` holds `quantize` / `adapter` for the model, as `VLChat.from_pretrained`. Every answer is appended
    to OUTPUT_DIR/TASK_answers.jsonl as it comes; `resume` keeps those whose line, model and settings match, so an
    interrupted run answers only the rest."""
    from tqdm import tqdm

    from deepseek_vl.eval.tasks import TASKS

    task = TASKS[task_name]
    if not data.is_file():
        raise FileNotFoundError(f"data file {str(data)!r} does not exist")
    # Lines end at "\n" only: JSON strings may hold U+2028 and friends, which splitlines() would split on. A sample
    # keeps its line number in the file (blank lines counted), so an error names the line to fix; a BOM is dropped.
    lines = enumerate(data.read_text(encoding="utf-8-sig").split("\n"), 1)
    numbered = [(number, line) for number, line in lines if line.strip()][:limit]
    folder = data.resolve().parent
    tokens = max_new_tokens or task.max_new_tokens
    loading = {key: value for key, value in (loading or {}).items() if value is not None}
    output_dir.mkdir(parents=True, exist_ok=True)
    from deepseek_vl.options import model_reference

    named = {key: model_reference(value) if key == "adapter" else value for key, value in loading.items()}
    settings = json.dumps([model_reference(model), dtype, tokens, sorted(named.items())])  # a folder however given
    keys = {number: hashlib.sha256(f"{settings}\n{line}".encode()).hexdigest() for number, line in numbered}
    journal = output_dir / f"{task_name}_answers.jsonl"
    kept = _journaled(journal, keys) if resume else {}
    # images a task derives (mmmu-style's enlarged one) go to disk here until answered; beside the output, so
    # Ray actors on other machines reach it where OUTPUT_DIR is a shared folder, as they reach the data's images
    with tempfile.TemporaryDirectory(prefix=f".{task_name}-inputs-", dir=output_dir) as scratch:
        samples, rows = [], []
        for number, line in numbered:
            sample: dict[str, Any] = {"line": number}
            try:
                record = json.loads(line)
                task.check(record)
                sample |= {"id": record.get("id"), "record": record}
                prompt, images = task.build(record, folder, Path(scratch))
                sample["prompt"] = prompt
                if number not in kept:
                    rows.append((number, {"prompt": prompt, "images": images}))
            except (ValueError, OSError) as error:  # a bad line is scored 0 with its reason, the run goes on
                sample["error"] = f"{type(error).__name__}: {error}"
            samples.append(sample)

        started = time.perf_counter()
        answers: dict[int, dict[str, Any]] = dict(kept)
        predictor = {"model": model, "device": device, "dtype": dtype, "max_new_tokens": tokens} | loading
        way = "ray" if ray else "engine" if engine else "batches"
        with tqdm(total=len(rows), desc=f"eval {task_name}", unit="sample", file=sys.stderr) as bar, \
                journal.open("a" if resume else "w", encoding="utf-8") as written:  # fmt: skip
            if written.tell():  # a line cut short by the interruption stays apart from ours (blank lines are skipped)
                written.write("\n")
            for line, answer in _answer(rows, predictor, way, batch_size, ray_address, concurrency, num_gpus):
                answers[line] = answer
                if not answer.get("error"):  # a failed answer (out of memory, say) is tried again on resume
                    written.write(json.dumps({"key": keys[line], "answer": answer}, ensure_ascii=False) + "\n")
                    written.flush()
                bar.update(1)
    seconds = time.perf_counter() - started

    predictions = output_dir / f"{task_name}_predictions.jsonl"
    scores, errors, unparsed = [], 0, 0
    with predictions.open("w", encoding="utf-8") as out:
        for sample in samples:
            answer = answers.get(sample["line"], {})
            record = sample.pop("record", None)
            if "error" not in sample and answer.get("error"):
                sample["error"] = answer["error"]
            if "error" not in sample:
                sample |= {"answer": answer["text"], "finish_reason": answer["finish_reason"]}
                try:
                    details = task.score(record, answer["text"], folder)
                except (ValueError, OSError) as error:
                    details = {"score": 0.0, "error": f"{type(error).__name__}: {error}"}
                sample |= details
                unparsed += details.get("extracted", "") is None or details.get("num_boxes") == 0
            if "error" in sample:
                errors += 1
                sample["score"] = 0.0
            scores.append(sample["score"])
            out.write(json.dumps(sample, ensure_ascii=False) + "\n")
    summary = {
        "task": task_name, "metric": task.metric, "score": sum(scores) / len(scores) if scores else None,
        "samples": len(samples), "errors": errors, "unparsed_answers": unparsed, "model": model, "data": str(data),
        "max_new_tokens": tokens, "answered_by": way, "resumed": len(kept), "seconds": round(seconds, 2),
        "predictions": str(predictions),
    }  # fmt: skip
    (output_dir / f"{task_name}_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _journaled(journal: Path, keys: dict[int, str]) -> dict[int, dict[str, Any]]:
    """The answers an earlier run wrote for lines whose text, model and settings are unchanged, by line number; a
    line cut short by the interruption is skipped."""
    if not journal.is_file():
        return {}
    lines = {key: number for number, key in keys.items()}
    kept = {}
    for text in journal.read_text(encoding="utf-8").split("\n"):
        try:
            entry = json.loads(text)
            number = lines.get(entry["key"])
        except (ValueError, KeyError, TypeError):
            continue
        if number is not None:
            kept[number] = entry["answer"]
    return kept


def _answer(rows, predictor, way, batch_size, ray_address, concurrency, num_gpus):
    """(line, answer record) pairs: VLChat's fixed batches, the continuous-batching engine, or Ray actors."""
    from deepseek_vl.distributed import VLPredictor, run_ray_batch

    if not rows:  # every line failed to parse: no model to load, no cluster to start
        return
    if way == "ray":
        for record in run_ray_batch(rows, predictor, address=ray_address, concurrency=concurrency,
                                    batch_size=batch_size, num_gpus=num_gpus):  # fmt: skip
            yield record["line"], record
        return
    local = VLPredictor(**predictor)
    if way == "engine":
        yield from _answer_on_engine(rows, local, batch_size)
        return
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        for (line, _), record in zip(chunk, local.answer_rows([row for _, row in chunk])):
            yield line, record


def _answer_on_engine(rows, local, max_rows):
    """The engine keeps `max_rows` generating and refills a row as one finishes; samples are submitted at most
    2 x `max_rows` ahead, so only their images are in memory, not the whole data set's."""
    import collections

    from deepseek_vl.engine import Engine

    def finished(line, handle):
        try:
            return line, {"error": handle} if isinstance(handle, str) else handle.wait().to_dict()
        except Exception as error:  # noqa: BLE001
            return line, {"error": f"{type(error).__name__}: {error}"}

    engine = Engine(local.pipe, max_rows=max_rows)
    engine.start()
    try:
        pending: collections.deque = collections.deque()  # (line, handle or error), in order
        for line, row in rows:
            try:
                messages = [{"role": "user", "content": row["prompt"]}]
                pending.append((line, engine.submit(messages, row["images"], **local.defaults)))
            except Exception as error:  # noqa: BLE001 - a sample that cannot be prepared is recorded, not fatal
                pending.append((line, f"{type(error).__name__}: {error}"))
            while len(pending) > 2 * max_rows:
                yield finished(*pending.popleft())
        while pending:
            yield finished(*pending.popleft())
    finally:
        engine.stop()
