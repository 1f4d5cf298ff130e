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


# "syllables" style: every name is built from these few syllables, so names share most of their
# letters and differ only in how the syllables combine; a model must read the whole name.
_SHARED_SYLLABLES = ("ka", "lo", "mi", "ra", "te", "nu")

# "numbers" style: answers of higher entropy than a city or a colour (7 to 13 bits each), a few
# digits that a model can only produce by having stored them.
NUMBER_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute(
        "birth_year",
        ("{entity} was born in the year", "The birth year of {entity} is", "The year {entity} was born is"),
        tuple(str(y) for y in range(1700, 2000)),
    ),
    Attribute(
        "room",
        ("{entity} lives in room", "The room number of {entity} is", "The room of {entity} has the number"),
        tuple(str(n) for n in range(100, 1000)),
    ),
    Attribute(
        "pin",
        ("The door code of {entity} is", "{entity} opens the door with the code", "To open the door, {entity} types"),
        tuple(f"{n:04d}" for n in range(10000)),
    ),
    Attribute(
        "street_number",
        ("{entity} lives at number", "The house number of {entity} is", "The street number of {entity} is"),
        tuple(str(n) for n in range(1, 200)),
    ),
    Attribute(
        "age",
        ("{entity} is this many years old:", "The age of {entity} is", "In years, the age of {entity} is"),
        tuple(str(n) for n in range(18, 100)),
    ),
)

STYLES = ("names", "syllables", "numbers")


def style_attributes(style: str) -> tuple[Attribute, ...]:
    """The attributes a fact style draws from (``names`` and ``syllables`` share theirs)."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    return NUMBER_ATTRIBUTES if style == "numbers" else ATTRIBUTES


def _name(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def _shared_syllable_name(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SHARED_SYLLABLES) for _ in range(syllables)).capitalize()


def entity_names(num_entities: int, seed: int, style: str = "names") -> list[str]:
    """Unique two-word invented names, deterministic in ``seed`` (and ``style``: ``syllables``
    builds them from six shared syllables, two to four per word)."""
    style_attributes(style)
    rng = random.Random(f"names-{seed}" if style != "syllables" else f"syllable-names-{seed}")
    names: dict[str, None] = {}
    while len(names) < num_entities:
        if style == "syllables":
            name = f"{_shared_syllable_name(rng, rng.randint(2, 4))} {_shared_syllable_name(rng, rng.randint(2, 4))}"
        else:
            name = f"{_name(rng, rng.choice((1, 2)))} {_name(rng, rng.choice((2, 3)))}"
        names[name] = None
    return list(names)


def generate_facts(
    num_entities: int, num_attributes: int = 5, seed: int = 0, template: int = 0, style: str = "names"
) -> list[Fact]:
    """``num_entities * num_attributes`` facts; ``template`` picks the sentence form (0: training).

    The same seed gives the same entities and values whatever template is asked for, so
    ``template=1`` paraphrases exactly the facts of ``template=0``. ``style`` (:data:`STYLES`):
    ``names`` (invented names, cities/colours/... as answers), ``syllables`` (the same answers,
    names from six shared syllables), ``numbers`` (invented names, numeric answers).
    """
    attributes = style_attributes(style)
    if not 1 <= num_attributes <= len(attributes):
        raise ValueError(f"num_attributes must be in [1, {len(attributes)}] for style {style}, got {num_attributes}")
    rng = random.Random(f"values-{seed}" if style == "names" else f"values-{style}-{seed}")
    facts = []
    for entity in entity_names(num_entities, seed, style):
        for attribute in attributes[:num_attributes]:
            value = rng.choice(attribute.values)
            form = attribute.templates[template % len(attribute.templates)]
            facts.append(Fact(form.format(entity=entity), value, {"entity": entity, "attribute": attribute.name}))
    return facts
