"""Varied English sentences, generated from templates with a seed: calibration and held-back texts for
int8 quantization benchmarks and tests (no downloads). Two seeds give disjoint-looking sets; the
templates cover statements, questions, instructions, lists, numbers and long compound sentences so that
lengths run from a few tokens to ~100."""
from __future__ import annotations

import random

SUBJECTS = [
    "the committee", "my neighbor", "a small startup", "the old lighthouse keeper", "our support team",
    "the city council", "a graduate student", "the orchestra", "this laptop", "the hospital", "a stray cat",
    "the weather service", "most customers", "the new manager", "a group of hikers", "the bakery on Main Street",
    "the research lab", "her grandmother", "the football club", "the airline",
]
VERBS = [
    "postponed", "announced", "repaired", "criticized", "celebrated", "investigated", "ignored", "approved",
    "redesigned", "translated", "photographed", "rescheduled", "donated", "measured", "recommended", "lost",
]
OBJECTS = [
    "the annual budget", "a broken water pipe", "the quarterly report", "a new recipe for sourdough bread",
    "the final exam", "an unexpected refund", "the software update", "a rare species of orchid",
    "the parking regulations", "a vintage bicycle", "the vaccination schedule", "the merger agreement",
    "a collection of letters from 1923", "the train timetable", "the security camera footage",
]
CLAUSES = [
    "after a long debate", "despite the heavy rain", "because nobody had checked the numbers",
    "while the manager was on vacation", "before the deadline on Friday", "without telling anyone",
    "to everyone's surprise", "for the third time this year", "as soon as the power came back",
    "even though the results were inconclusive",
]
QUESTIONS = [
    "How do I reset my password if I cannot access my email?", "What time does the museum open on Sundays?",
    "Is it safe to eat raw cookie dough?", "Why does my phone battery drain so quickly?",
    "Can I bring my dog on the train?", "Where is the nearest pharmacy that is open at night?",
    "How long should I boil an egg for a soft yolk?", "Which programming language should I learn first?",
    "What is the difference between weather and climate?", "Who wrote the novel that the film is based on?",
]
TOPICS = [
    "Photosynthesis converts light, water and carbon dioxide into sugar and oxygen.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Regular exercise lowers the risk of heart disease and improves sleep.",
    "The river flooded the lower part of the village for the first time in decades.",
    "Transformers process all the tokens of a sentence in parallel using attention.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Volcanic ash grounded hundreds of flights across northern Europe.",
    "The museum's new wing displays sculptures from the fifteenth century.",
]


def _statement(rng: random.Random) -> str:
    text = f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
    if rng.random() < 0.6:
        text += f" {rng.choice(CLAUSES)}"
    return text + "."


def _compound(rng: random.Random) -> str:
    parts = [_statement(rng).rstrip(".") for _ in range(rng.randint(2, 4))]
    joiners = [", and ", "; meanwhile, ", ", but ", ", so "]
    text = parts[0]
    for part in parts[1:]:
        text += rng.choice(joiners) + part[0].lower() + part[1:]
    return text + "."


def _numbers(rng: random.Random) -> str:
    return (f"Order #{rng.randint(1000, 99999)} of {rng.randint(1, 40)} items shipped on "
            f"{rng.randint(1, 28)}/{rng.randint(1, 12)}/20{rng.randint(10, 29)} for ${rng.randint(5, 900)}."
            f"{rng.randint(0, 99):02d}.")


def _short(rng: random.Random) -> str:
    return rng.choice(["Thanks!", "See you tomorrow.", "Not bad at all.", "Great service", "Totally agree.",
                       "Where?", "It works now.", "No idea, sorry."])


_KINDS = [(_statement, 4), (_compound, 3), (lambda rng: rng.choice(QUESTIONS), 2),
          (lambda rng: rng.choice(TOPICS), 2), (_numbers, 1), (_short, 1)]


def sentences(count: int, seed: int = 0) -> list[str]:
    """`count` sentences, deterministic for a seed."""
    rng = random.Random(seed)
    makers = [maker for maker, weight in _KINDS for _ in range(weight)]
    return [rng.choice(makers)(rng) for _ in range(count)]
