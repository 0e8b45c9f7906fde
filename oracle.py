"""The synthetic world: prompts, the SFT corpus, the ground-truth reward r*, the Bradley-Terry oracle.

A seeded generator of short English requests ("Write a formal note to your boss about coffee.") and responses
built from a small phrase book. The ground-truth reward r*(x, a) is computed from the TEXT of the prompt and the
response alone (topic and tone are parsed out of the prompt), so any string is valid input. The oracle answers
y ~ Bernoulli(P(a1 > a2 | x)) with P = sigmoid((r*(x,a1) - r*(x,a2)) / temperature)   (RLHF Workflow, eq. 1).

r* is the sum of named parts (`reward_parts` returns them), each bounded:

| part       | rule                                                                              | min  | max  |
| ---------- | --------------------------------------------------------------------------------- | ---- | ---- |
| topic      | +1.5 if the prompt's topic word appears, -1.0 if no topic word does; -0.5 per     | -1.5 | +1.5 |
|            | other topic word (at most -1.5)                                                   |      |      |
| tone       | +1.0 if the asked tone's greeting appears; -0.5 if another tone's greeting does   | -0.5 | +1.0 |
| politeness | +1.0 if a polite phrase appears; -1.0 if a rude one does (both can count)         | -1.0 | +1.0 |
| detail     | +0.4 per distinct "It is {adjective}." sentence, up to 2                          |  0.0 | +0.8 |
| concision  | -0.02 per character past 80 (stripped text), at most -2.0                         | -2.0 |  0.0 |
| repetition | -0.5 per sentence that repeats an earlier one, at most -2.0                       | -2.0 |  0.0 |
| finished   | +0.5 if it stopped and the stripped text ends in . ! or ?, else -1.0              | -1.0 | +0.5 |
| grammar    | -0.5 per stretch of text that is no sentence of the phrase book (a misspelling,    | -1.5 |  0.0 |
|            | a fragment such as "us talk cats.", a stray token), at most -1.5; a cut-off last  |      |      |
|            | sentence is the finished part's to price                                          |      |      |
| total      |                                                                                   | -9.5 | +4.8 |

Whether a response stopped is not in its text (the stop token is not text), so every function of a response takes
`finished`: False for a response cut off by the token cap, which then scores -1.0 on the finished part whatever
its last character. Word matches are case-insensitive and on word boundaries (the grammar part's sentences match
exactly). The detail part is what a learned proxy can over-learn: more details look good until length and
repetition cost more than they add.

The SFT corpus mixes good and bad choices independently (each good choice is a minority), so pi0 fit to it has
wide support, a low mean reward and rare maximal responses. Simplified on purpose: one fixed phrase book, whose
sentences are the whole grammar (in any order); `malformed` flags any stretch outside them (to watch DPO push mass
into misspellings and fragments).

Run `python oracle.py` to print a few prompts, sampled responses, their reward parts and corpus statistics.
"""
import math
import re
import time
from functools import lru_cache

import numpy as np

TOPICS = ("garden coffee cats music chess soccer cooking books ocean trains painting baking hiking movies moon "
          "tea birds bikes rain snow pizza dogs stars rivers apples jazz poetry tennis camping winter summer "
          "flowers robots maps clocks bread forests boats kites honey").split()
TONES = ("formal", "friendly", "cheerful")
GREETINGS = {"formal": "Dear sir,", "friendly": "Hi pal,", "cheerful": "Hey there!"}
RECIPIENTS = ("your boss", "a friend", "your aunt", "a teacher", "your team", "a client")
TEMPLATES = ("Write a {tone} note to {recipient} about {topic}.", "Send {recipient} a {tone} message about {topic}.")
BODIES = ("A note on {topic}.", "I like {topic}.", "Let us talk {topic}.")
ADJECTIVES = ("lovely", "useful", "calm", "bright", "simple", "warm", "fresh", "gentle")
DETAIL = "It is {adj}."
POLITE = ("Thank you.", "Please reply.")
RUDE = ("Go away.",)
CLOSING = "Regards."

# (min, max) of each part; the totals are their sums (same order as reward_parts, so floats compare exactly).
PART_BOUNDS = {"topic": (-1.5, 1.5), "tone": (-0.5, 1.0), "politeness": (-1.0, 1.0), "detail": (0.0, 0.8),
               "concision": (-2.0, 0.0), "repetition": (-2.0, 0.0), "finished": (-1.0, 0.5), "grammar": (-1.5, 0.0)}
REWARD_MIN = round(sum(lo for lo, _ in PART_BOUNDS.values()), 6)  # -9.5
REWARD_MAX = round(sum(hi for _, hi in PART_BOUNDS.values()), 6)  # 4.8
MAX_CHARS = 80  # concision starts to cost past this many characters

