"""VLChat cases found in review: streamed pieces after a cancel."""

from __future__ import annotations

import threading

import torch

from deepseek_vl.chat import VLChat


def test_pieces_join_to_the_result_also_after_cancel(tiny: VLChat, monkeypatch) -> None:
    """The streamer holds back a possible start of a stop string; when the answer was cancelled that tail was
    never sent, so what the CLI printed after Ctrl-C differed from the answer it kept in the history."""
    tokens = tiny.tokenizer.encode("abc EN", add_special_tokens=False)
    cancelled = threading.Event()

    def scripted_generate(input_ids, streamer=None, **kwargs):
        streamer.put(input_ids.cpu())
        for token in tokens:
            streamer.put(torch.tensor([token]))
        cancelled.wait(timeout=30)
        return torch.cat([input_ids, torch.tensor([tokens])], dim=1)

    monkeypatch.setattr(tiny.model, "generate", scripted_generate)
    stream = tiny.chat([{"role": "user", "content": "Hi"}], stream=True, stop="END")
    pieces = iter(stream)
    first = next(pieces)
    stream.cancel()
    cancelled.set()
    assert (first + "".join(pieces), stream.result.finish_reason) == ("abc EN", "cancelled")
    assert stream.result.text == "abc EN"
