"""Small texts with known answers for the curation tests and benchmarks: well-formed prose and the
kinds of text quality rules exist to drop, and near-duplicates with a known edit fraction."""

from __future__ import annotations

import random

_ADJ = (
    "old",
    "new",
    "small",
    "quiet",
    "busy",
    "local",
    "famous",
    "narrow",
    "modern",
    "empty",
    "crowded",
    "wooden",
    "bright",
    "cold",
    "large",
    "friendly",
    "strange",
    "careful",
    "young",
    "tired",
)
_NOUN = (
    "teacher",
    "library",
    "council",
    "bakery",
    "river",
    "station",
    "garden",
    "doctor",
    "museum",
    "farmer",
    "village",
    "bridge",
    "student",
    "market",
    "painter",
    "hospital",
    "engineer",
    "harbour",
    "neighbour",
    "school",
    "factory",
    "kitchen",
    "orchestra",
    "journalist",
)
_VERB = (
    "visited",
    "repaired",
    "described",
    "photographed",
    "admired",
    "ignored",
    "praised",
    "cleaned",
    "discovered",
    "supported",
    "painted",
    "watched",
    "opened",
    "closed",
    "measured",
    "explained",
)
_PREP = ("near", "behind", "beside", "across from", "far from", "next to", "inside", "around")
_WHEN = (
    "last spring",
    "every morning",
    "after the storm",
    "before the holidays",
    "on a rainy day",
    "during the festival",
    "late at night",
    "in the early evening",
    "for many years",
    "once again",
    "without any help",
    "with great care",
    "as usual",
    "for the first time",
)
_OPEN = (
    "",
    "",
    "",
    "Yesterday, ",
    "In the end, ",
    "As expected, ",
    "Surprisingly, ",
    "Meanwhile, ",
    "According to the report, ",
    "For a while, ",
)


def _sentence(rng: random.Random) -> str:
    c = rng.choice
    s = (
        f"{c(_OPEN)}the {c(_ADJ)} {c(_NOUN)} {c(_VERB)} the {c(_ADJ)} {c(_NOUN)} {c(_PREP)} "
        f"the {c(_NOUN)} {c(_WHEN)}"
    )
    if rng.random() < 0.4:
        s += f", and a {c(_ADJ)} {c(_NOUN)} {c(_VERB)} it too"
    s = s[0].upper() + s[1:]
    return s + rng.choice((".", ".", ".", "!", "?")) if not s.endswith("?") else s


def prose(seed: int, sentences: int = 9) -> str:
    """A paragraph or two of ordinary English prose (varied sentences, stop words, punctuation)."""
    rng = random.Random(seed)
    out = [_sentence(rng) for _ in range(sentences)]
    half = len(out) // 2
    return " ".join(out[:half]) + "\n\n" + " ".join(out[half:]) + "\n"


def boilerplate(seed: int) -> dict[str, str]:
    """One example of each kind of text the quality rules must drop."""
    rng = random.Random(seed)
    words = [
        rng.choice(("home", "about", "contact", "login", "menu", "search", "news", "shop"))
        for _ in range(80)
    ]
    nav = "\n".join(f"- {w.title()}" for w in words)
    lorem = (
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed "
        "do eiusmod tempor incididunt ut labore et dolore magna aliqua. "
    ) * 3 + prose(seed, 4)
    code = "\n".join(
        f"def f{i}(x):\n    return x * {i} + {rng.randint(0, 99)}  # {i}" for i in range(20)
    )
    soup = " ".join(
        "".join(rng.choice("#$%&*@!~^|<>{}[]=+") for _ in range(rng.randint(2, 6))) + str(i)
        for i in range(90)
    )
    repeated = "Click here to subscribe to our newsletter!\n" * 30
    listing = "\n".join(f"• Item {i}: {rng.randint(1, 999)} units …" for i in range(60))
    hashtags = " ".join(
        f"#{rng.choice(('love', 'sun', 'fun', 'beach', 'food'))}{i}" for i in range(70)
    )
    return {
        "navigation": nav,
        "lorem": lorem,
        "code": code,
        "symbols": soup,
        "repeated": repeated,
        "listing": listing,
        "hashtags": hashtags,
    }


def edited(text: str, fraction: float, seed: int) -> str:
    """`text` with about `fraction` of its words replaced or deleted (half each)."""
    rng = random.Random(seed)
    out = []
    for w in text.split():
        r = rng.random()
        if r < fraction / 2:
            out.append(f"w{rng.randrange(10**6)}")
        elif r < fraction:
            continue
        else:
            out.append(w)
    return " ".join(out)


def unrelated(seed: int, words: int = 150) -> str:
    """A document of random words from a large vocabulary (unrelated to every other seed's)."""
    rng = random.Random(seed)
    vocab = [
        f"{a}{b}"
        for a in ("ka", "lo", "mi", "ne", "po", "ru", "si", "ta", "ve", "zo")
        for b in ("ber", "din", "fal", "gor", "han", "jek", "lum", "mor", "nix", "pet")
    ]
    return " ".join(rng.choice(vocab) for _ in range(words))
