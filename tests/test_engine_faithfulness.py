"""The continuous-batching engine against the official implementation's tokens, not only against `VLChat.chat`.

The expected tokens were recorded from the official code (transformers 4.38.2, CPU, float32, one thread) on the
golden random-weight checkpoints, each conversation alone: greedy rows with `language.generate(inputs_embeds=...)`
as the model card, penalised and sampled rows with `vl_gpt.generate(input_ids=..., inputs_embeds=...)` after
`torch.manual_seed(seed)` as the official inference.py and web demo. Here the same conversations share one engine
batch: rows join mid-flight, three rows at most, prompts prefilled in chunks, a second turn and a shared long system
prompt reuse cached prefixes, a row is cancelled mid-prefill beside them. The official top-2 logit margins of
the greedy unpenalised tokens are all above 1e-2: no near-ties.
"""

from __future__ import annotations

import pytest

from deepseek_vl.engine import Engine
from golden import GOLDEN

IMAGES = GOLDEN / "images"
LONG_SYSTEM = (
    "You are a meticulous assistant who answers questions about images and documents. Always be precise, cite what "
    "you see, and never invent details. If you are unsure, say so. Keep answers short. "
) * 3
FIRST_TURN = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Tell me a story about the sea."}]
SECOND_QUESTION = {"role": "user", "content": "<image>\nAnd this one?", "images": [str(IMAGES / "tiny_8x8.png")]}
GROUNDING = [
    {"role": "user", "content": "<image>\n<|ref|>The giraffe at the back.<|/ref|>.", "images": [str(IMAGES / "multi_image_2.jpeg")]}
]  # fmt: skip
CONVERSATIONS = {
    "long_system_1": [
        {"role": "system", "content": LONG_SYSTEM},
        {"role": "user", "content": "<image>\nDescribe this image.", "images": [str(IMAGES / "multi_image_1.jpeg")]},
    ],
    "long_system_2": [
        {"role": "system", "content": LONG_SYSTEM},
        {"role": "user", "content": "<image>\nWhat is in the image?", "images": [str(IMAGES / "multi_image_1.jpeg")]},
    ],
    "long_text": [{"role": "user", "content": "Describe this image. " * 32}],
    "system": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Explain quantum computing in one sentence."},
    ],
    "grounding_sampled": GROUNDING,
    "penalised": [{"role": "user", "content": "Explain quantum computing in one sentence."}],
    # Tiny repeats " Edith" (86699) unpenalised: penalising the prompt's tokens too, as the official inference.py
    # and web demo do (generate gets input_ids), changes the first token; the answer's alone would not
    "penalised_prompt": [
        {"role": "user", "content": "<image>\nSay Edith Edith Edith.", "images": [str(IMAGES / "multi_image_2.jpeg")]}
    ],
}
OPTIONS = {
    "grounding_sampled": {"temperature": 0.4, "top_p": 0.9, "repetition_penalty": 1.1, "seed": 9},
    "penalised": {"repetition_penalty": 1.3},
    "penalised_prompt": {"repetition_penalty": 1.5},
}
NEW_TOKENS = 12

# official tokens: the whole first turn (its text is the next turn's assistant message), then 12 tokens per request
OFFICIAL = {
    "tiny": {
        "first_turn": [
            31256, 93113, 10767, 51413, 69770, 55823, 39002, 123805, 62078, 32185, 17422, 55087, 67803, 40834,
            117545, 86699, 64669, 118889, 64044, 57039, 39105, 100213, 98613, 50720,
        ],
        "second_turn": [110559, 119241, 120988, 20125, 112774, 44075, 102899, 128524, 69770, 117723, 120644, 17111],
        "long_system_1": [86699] * 12,
        "long_system_2": [86699] * 12,
        "long_text": [64044, 101734, 124727, 64044, 101734, 124727, 64044, 118437, 68096, 44473, 39934, 12582],
        "system": [3800, 22434, 36175, 114844, 329, 55087, 119645, 124101, 97978, 43430, 11077, 58805],
        "grounding_sampled": [86699, 88182, 65429, 119014, 103567, 69979, 48205, 104811, 48205, 18900, 84496, 19081],
        "penalised": [53056, 1156, 45885, 27865, 65173, 84278, 18970, 4062, 72104, 42434, 39050, 86752],
        "penalised_prompt": [84288, 69371, 125754, 107788, 32185, 118889, 64044, 70852, 97384, 15273, 11669, 107197],
    },
    "small": {
        "first_turn": [
            4031, 44556, 74091, 88593, 52991, 129064, 24624, 37850, 128478, 53906, 123776, 85682, 6736, 112430,
            20608, 66094, 9851, 108462, 122754, 83430, 94178, 90173, 81335, 23916,
        ],
        "second_turn": [6387, 15968, 103731, 118092, 129064, 23398, 13823, 77649, 70179, 84487, 43530, 76849],
        "long_system_1": [111207, 48317, 1790, 105597, 82507, 114842, 66955, 3640, 92289, 97217, 76833, 70524],
        "long_system_2": [111207, 48317, 1790, 105597, 82507, 114842, 66955, 3640, 92289, 97217, 76833, 70524],
        "long_text": [3486, 41847, 27195, 108370, 58109, 76194, 33317, 40469, 111330, 27283, 57579, 83430],
        "system": [29272, 8381, 123690, 68415, 59573, 3374, 34125, 91248, 54854, 2907, 121189, 22451],
        "grounding_sampled": [111207, 48317, 18665, 76833, 70524, 121730, 29920, 127540, 111330, 41579, 82507, 8392],
        "penalised": [61300, 69538, 50775, 12689, 18657, 79092, 89973, 50775, 28855, 114575, 68058, 15404],
    },
}  # fmt: skip


def run_until_done(engine: Engine, handles: list) -> None:
    while not all(handle.done.is_set() for handle in handles):
        engine.step()


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_engine_gives_the_official_tokens_under_joins_reuse_and_cancel(pipe_for, variant: str):
    official = OFFICIAL[variant]
    engine = Engine(pipe_for(variant), max_rows=3, prefill_budget=64)
    first = engine.submit(FIRST_TURN, max_new_tokens=len(official["first_turn"]))
    warm = engine.submit(CONVERSATIONS["long_system_1"], max_new_tokens=NEW_TOKENS)
    run_until_done(engine, [first, warm])
    assert first.wait().token_ids == official["first_turn"]
    assert warm.wait().token_ids == official["long_system_1"]

    second_turn = [*FIRST_TURN, {"role": "assistant", "content": first.wait().text}, SECOND_QUESTION]
    requests = {"second_turn": second_turn, **{name: CONVERSATIONS[name] for name in official if name in CONVERSATIONS}}
    handles, cancelled = {}, engine.submit(GROUNDING, max_new_tokens=NEW_TOKENS)
    for name, messages in requests.items():  # one joins every other step, the rest wait for one of the 3 rows
        handles[name] = engine.submit(messages, max_new_tokens=NEW_TOKENS, **OPTIONS.get(name, {}))
        engine.step()
        if name == "second_turn":
            cancelled.cancel()
        engine.step()
    run_until_done(engine, [cancelled, *handles.values()])
    assert cancelled.wait().finish_reason == "cancelled"
    assert {name: handle.wait().token_ids for name, handle in handles.items()} == {
        name: official[name] for name in handles
    }
    assert engine.runner.prefix_cache.hits >= 3  # the second turn, both long-system requests
    assert engine.max_batch == 3
