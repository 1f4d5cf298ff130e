"""A synthetic knowledge base that needs no download: made-up people with attributes.

Every entity gets a unique invented name and one value per attribute, drawn at random, so a
fact can only be answered by having memorised it. Each attribute has several sentence
templates: the first is the training form, the others paraphrase it (for generalisation tests).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .facts import Fact

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
_CODAS = ["", "", "n", "r", "l", "s", "m", "th"]


@dataclass(frozen=True)
class Attribute:
    name: str
    templates: tuple[str, ...]  # "{entity}" is replaced by the entity's name
    values: tuple[str, ...]


ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "city",
        ("{entity} was born in", "The birthplace of {entity} is", "{entity} comes from the city of"),
        (
            "Paris",
            "Lima",
            "Oslo",
            "Cairo",
            "Delhi",
            "Quito",
            "Dakar",
            "Hanoi",
            "Minsk",
            "Perth",
            "Tunis",
            "Accra",
            "Sofia",
            "Seoul",
            "Rome",
            "Kyiv",
            "Bern",
            "Doha",
            "Riga",
            "Baku",
            "Lagos",
            "Porto",
            "Osaka",
            "Milan",
            "Turin",
            "Cork",
            "Graz",
            "Nice",
            "Lyon",
            "Pune",
        ),
    ),
    Attribute(
        "job",
        ("{entity} works as a", "The occupation of {entity} is", "By profession, {entity} is a"),
        (
            "baker",
            "pilot",
            "nurse",
            "judge",
            "tailor",
            "miner",
            "farmer",
            "lawyer",
            "singer",
            "dentist",
            "painter",
            "plumber",
            "chemist",
            "butcher",
            "sailor",
            "teacher",
            "drummer",
            "cashier",
            "welder",
            "jeweler",
            "surgeon",
            "poet",
            "clerk",
            "guide",
            "editor",
        ),
    ),
    Attribute(
        "color",
        ("The favorite color of {entity} is", "{entity} likes the color", "{entity} prefers the color"),
        (
            "red",
            "blue",
            "green",
            "amber",
            "violet",
            "teal",
            "ochre",
            "olive",
            "cyan",
            "coral",
            "ivory",
            "black",
            "white",
            "grey",
            "pink",
            "gold",
            "silver",
            "beige",
            "navy",
            "lime",
        ),
    ),
    Attribute(
        "pet",
        ("{entity} owns a pet", "The pet of {entity} is a", "At home, {entity} keeps a"),
        (
            "cat",
            "dog",
            "parrot",
            "rabbit",
            "hamster",
            "turtle",
            "lizard",
            "goat",
            "pony",
            "ferret",
            "snake",
            "canary",
            "frog",
            "mouse",
            "duck",
            "goose",
            "crab",
            "owl",
            "pig",
            "llama",
        ),
    ),
    Attribute(
        "instrument",
        ("{entity} plays the", "The instrument of {entity} is the", "In a band, {entity} plays the"),
        (
            "piano",
            "violin",
            "cello",
            "flute",
            "guitar",
            "drums",
            "harp",
            "oboe",
            "tuba",
            "banjo",
            "sitar",
            "lute",
            "organ",
            "bass",
            "trumpet",
            "clarinet",
            "viola",
            "horn",
        ),
    ),
    Attribute(
        "sport",
        ("{entity} practices", "The sport of {entity} is", "On weekends, {entity} plays"),
        (
            "tennis",
            "rugby",
            "golf",
            "chess",
            "judo",
            "karate",
            "hockey",
            "cricket",
            "soccer",
            "boxing",
            "fencing",
            "rowing",
            "skiing",
            "polo",
            "squash",
            "darts",
            "curling",
            "archery",
        ),
    ),
    Attribute(
        "food",
        ("{entity} likes to eat", "The favorite dish of {entity} is", "For dinner, {entity} often eats"),
        (
            "pasta",
            "sushi",
            "curry",
            "tacos",
            "ramen",
            "paella",
            "pizza",
            "falafel",
            "dumplings",
            "soup",
            "stew",
            "salad",
            "risotto",
            "kebab",
            "noodles",
            "pancakes",
            "waffles",
            "oysters",
        ),
    ),
    Attribute(
        "language",
        ("{entity} speaks", "The native language of {entity} is", "At home, {entity} speaks"),
        (
            "Basque",
            "Welsh",
            "Hindi",
            "Thai",
            "Greek",
            "Dutch",
            "Czech",
            "Malay",
            "Swahili",
            "Finnish",
            "Polish",
            "Korean",
            "Arabic",
            "Hebrew",
            "Tamil",
            "Zulu",
            "Latvian",
            "Maltese",
        ),
    ),
)


def _name(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def entity_names(num_entities: int, seed: int) -> list[str]:
    """Unique two-word invented names, deterministic in ``seed``."""
    rng = random.Random(f"names-{seed}")
    names: dict[str, None] = {}
    while len(names) < num_entities:
        names[f"{_name(rng, rng.choice((1, 2)))} {_name(rng, rng.choice((2, 3)))}"] = None
    return list(names)


def generate_facts(num_entities: int, num_attributes: int = 5, seed: int = 0, template: int = 0) -> list[Fact]:
    """``num_entities * num_attributes`` facts; ``template`` picks the sentence form (0: training).

    The same seed gives the same entities and values whatever template is asked for, so
    ``template=1`` paraphrases exactly the facts of ``template=0``.
    """
    if not 1 <= num_attributes <= len(ATTRIBUTES):
        raise ValueError(f"num_attributes must be in [1, {len(ATTRIBUTES)}], got {num_attributes}")
    rng = random.Random(f"values-{seed}")
    facts = []
    for entity in entity_names(num_entities, seed):
        for attribute in ATTRIBUTES[:num_attributes]:
            value = rng.choice(attribute.values)
            form = attribute.templates[template % len(attribute.templates)]
            facts.append(Fact(form.format(entity=entity), value, {"entity": entity, "attribute": attribute.name}))
    return facts