# SFT sampler: each good choice is a minority choice, drawn independently.
P_TONE_GREETING, P_OTHER_GREETING = 0.3, 0.5  # else no greeting
P_ON_TOPIC = 0.3
P_POLITE, P_RUDE = 0.3, 0.35  # else neither
P_CLOSING = 0.6
P_REPEAT_DETAIL = 0.15  # one detail sentence said twice
P_RAMBLE = 0.12  # 5-10 detail sentences from 1-2 adjectives: long enough to run past a 96-token cap
P_TRAIL_OFF = 0.1  # the last full stop is dropped: pi0 learns that unfinished endings happen

_TOPIC_RE = re.compile(r"\b(" + "|".join(TOPICS) + r")\b", re.IGNORECASE)
_TONE_RE = re.compile(r"\b(" + "|".join(TONES) + r")\b", re.IGNORECASE)
# greetings match on their words, so "Dear sir." still counts as the formal greeting
_GREETING_RE = {t: re.compile(r"\b" + g.rstrip(",!").lower() + r"\b") for t, g in GREETINGS.items()}
_DETAIL_RE = re.compile(r"\bit is (\w+)\.", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")
# every sentence of the phrase book, exactly as the corpus writes it; a response is well formed when it is a run of
# them separated by white space
BOOK_SENTENCES = (*GREETINGS.values(), *(b.format(topic=t) for b in BODIES for t in TOPICS),
                  *(DETAIL.format(adj=a) for a in ADJECTIVES), *POLITE, *RUDE, CLOSING)
_BOOK_SENTENCE_RE = re.compile(r"(?<!\S)(" + "|".join(map(re.escape, BOOK_SENTENCES)) + r")(?!\S)")


def _check_str(name, value):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be str, got {type(value).__name__}")


@lru_cache(maxsize=4096)
def parse_prompt(prompt: str) -> tuple[str | None, str | None]:
    """(topic, tone) read from the prompt text; None where the text names none."""
    topics, tones = _TOPIC_RE.findall(prompt), _TONE_RE.findall(prompt)
    # the world's templates end with "about {topic}", so the last topic word is the one asked about
    return (topics[-1].lower() if topics else None), (tones[0].lower() if tones else None)


def reward_parts(prompt: str, response: str, finished: bool = True) -> dict[str, float]:
    """The named parts of r*(prompt, response); see the table in the module docstring. finished=False: the
    response was cut off by the token cap (it did not end with a stop token)."""
    _check_str("prompt", prompt)
    _check_str("response", response)
    topic, tone = parse_prompt(prompt)
    text = response.strip()
    low = text.lower()
    mentioned = {t.lower() for t in _TOPIC_RE.findall(text)}
    others = len(mentioned - {topic})
    # a note about nothing answers no request: it costs more than a wrong topic, so that dropping the sentence that
    # names one (at most 22 characters, concision 0.44) never pays (a prompt with no topic word asks for none)
    asked = 1.5 if topic in mentioned else (-1.0 if topic is not None and not mentioned else 0.0)
    parts = {"topic": asked - min(1.5, 0.5 * others)}
    tone_part = 0.0
    if tone is not None:  # a prompt with no tone word asks for no greeting in particular
        tone_part += 1.0 if _GREETING_RE[tone].search(low) else 0.0
        tone_part -= 0.5 if any(g.search(low) for t, g in _GREETING_RE.items() if t != tone) else 0.0
    parts["tone"] = tone_part
    parts["politeness"] = (1.0 if any(p.lower() in low for p in POLITE) else 0.0) - \
                          (1.0 if any(p.lower() in low for p in RUDE) else 0.0)
    details = {a.lower() for a in _DETAIL_RE.findall(text)} & set(ADJECTIVES)
    parts["detail"] = 0.4 * min(2, len(details))
    parts["concision"] = 0.0 - min(2.0, 0.02 * max(0, len(text) - MAX_CHARS))
    sentences = [" ".join(s.split()) for s in _SENTENCE_END_RE.split(low) if s.strip()]
    parts["repetition"] = 0.0 - min(2.0, 0.5 * (len(sentences) - len(set(sentences))))
    # a cut-off response often ends in "." at the cut: only a response that stopped can be finished
    parts["finished"] = 0.5 if finished and text.endswith((".", "!", "?")) else -1.0
    # without this part a garbled word or a sentence begun in its middle (" there! ...", which dodges a wrong
    # greeting) would cost nothing, and DPO, which pushes mass off rejected tokens, could move it there for free
    parts["grammar"] = 0.0 - min(1.5, 0.5 * len(fragments(text)))
    return {k: round(v, 6) for k, v in parts.items()}  # round away float dust (0.06000000000000001)


def reward(prompt: str, response: str, finished: bool = True) -> float:
    """r*(prompt, response) in [REWARD_MIN, REWARD_MAX]: the sum of reward_parts."""
    return round(sum(reward_parts(prompt, response, finished).values()), 6)


def fragments(text: str) -> list[str]:
    """The stretches of `text` that are no sentence of the phrase book, in order, stripped. A last stretch that
    begins a sentence ("It is wa") is a cut-off ending, priced by the finished part, and not counted here."""
    stretches, end = [], 0
    for match in _BOOK_SENTENCE_RE.finditer(text):
        stretches.append(text[end:match.start()].strip())
        end = match.end()
    tail = text[end:].strip()
    if not any(sentence.startswith(tail) for sentence in BOOK_SENTENCES):
        stretches.append(tail)
    return [s for s in stretches if s]


def malformed(response: str) -> bool:
    """True when the response holds a stretch that is no sentence of the phrase book (a misspelling, a
    fragment, a stray token)."""
    _check_str("response", response)
    return bool(fragments(response))


class World:
    """All 1440 prompts, a seeded train/eval split, and the SFT sampler."""

    def __init__(self, seed: int = 0, n_eval: int = 512):
        self.seed = seed
        self.prompts = [tpl.format(tone=tone, recipient=rec, topic=topic) for tpl in TEMPLATES
                        for tone in TONES for rec in RECIPIENTS for topic in TOPICS]
        self.fields = {p: parse_prompt(p) for p in self.prompts}  # prompt -> (topic, tone)
        if not 0 < n_eval < len(self.prompts):
            raise ValueError(f"n_eval must be in 1..{len(self.prompts) - 1}, got {n_eval}")
        order = np.random.default_rng(seed).permutation(len(self.prompts))
        # eval prompts are held out from every training use (SFT, reward model, DPO)
        self.eval_prompts = [self.prompts[i] for i in order[:n_eval]]
        self.train_prompts = [self.prompts[i] for i in order[n_eval:]]

    def sample_response(self, prompt: str, rng: np.random.Generator) -> str:
        """One SFT response: greeting, body, details, politeness, closing, each chosen independently."""
        topic, tone = parse_prompt(prompt)
        u = rng.random(10)  # one draw per response keeps 20000 samples well under a second
        other_tones = [t for t in TONES if t != tone]
        if u[0] < P_TONE_GREETING and tone is not None:
            words = [GREETINGS[tone]]
        elif u[0] < P_TONE_GREETING + P_OTHER_GREETING:
            words = [GREETINGS[other_tones[int(u[1] * len(other_tones))]]]
        else:
            words = []
        on_topic = u[2] < P_ON_TOPIC and topic is not None
        off_topics = [t for t in TOPICS if t != topic]
        body_topic = topic if on_topic else off_topics[int(u[8] * len(off_topics))]
        words.append(BODIES[int(u[3] * len(BODIES))].format(topic=body_topic))
        if u[4] < P_RAMBLE:
            adjs = rng.choice(ADJECTIVES, size=rng.integers(1, 3), replace=False)
            details = [DETAIL.format(adj=adjs[i % len(adjs)]) for i in range(rng.integers(5, 11))]
        else:
            details = [DETAIL.format(adj=a) for a in rng.choice(ADJECTIVES, size=rng.integers(0, 4), replace=False)]
            if details and u[4] < P_RAMBLE + P_REPEAT_DETAIL:
                details.append(details[-1])
        words += details
        if u[5] < P_POLITE:
            words.append(POLITE[int(u[6] * len(POLITE))])
        elif u[5] < P_POLITE + P_RUDE:
            words.append(RUDE[0])
        if u[7] < P_CLOSING:
            words.append(CLOSING)
        text = " ".join(words)
        return text[:-1] if u[9] < P_TRAIL_OFF and text.endswith(".") else text

    def sft_corpus(self, n: int, seed: int) -> list[tuple[str, str]]:
        """n (prompt, response) pairs on train prompts only, drawn with replacement."""
        rng = np.random.default_rng(seed)
        idx = rng.integers(0, len(self.train_prompts), size=n)
        return [(self.train_prompts[i], self.sample_response(self.train_prompts[i], rng)) for i in idx]

    def best_response(self, prompt: str) -> str:
        """The hand-built optimum: asked greeting, on topic, two details, polite, closed (<= 80 chars)."""
        topic, tone = parse_prompt(prompt)
        return " ".join([GREETINGS[tone or "formal"], BODIES[0].format(topic=topic or TOPICS[0]),
                         DETAIL.format(adj=ADJECTIVES[0]), DETAIL.format(adj=ADJECTIVES[1]), POLITE[0], CLOSING])


class Oracle:
    """Bradley-Terry preference oracle over r*; counts every label it gives in `queries`."""

    def __init__(self, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.queries = 0

    def reward(self, prompt: str, response: str, finished: bool = True) -> float:
        return reward(prompt, response, finished)

    def reward_parts(self, prompt: str, response: str, finished: bool = True) -> dict[str, float]:
        return reward_parts(prompt, response, finished)

    def prob(self, prompt: str, a: str, b: str, a_finished: bool = True, b_finished: bool = True) -> float:
        """P(a > b | prompt) = sigmoid((r*(a) - r*(b)) / temperature), eq. 1; each side cut off or not."""
        _check_str("prompt", prompt)
        _check_str("response a", a)
        _check_str("response b", b)
        d = (reward(prompt, a, a_finished) - reward(prompt, b, b_finished)) / self.temperature
        if d >= 0:  # the two branches keep exp from overflowing for any sign of d
            return 1.0 / (1.0 + math.exp(-d))
        e = math.exp(d)
        return e / (1.0 + e)

    def label(self, prompt: str, a: str, b: str, rng: np.random.Generator, a_finished: bool = True,
              b_finished: bool = True) -> bool:
        """One preference label y ~ Bernoulli(P(a > b)): True means a is preferred. Costs one query."""
        p = self.prob(prompt, a, b, a_finished, b_finished)
        self.queries += 1
        return bool(rng.random() < p)


def _mean_stderr(scores: list[float]) -> tuple[float, float]:
    x = np.asarray(scores, dtype=np.float64)
    return float(x.mean()), (float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan"))


def _check_lengths(prompts, responses_a, responses_b):
    if not len(prompts) == len(responses_a) == len(responses_b) or len(prompts) == 0:
        raise ValueError(f"need equal non-zero lengths, got {len(prompts)}, {len(responses_a)}, {len(responses_b)}")


def _flags(finished, prompts) -> list[bool]:
    if finished is None:
        return [True] * len(prompts)
    if len(finished) != len(prompts):
        raise ValueError(f"need one finished flag per prompt, got {len(finished)} for {len(prompts)}")
    return [bool(f) for f in finished]


# Win-rates are evaluation with the known truth: they read r* directly and do NOT count as label queries.
def soft_win_rate(oracle: Oracle, prompts, responses_a, responses_b, finished_a=None,
                  finished_b=None) -> tuple[float, float]:
    """Mean over prompts of P(a_i > b_i) (the Bradley-Terry win-rate) and its standard error. finished_a/_b: whether
    each response stopped (None: all did)."""
    _check_lengths(prompts, responses_a, responses_b)
    finished_a, finished_b = _flags(finished_a, prompts), _flags(finished_b, prompts)
    return _mean_stderr([oracle.prob(x, a, b, fa, fb) for x, a, b, fa, fb in
                         zip(prompts, responses_a, responses_b, finished_a, finished_b)])


def hard_win_rate(oracle: Oracle, prompts, responses_a, responses_b, finished_a=None,
                  finished_b=None) -> tuple[float, float]:
    """Mean over prompts of 1 if r*(a_i) > r*(b_i), 0.5 if equal, 0 if less; and its standard error."""
    _check_lengths(prompts, responses_a, responses_b)
    finished_a, finished_b = _flags(finished_a, prompts), _flags(finished_b, prompts)
    diffs = [oracle.reward(x, a, fa) - oracle.reward(x, b, fb) for x, a, b, fa, fb in
             zip(prompts, responses_a, responses_b, finished_a, finished_b)]
    return _mean_stderr([1.0 if d > 0 else 0.5 if d == 0 else 0.0 for d in diffs])


if __name__ == "__main__":
    world, oracle = World(seed=0), Oracle()
    rng = np.random.default_rng(0)
    for prompt in world.train_prompts[:4]:
        print(prompt)
        for response in [world.sample_response(prompt, rng) for _ in range(2)] + [world.best_response(prompt)]:
            print(f"  {oracle.reward(prompt, response):+.2f}  {response}")
            print(f"         {oracle.reward_parts(prompt, response)}")
    t0 = time.perf_counter()
    corpus = world.sft_corpus(20000, seed=0)
    seconds = time.perf_counter() - t0
    r = np.array([oracle.reward(x, a) for x, a in corpus])
    print(f"{len(world.prompts)} prompts ({len(world.train_prompts)} train, {len(world.eval_prompts)} eval); "
          f"corpus of {len(corpus)} in {seconds:.2f}s")
    print(f"r* mean {r.mean():.2f}, p10 {np.percentile(r, 10):.2f}, p90 {np.percentile(r, 90):.2f}, "
          f"max {REWARD_MAX} reached by {np.mean(r == REWARD_MAX):.2%}, "
          f"longer than 96 chars {np.mean([len(a) > 96 for _, a in corpus]):.2%}, "
          f"mean length {np.mean([len(a) for _, a in corpus]):.1f} chars")
