"""The standard metrics of the benchmarks DeepSeek-VL2 reports, each as its benchmark's own scorer defines it.

- `box_iou` / grounding accuracy: RefCOCO counts a prediction correct when IoU >= 0.5 with the ground-truth box,
  in pixels of the original image.
- `anls`: DocVQA's Average Normalized Levenshtein Similarity (threshold 0.5, case-insensitive, whitespace folded),
  with the official scorer's quirks: the edit distance is divided by the longer raw (unfolded) string, and a
  similarity of exactly 0.5 counts.
- `vqa_accuracy`: the VQA v2 scorer (GT-Vision-Lab/VQA `vqaEval.py`): the answer is normalised (punctuation,
  number words, articles, contractions), and it scores min(1, matches among the other 9 humans / 3), averaged
  over the 10 leave-one-out subsets. Its quirks are kept: ground truths lose punctuation only when the humans
  disagree, and the period strip removes at most 32 periods.
- `extract_option`: the option letter of a multiple-choice answer ("B", "(B)", "B. text", "The answer is B",
  or an answer that is exactly one option's text); None (counted wrong) when it cannot be read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

__all__ = ["anls", "box_iou", "extract_option", "normalize_vqa_answer", "vqa_accuracy"]

Box = Sequence[float]  # x1, y1, x2, y2


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes (0 when either has no area)."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(width, 0.0) * max(height, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Best 1 - normalised edit distance over the accepted answers; 0 when that similarity is < threshold.

    As the official DocVQA scorer: the distance is between the folded strings (case, outer and repeated
    whitespace) but divided by the longer of the raw strings, and a similarity of exactly 0.5 still counts."""
    predicted = " ".join(prediction.strip().lower().split())
    distances = []
    for answer in answers:
        answer = str(answer)
        truth = " ".join(answer.strip().lower().split())
        longest = max(len(answer.upper()), len(prediction.upper()))
        distances.append(_levenshtein(predicted, truth) / longest if longest else 0.0)
    similarity = 1.0 - min(distances, default=1.0)
    return similarity if similarity >= threshold else 0.0


# The VQA v2 normalisation tables (data from the official scorer).
_PUNCTUATION = [
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
]  # fmt: skip
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern: a lookahead, so "1.5" keeps its period
_CONTRACTIONS = dict(pair.split(":") for pair in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've "
    "couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've "
    "hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd "
    "howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've "
    "it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't mightnt've:mightn't've "
    "mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't notve:not've "
    "oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't "
    "shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've "
    "shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've "
    "somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've "
    "someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd "
    "somethingd've:something'd've something'dve:something'd've somethingll:something'll thats:that's "
    "thered:there'd thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd "
    "theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't "
    "wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's "
    "whatve:what've whens:when's whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've "
    "who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll whyre:why're whys:why's wont:won't "
    "wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll "
    "y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've "
    "you'dve:you'd've youll:you'll youre:you're youve:you've"
).split())  # fmt: skip


def _strip_punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        if f"{mark} " in text or f" {mark}" in text or _COMMA_IN_NUMBER.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out, count=32)  # the official call passes re.UNICODE (32) as the count


def _digits_and_articles(text: str) -> str:
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The official normalisation of a model answer."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_strip_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA v2 accuracy of one answer against the human answers (usually 10)."""
    if not answers:
        raise ValueError("a VQA sample needs at least one ground-truth answer")
    predicted = normalize_vqa_answer(prediction)
    truths = [str(answer) for answer in answers]
    if len(set(truths)) > 1:
        truths = [_strip_punctuation(truth) for truth in truths]
    scores = [
        min(1.0, sum(other == predicted for other in truths[:index] + truths[index + 1 :]) / 3)
        for index in range(len(truths))
    ]
    return sum(scores) / len(scores)


_LETTER_PATTERNS = (
    r"^\(([A-Z])\)",  # "(B)", "(B) text"
    r"^([A-Z])(?:[.:)]|$)",  # "B", "B.", "B)", "B: text" (not "A cat")
    r"\b(?i:answer|option|choice)\s*(?i:is)?:?\s*\(?([A-Z])\)?(?:[.:)]|\s|$)",  # "The answer is (B)."
)


def extract_option(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter an answer picks, or None (counted wrong) when it names none or several."""
    text = answer.strip()
    for pattern in _LETTER_PATTERNS:
        match = re.search(pattern, text)
        if match and match.group(1) in options:
            return match.group(1)
    folded = text.lower().rstrip(".").strip()
    named = [letter for letter, option in options.items() if str(option).strip().lower().rstrip(".") == folded]
    return named[0] if len(named) == 1 else None
