"""Tests for oracle.py: the reward parts by hand, the bounds, Bradley-Terry, labels, win-rates, the world.

Every test is seeded, so it passes or fails the same way on every run; the sampling tests say which property
they check and how wide their tolerance is.
"""
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import oracle  # noqa: E402
from oracle import REWARD_MAX, REWARD_MIN, Oracle, World, hard_win_rate, malformed, soft_win_rate  # noqa: E402

PROMPT = "Write a formal note to your boss about coffee."
BEST = "Dear sir, A note on coffee. It is lovely. It is useful. Thank you. Regards."


@pytest.fixture(scope="module")
def world():
    return World(seed=0)


@pytest.fixture(scope="module")
def corpus(world):
    return world.sft_corpus(20000, seed=0)


def garbage_strings(n, seed):
    """Random bytes as latin-1, random code points (surrogates included), and shuffled phrase-book words."""
    rng = random.Random(seed)
    words = " ".join([*oracle.GREETINGS.values(), *oracle.POLITE, *oracle.RUDE, *oracle.TOPICS, BEST * 3]).split()
    out = []
    for i in range(n):
        k = rng.randint(0, 400)
        if i % 3 == 0:
            out.append(bytes(rng.randrange(256) for _ in range(k)).decode("latin-1"))
        elif i % 3 == 1:
            out.append("".join(chr(rng.randrange(0x110000)) for _ in range(k)))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(k // 5)))
    return out


# ---- the reward parts, scored by hand ----

@pytest.mark.parametrize("response, expected", [
    # the optimum: every part at its maximum, 75 characters
    (BEST, dict(topic=1.5, tone=1.0, politeness=1.0, detail=0.8, concision=0.0, repetition=0.0, finished=0.5, grammar=0.0)),
    # off topic: pizza instead of coffee -> topic -0.5 (4.8 - 2.0 = 2.8)
    (BEST.replace("coffee", "pizza"),
     dict(topic=-0.5, tone=1.0, politeness=1.0, detail=0.8, concision=0.0, repetition=0.0, finished=0.5, grammar=0.0)),
    # the friendly greeting on a formal prompt -> tone -0.5
    ("Hi pal, A note on coffee. Thank you.",
     dict(topic=1.5, tone=-0.5, politeness=1.0, detail=0.0, concision=0.0, repetition=0.0, finished=0.5, grammar=0.0)),
    # rude
    ("Dear sir, A note on coffee. Go away.",
     dict(topic=1.5, tone=1.0, politeness=-1.0, detail=0.0, concision=0.0, repetition=0.0, finished=0.5, grammar=0.0)),
    # 27 + 10 * 12 = 147 chars: concision -0.02 * 67 = -1.34; 9 repeats * -0.5 = -4.5 -> floor -2.0
    ("Dear sir, A note on coffee." + " It is warm." * 10,
     dict(topic=1.5, tone=1.0, politeness=0.0, detail=0.4, concision=-1.34, repetition=-2.0, finished=0.5, grammar=0.0)),
    # 27 + 15 * 12 = 207 chars: concision -0.02 * 127 = -2.54 -> floor -2.0; repetition floor -2.0
    ("Dear sir, A note on coffee." + " It is warm." * 15,
     dict(topic=1.5, tone=1.0, politeness=0.0, detail=0.4, concision=-2.0, repetition=-2.0, finished=0.5, grammar=0.0)),
    # cut off: no terminal punctuation -> finished -1.0; "It is warm" without its full stop is no detail
    ("Dear sir, A note on coffee. It is warm",
     dict(topic=1.5, tone=1.0, politeness=0.0, detail=0.0, concision=0.0, repetition=0.0, finished=-1.0, grammar=0.0)),
    # four other topics: -0.5 * 4 = -2.0 -> floor -1.5
    # (no sentence of the phrase book: one fragment, grammar -0.5)
    ("Cats, dogs, birds and tennis.",
     dict(topic=-1.5, tone=0.0, politeness=0.0, detail=0.0, concision=0.0, repetition=0.0, finished=0.5, grammar=-0.5)),
    # a garbled topic word names no topic (-1.0) and makes its sentence a fragment (-0.5): worse than a wrong topic
    ("Dear sir, A note on cofee. Thank you.",
     dict(topic=-1.0, tone=1.0, politeness=1.0, detail=0.0, concision=0.0, repetition=0.0, finished=0.5, grammar=-0.5)),
    # one fragment however long: -0.5
    ("Dear sir, qq ww ee rr.",
     dict(topic=-1.0, tone=1.0, politeness=0.0, detail=0.0, concision=0.0, repetition=0.0, finished=0.5, grammar=-0.5)),
    # four fragments between book sentences (the last is no start of one): -2.0 -> floor -1.5
    ("Dear sir, qq. Thank you. ww. Regards. ee. It is warm. rr.",
     dict(topic=-1.0, tone=1.0, politeness=1.0, detail=0.4, concision=0.0, repetition=0.0, finished=0.5, grammar=-1.5)),
    # a greeting begun in its middle dodges a wrong greeting's -0.5, and is a fragment: -0.5
    (" there! A note on coffee. Thank you.",
     dict(topic=1.5, tone=0.0, politeness=1.0, detail=0.0, concision=0.0, repetition=0.0, finished=0.5, grammar=-0.5)),
    # a sentence run into the next ("It is warmThank you.") is one fragment, and its detail does not count
    ("Dear sir, A note on coffee. It is warmThank you.",
     dict(topic=1.5, tone=1.0, politeness=1.0, detail=0.0, concision=0.0, repetition=0.0, finished=0.5, grammar=-0.5)),
    # the empty response is unfinished and names no topic
    ("", dict(topic=-1.0, tone=0.0, politeness=0.0, detail=0.0, concision=0.0, repetition=0.0, finished=-1.0, grammar=0.0)),
])
def test_reward_parts_match_hand_computed(response, expected):
    parts = oracle.reward_parts(PROMPT, response)
    assert parts == pytest.approx(expected, abs=1e-9)
    assert oracle.reward(PROMPT, response) == pytest.approx(sum(expected.values()), abs=1e-9)


def test_skipping_the_sentence_that_names_a_wrong_topic_never_pays():
    # a run once learnt to drop its opening ("is warm. It is bright. ...") when a missing topic scored 0 against a
    # wrong one's -0.5; naming none now costs -1.0, more than the concision the longest topic sentence can save
    prompt = "Write a cheerful note to your boss about clocks."
    tail = " It is warm. It is bright. It is simple. Please reply. Regards."
    for body in oracle.BODIES:
        for topic in oracle.TOPICS:
            if topic == "clocks":
                continue
            padded = body.format(topic=topic) + tail + " It is calm." * 2  # past 80 characters either way
            assert oracle.reward(prompt, padded) > oracle.reward(prompt, padded.split(" ", len(body.split()))[-1])
    assert oracle.reward_parts(prompt, "is warm." + tail)["topic"] == -1.0


def test_best_response_reaches_documented_maximum(world):
    assert REWARD_MAX == 4.8 and REWARD_MIN == -9.5
    assert oracle.reward(PROMPT, BEST) == REWARD_MAX
    for prompt in world.prompts:
        best = world.best_response(prompt)
        assert len(best) <= oracle.MAX_CHARS and oracle.reward(prompt, best) == REWARD_MAX


def test_prompt_outside_the_world_is_parsed_from_its_text():
    # topic jazz found, no tone word: tone scores 0 whatever the greeting; "fun" is not in the phrase book
    assert oracle.reward("Tell me about jazz", "Hey there! Jazz is fun.") == pytest.approx(1.5 + 0.5 - 0.5)
    assert oracle.reward("", "") == -1.0


def test_each_world_prompt_names_exactly_one_topic_and_one_tone(world):
    # guards the word-boundary matching: no topic hides inside another word of the prompt ("tea" in "team")
    for prompt in world.prompts:
        assert len(oracle._TOPIC_RE.findall(prompt)) == 1 and len(oracle._TONE_RE.findall(prompt)) == 1
        assert world.fields[prompt] == oracle.parse_prompt(prompt)


# ---- bounds and input types ----

def test_bounds_hold_on_corpus_and_garbage(corpus):
    cases = list(corpus[:5000]) + [(PROMPT, g) for g in garbage_strings(900, seed=0)]
    cases += list(zip(garbage_strings(300, seed=1), garbage_strings(300, seed=2)))
    for prompt, response in cases:
        parts = oracle.reward_parts(prompt, response)
        for name, (lo, hi) in oracle.PART_BOUNDS.items():
            assert lo <= parts[name] <= hi, (name, parts[name], response)
        assert REWARD_MIN <= oracle.reward(prompt, response) <= REWARD_MAX
        malformed(response)  # any string is valid input


def test_non_str_raises_type_error_naming_the_argument():
    o = Oracle()
    with pytest.raises(TypeError, match="response must be str, got bytes"):
        o.reward(PROMPT, b"hi")
    with pytest.raises(TypeError, match="prompt must be str, got NoneType"):
        o.reward_parts(None, "hi")
    with pytest.raises(TypeError, match="response b must be str, got int"):
        o.prob(PROMPT, "a", 3)
    with pytest.raises(TypeError, match="response a must be str, got list"):
        o.label(PROMPT, ["a"], "b", np.random.default_rng(0))
    assert o.queries == 0  # a refused query is not counted
    for t in (0.0, -1.0):
        with pytest.raises(ValueError):
            Oracle(temperature=t)


# ---- Bradley-Terry probabilities and labels ----

def test_prob_is_symmetric_and_half_on_ties(corpus):
    o = Oracle()
    rng = np.random.default_rng(0)
    for i, j in rng.integers(0, len(corpus), size=(500, 2)):
        prompt, a, b = corpus[i][0], corpus[i][1], corpus[j][1]
        assert abs(o.prob(prompt, a, b) + o.prob(prompt, b, a) - 1.0) < 1e-12
    assert o.prob(PROMPT, BEST, BEST) == 0.5
    assert o.prob(PROMPT, "Dear sir.", "Hey there.") != 0.5  # right vs wrong greeting


def test_prob_is_sigmoid_of_reward_difference_over_temperature():
    # r*(BEST) = 4.8; the same without "It is useful." = 4.4: difference 0.4
    worse = BEST.replace(" It is useful.", "")
    assert oracle.reward(PROMPT, worse) == pytest.approx(4.4)
    # without the politeness sentence instead: 3.8, difference 1.0; temperature 2 -> sigmoid(0.5)
    worst = BEST.replace(" Thank you.", "")
    assert oracle.reward(PROMPT, worst) == pytest.approx(3.8)
    assert Oracle(temperature=2.0).prob(PROMPT, BEST, worst) == pytest.approx(1 / (1 + math.exp(-0.5)), abs=1e-12)
    # extreme differences neither overflow nor leave [0, 1]
    assert Oracle(temperature=1e-6).prob(PROMPT, BEST, worst) == 1.0
    assert Oracle(temperature=1e-6).prob(PROMPT, worst, BEST) == 0.0


def test_label_counts_queries_and_matches_prob():
    # 20000 Bernoulli draws; the empirical frequency lies within 4 standard errors of prob
    # (false failure chance ~6e-5 for a fresh seed; with this seed the outcome is fixed)
    o = Oracle()
    worse = BEST.replace(" It is useful.", "")
    p = o.prob(PROMPT, BEST, worse)  # sigmoid(0.4) ~ 0.599
    rng = np.random.default_rng(0)
    n = 20000
    wins = sum(o.label(PROMPT, BEST, worse, rng) for _ in range(n))
    assert o.queries == n
    assert abs(wins / n - p) < 4 * math.sqrt(p * (1 - p) / n)


# ---- win-rates ----

def test_win_rates_on_hand_made_lists():
    o = Oracle()
    rude = "Dear sir, A note on coffee. Go away."  # r* = 2.0
    prompts = [PROMPT] * 4
    assert soft_win_rate(o, prompts, [BEST, rude] * 2, [BEST, rude] * 2) == (0.5, 0.0)
    assert hard_win_rate(o, prompts, [BEST, rude] * 2, [BEST, rude] * 2) == (0.5, 0.0)
    # always beats by 4.8 - 2.0 = 2.8: soft = 1 / (1 + e^-2.8) = 0.9426758, hard = 1
    mean, stderr = soft_win_rate(o, prompts, [BEST] * 4, [rude] * 4)
    assert mean == pytest.approx(0.9426758, abs=1e-6) and stderr == pytest.approx(0.0, abs=1e-12)
    assert hard_win_rate(o, prompts, [BEST] * 4, [rude] * 4) == (1.0, 0.0)
    # one win, one loss: hard mean 0.5, std (ddof=1) sqrt(0.5), stderr sqrt(0.5)/sqrt(2) = 0.5
    assert hard_win_rate(o, prompts[:2], [BEST, rude], [rude, BEST]) == pytest.approx((0.5, 0.5))
    assert o.queries == 0  # evaluation with the known truth spends no labels
    with pytest.raises(ValueError):
        soft_win_rate(o, prompts, [BEST] * 3, [rude] * 4)
    with pytest.raises(ValueError):
        hard_win_rate(o, [], [], [])


# ---- the world ----

def test_world_is_deterministic_per_seed_and_split_is_disjoint():
    a, b, c = World(seed=0), World(seed=0), World(seed=1)
    assert a.prompts == b.prompts and a.eval_prompts == b.eval_prompts
    assert a.sft_corpus(200, seed=3) == b.sft_corpus(200, seed=3)
    assert a.eval_prompts != c.eval_prompts
    assert a.sft_corpus(200, seed=3) != a.sft_corpus(200, seed=4)
    assert len(set(a.prompts)) == len(a.prompts) == 1440
    assert len(a.eval_prompts) == 512 and not set(a.eval_prompts) & set(a.train_prompts)
    assert set(a.eval_prompts) | set(a.train_prompts) == set(a.prompts)


def test_corpus_is_fast_and_uses_train_prompts_only(world):
    start = time.perf_counter()
    corpus = world.sft_corpus(20000, seed=0)
    assert time.perf_counter() - start < 5.0  # about 0.5 s here; loose for slow machines
    assert not {x for x, _ in corpus} & set(world.eval_prompts)
    assert not any(malformed(a) for _, a in corpus)


def test_malformed_flags_stretches_outside_the_phrase_book(world):
    # a cut-off last sentence ("It is warm", "Regards") is the finished part's, not a fragment
    assert not malformed(BEST) and not malformed("") and not malformed("Hey there! It is warm")
    assert not malformed("Hi pal, I like cats. Regards")
    assert malformed("Dear sri, A note on coffee.")
    assert malformed("It is lovelyy.") and malformed("caf\u00e9")
    assert malformed("is warm. It is bright.") and malformed("Hi pal, us talk cats.")  # begun mid-sentence
    assert malformed("A note on team.")  # "tea" is a topic, "team" none
    assert malformed("Thank you you you you")  # no start of a book sentence
    # a stretch runs until a book sentence starts after white space: a stray token glues its neighbours into it
    assert oracle.fragments("Hi pal, us talk cats. Thank you. away. Regards.") == ["us talk cats.", "away."]
    assert oracle.fragments("Hi pal, I like books.<|begin_of_text|>Thank you. away. Regards.") == \
        ["I like books.<|begin_of_text|>Thank you. away."]


def test_corpus_statistics(corpus):
    # pi0's data: low mean, wide spread, the maximum rare but present, some responses long enough to be cut
    r = np.array([oracle.reward(x, a) for x, a in corpus])
    at_max = float(np.mean(r == REWARD_MAX))
    long = float(np.mean([len(a) > 96 for _, a in corpus]))
    p10, p90 = np.percentile(r, [10, 90])
    print(f"\nr* mean {r.mean():.2f} p10 {p10:.2f} p90 {p90:.2f} at max {at_max:.2%} over 96 chars {long:.2%}")
    assert r.mean() < REWARD_MAX - 3
    assert 0 < at_max < 0.05
    assert p90 - p10 > 3
    assert 0.01 < long < 0.2


def test_a_cut_off_response_is_unfinished_whatever_its_last_character():
    # the token cap can cut a response right after a full stop: only the flag tells it from one that stopped
    cut = "Dear sir, A note on coffee. It is lovely."
    assert oracle.reward_parts(PROMPT, cut)["finished"] == 0.5
    assert oracle.reward_parts(PROMPT, cut, finished=False)["finished"] == -1.0
    assert oracle.reward(PROMPT, cut) - oracle.reward(PROMPT, cut, finished=False) == pytest.approx(1.5)
    assert Oracle().reward(PROMPT, cut, False) == oracle.reward(PROMPT, cut, finished=False)
    # a text that does not end a sentence is unfinished either way
    assert oracle.reward(PROMPT, "Dear sir, A note on", finished=False) == oracle.reward(PROMPT, "Dear sir, A note on")


def test_prob_label_and_win_rates_take_each_sides_flag():
    o, cut = Oracle(), "Dear sir, A note on coffee. It is lovely."
    # the same text, stopped against cut off: r* differs by 1.5, so P = sigmoid(1.5)
    assert o.prob(PROMPT, cut, cut, True, False) == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert o.prob(PROMPT, cut, cut, False, True) == pytest.approx(1 / (1 + math.exp(1.5)))
    assert o.prob(PROMPT, cut, cut) == 0.5
    rng = np.random.default_rng(0)
    wins = np.mean([o.label(PROMPT, cut, cut, rng, True, False) for _ in range(4000)])
    assert abs(wins - 1 / (1 + math.exp(-1.5))) < 0.03  # 4000 draws: standard error 0.006, so 5 of them
    soft, _ = soft_win_rate(o, [PROMPT] * 2, [cut, cut], [cut, cut], [True, False], [False, False])
    assert soft == pytest.approx((1 / (1 + math.exp(-1.5)) + 0.5) / 2)
    hard, _ = hard_win_rate(o, [PROMPT] * 2, [cut, cut], [cut, cut], [True, False], [False, False])
    assert hard == pytest.approx(0.75)
    with pytest.raises(ValueError, match="one finished flag per prompt"):
        soft_win_rate(o, [PROMPT], [cut], [cut], [True, False])


def test_label_orientation_is_deterministic_at_near_zero_temperature():
    # with the temperature near 0, P(a > b) is 1 when r*(a) > r*(b): the label must say a, for any draw; swapped, b
    oracle, rng = Oracle(temperature=1e-6), np.random.default_rng(0)
    prompt, better, worse = PROMPT, BEST, "Cats, dogs, birds and tennis."
    assert oracle.reward(prompt, better) - oracle.reward(prompt, worse) > 5
    assert all(oracle.label(prompt, better, worse, rng) for _ in range(50))
    assert not any(oracle.label(prompt, worse, better, rng) for _ in range(50))
    # a cut-off copy of the better text loses to the finished one (finished part -1.0 against +0.5)
    assert all(oracle.label(prompt, better, better, rng, True, False) for _ in range(20))
