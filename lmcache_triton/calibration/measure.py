"""Exact against decoded: the metrics of a calibration run, and the prompt sets it runs.

`compare(exact, decoded, answers)` takes two greedy generations per prompt (`Generation`: token
ids, each position's top logprobs, text, prompt tokens served from the cache) and returns
`record.Metrics`:

  * positions are compared up to and including each prompt's FIRST disagreement: after it the
    two runs see different contexts and nothing more is comparable (counting the rest as
    disagreements would make one early flip look like a broken codec, and counting them as
    agreements would be wrong);
  * top-1 agreement = agreeing positions / compared positions;
  * logprob deviation, per compared position, = |logprob of the exact run's token under the
    exact run - the same token's logprob under the decoded run|; where the decoded run's top-k
    list lacks that token, its logprob is at most the list's smallest, which gives a lower
    bound (used as is: the deviation is then at least that large);
  * accuracy = the generation, stripped, starts with the answer followed by a non-word character
    or the end;
  * a prompt whose decoded run loaded nothing from the cache (a chunk write dropped, a prompt
    shorter than a chunk) measures nothing about the codec: it is left out of every measure.

Prompt sets: `read_prompt_set(path)` reads JSONL lines `{"prompt": str | "prompt_token_ids":
[int], "answer": str (optional)}` or a text file (one prompt a line); `builtin_prompts()` is the
small set used when none is given (English passages long enough to span several chunks, half
with a question and its answer).

Torch-free and vLLM-free.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lmcache_triton.prompt_file import read_prompt_file

from .record import Metrics


class PromptSetError(ValueError):
    """A prompt set that cannot be used (one line naming the file and line)."""


@dataclass
class Prompt:
    """One calibration prompt: text or token ids, and an optional expected answer."""

    text: str | None = None
    token_ids: list[int] | None = None
    answer: str | None = None

    def as_vllm(self, salt: str) -> dict:
        """The prompt for `LLM.generate`, with a `cache_salt` of its own (so no prompt's chunks
        serve another prompt: the exact run must be a miss)."""
        base: dict = {"prompt_token_ids": list(self.token_ids)} if self.token_ids is not None else {"prompt": self.text}
        return {**base, "cache_salt": salt}


@dataclass
class Generation:
    """A greedy generation: token ids, per position the top logprobs `{token id: logprob}` (the
    chosen token included), the text, and the prompt tokens vLLM reports as cached."""

    token_ids: list[int]
    top: list[dict[int, float]]
    text: str = ""
    cached_tokens: int = 0
    prompt_tokens: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: dict) -> Generation:
        return cls(
            [int(t) for t in obj["token_ids"]],
            [{int(k): float(v) for k, v in pos.items()} for pos in obj["top"]],
            str(obj.get("text", "")),
            int(obj.get("cached_tokens", 0)),
            int(obj.get("prompt_tokens", 0)),
        )

    def to_json(self) -> dict:
        return {
            "token_ids": self.token_ids,
            "top": [{str(k): v for k, v in pos.items()} for pos in self.top],
            "text": self.text,
            "cached_tokens": self.cached_tokens,
            "prompt_tokens": self.prompt_tokens,
        }


def is_correct(text: str, answer: str) -> bool:
    """`text`, stripped, starts with `answer` (stripped) followed by the end or a non-word
    character: "Paris." answers "Paris", "w170" does not answer "w17"."""
    t, a = text.strip(), answer.strip()
    if not a or not t.startswith(a):
        return False
    rest = t[len(a) :]
    return not rest or not (rest[0].isalnum() or rest[0] == "_")


def compare(exact: list[Generation], decoded: list[Generation], answers: list[str | None]) -> Metrics:
    """The metrics of `decoded` against `exact` (module docstring); lists are per prompt.

    Raises:
        ValueError: the lists differ in length, or a generation's `top` does not match its tokens.
    """
    if not len(exact) == len(decoded) == len(answers):
        raise ValueError(f"compare: {len(exact)} exact, {len(decoded)} decoded, {len(answers)} answers")
    compared = agreed = 0
    devs: list[float] = []
    equal = 0
    right_exact = right_codec = answered = 0
    prompts = 0
    for e, d, ans in zip(exact, decoded, answers, strict=True):
        if len(e.top) != len(e.token_ids) or len(d.top) != len(d.token_ids):
            raise ValueError("compare: a generation has top logprobs for a different number of tokens")
        if d.cached_tokens <= 0:
            continue  # no decoded KV in this run: nothing to learn about the codec
        prompts += 1
        equal += e.token_ids == d.token_ids
        for i, tok in enumerate(e.token_ids):
            if i >= len(d.token_ids):
                break  # the decoded run stopped (EOS) where the exact one went on: a disagreement seen at i - 1
            compared += 1
            lp_e = e.top[i][tok]
            if tok in d.top[i]:
                devs.append(abs(lp_e - d.top[i][tok]))
            else:  # below the decoded run's top-k: its logprob is at most the list's smallest
                devs.append(max(0.0, lp_e - min(d.top[i].values())) if d.top[i] else float("inf"))
            if d.token_ids[i] != tok:
                break
            agreed += 1
        if ans is not None:
            answered += 1
            right_exact += is_correct(e.text, ans)
            right_codec += is_correct(d.text, ans)
    return Metrics(
        prompts=prompts,
        tokens=compared,
        loaded_tokens=sum(d.cached_tokens for d in decoded),
        top1_agreement=agreed / compared if compared else 0.0,
        mean_logprob_dev=sum(devs) / len(devs) if devs else 0.0,
        max_logprob_dev=max(devs) if devs else 0.0,
        sequences_equal=equal / prompts if prompts else 0.0,
        answered=answered,
        accuracy_exact=right_exact / answered if answered else None,
        accuracy_codec=right_codec / answered if answered else None,
    )


def read_prompt_set(path: str | os.PathLike) -> list[Prompt]:
    """Prompts from `.jsonl` (`"prompt"` or `"prompt_token_ids"`, optional `"answer"`) or a text
    file (one prompt a line, blank lines skipped).

    Raises:
        PromptSetError: unreadable file, a bad line, or no prompts.
    """

    def from_object(obj: dict, where: str) -> Prompt:
        ans = obj.get("answer")
        if ans is not None and not isinstance(ans, str):
            raise PromptSetError(f'{where}: "answer" must be a string')
        ids = obj.get("prompt_token_ids")
        if isinstance(obj.get("prompt"), str) and obj["prompt"]:
            return Prompt(text=obj["prompt"], answer=ans)
        if isinstance(ids, list) and ids and all(type(t) is int and t >= 0 for t in ids):
            return Prompt(token_ids=list(ids), answer=ans)
        raise PromptSetError(f'{where}: expected a non-empty string "prompt" or a list of token ids "prompt_token_ids"')

    return read_prompt_file(path, PromptSetError, lambda line: Prompt(text=line), from_object)


_PASSAGES = [
    "The river starts in the high valleys, where snow melts slowly through the spring and feeds a hundred small "
    "streams. By the time it reaches the plain it is wide and brown, carrying silt that the farmers along its "
    "banks have depended on for centuries.",
    "A good kitchen knife is sharpened on a stone at a steady angle, with light pressure and long strokes. Cooks "
    "who keep their knives sharp cut more safely, because a dull blade slips where a sharp one bites.",
    "The library opened its doors in the morning to a line of students who had waited since dawn. Inside, the "
    "reading room smelled of old paper and floor polish, and the long tables filled within minutes.",
    "Bees communicate the direction of flowers with a dance: the angle of the run against the vertical shows the "
    "angle to the sun, and the length of the run tells the distance to the food.",
    "When the train left the station the city gave way to fields, then to forest, and then to a long lake that "
    "caught the evening light. The passengers fell quiet and watched the water go by.",
    "To bake bread, mix flour, water, salt and yeast, knead the dough until it is smooth, and let it rise in a "
    "warm place. Shape the loaf, let it rise again, and bake it in a hot oven until the crust is brown.",
    "The old lighthouse stood on a rock at the mouth of the harbor. For a hundred years its keepers trimmed the "
    "wick and wound the clockwork that turned the lens, until the light was made automatic.",
    "Mathematics students first learn to add and multiply, then to solve equations, and later to prove that what "
    "they computed is true for every number and not only for the examples they tried.",
]
_QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("How many days are there in a week?", "Seven"),
    ("What color is the sky on a clear day?", "Blue"),
    ("What is two plus two?", "Four"),
    ("Which animal is known as the king of the jungle?", "The lion"),
    ("What do bees make?", "Honey"),
    ("What is frozen water called?", "Ice"),
    ("How many legs does a spider have?", "Eight"),
]


def builtin_prompts() -> list[Prompt]:
    """The built-in set: 16 prompts of roughly 150-300 tokens (for most tokenizers), the first
    8 continuations of passages, the last 8 questions after a passage, with their answers."""
    out = []
    n = len(_PASSAGES)
    for i in range(n):
        out.append(Prompt(text=" ".join(_PASSAGES[(i + j) % n] for j in range(3))))
    for i, (q, a) in enumerate(_QUESTIONS):
        context = " ".join(_PASSAGES[(i + j) % n] for j in range(2))
        out.append(Prompt(text=f"{context}\n\nQuestion: {q}\nAnswer:", answer=a))
    return out
