"""The procedural English captions the tiny fixtures' tokenizers are trained on
(tools/make_tiny_flux.py, tools/make_tiny_zimage.py): plain data, no heavy imports, so that
fixture scripts on different library versions share it."""

import random

SEED_CORPUS = 1234

# ----------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------

COLOURS = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "black", "white",
           "gray", "golden", "silver", "teal", "cyan", "magenta", "violet", "crimson", "navy", "beige"]
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "rectangle", "diamond", "heart", "cross",
          "ring", "oval", "spiral", "cube", "sphere", "cone", "pyramid", "moon", "arrow", "line", "dot"]
SIZES = ["small", "large", "tiny", "huge", "big", "little", "medium", "thin", "thick", "giant"]
TEXTURES = ["bright", "dark", "soft", "glowing", "striped", "dotted", "shiny", "matte", "faded", "smooth"]
PLACES = ["in the top left", "in the top right", "in the bottom left", "in the bottom right",
          "in the center", "in the middle", "near the left edge", "near the right edge",
          "at the top", "at the bottom", "in the corner", "above the horizon"]
BACKS = ["background", "backdrop", "canvas", "sky", "field", "wall", "floor", "sea", "paper", "board"]
SUBJECTS = ["a cat", "a dog", "an old man", "a young woman", "a child", "a horse", "a bird", "a fox",
            "a robot", "a car", "a boat", "a house", "a tree", "a flower", "a lamp", "a chair",
            "a castle", "a bridge", "a train", "a mountain"]
ACTIONS = ["sitting on", "standing near", "walking across", "flying over", "sleeping under",
           "looking at", "running through", "resting beside", "floating above", "hiding behind"]
SCENES = ["a quiet river", "a busy street", "a snowy forest", "a sandy beach", "a green hill",
          "an empty room", "a small village", "a wide desert", "a dark cave", "a tall tower",
          "a city at night", "a summer garden", "a foggy lake", "a stone wall", "a wooden table"]
STYLES = ["watercolor", "pencil sketch", "oil painting", "photo", "pixel art", "3d render",
          "ink drawing", "flat illustration", "digital art", "cartoon"]
LIGHT = ["at sunset", "at dawn", "in the rain", "under a full moon", "in soft light",
         "with long shadows", "on a cloudy day", "in winter", "in autumn", "in spring"]
NUMBERS = ["one", "two", "three", "four", "five", "2", "3", "4", "7", "10"]
OBJECTS = ["cup", "book", "apple", "bottle", "clock", "kite", "umbrella", "guitar", "balloon", "candle",
           "window", "door", "ladder", "bicycle", "teapot", "feather", "pencil", "mirror", "basket", "shell"]
MATERIALS = ["glass", "wooden", "metal", "paper", "stone", "plastic", "woolen", "ceramic", "golden", "marble"]
ADVERBS = ["slowly", "quietly", "gently", "happily", "proudly", "carefully", "suddenly", "lazily"]
MOODS = ["calm", "cheerful", "mysterious", "dreamy", "gloomy", "peaceful", "vivid", "minimal", "playful"]


def build_corpus() -> list[str]:
    """A few hundred procedurally generated English captions (deterministic).

    Mostly lower case like real prompts, plus capitalised sentences, a few
    ALL-CAPS words, digits and punctuation so that both tokenizers learn those
    characters (the T5 SentencePiece model is case sensitive).
    """
    rng = random.Random(SEED_CORPUS)
    c = lambda xs: rng.choice(xs)  # noqa: E731
    templates = [
        lambda: f"a {c(SIZES)} {c(COLOURS)} {c(SHAPES)} on a {c(COLOURS)} {c(BACKS)} {c(PLACES)}",
        lambda: f"{c(NUMBERS)} {c(COLOURS)} {c(SHAPES)}s {c(PLACES)} of a {c(TEXTURES)} {c(COLOURS)} {c(BACKS)}",
        lambda: f"{c(SUBJECTS)} {c(ACTIONS)} {c(SCENES)} {c(LIGHT)}, {c(STYLES)}",
        lambda: f"a {c(STYLES)} of {c(SUBJECTS)} {c(ACTIONS)} {c(SCENES)}",
        lambda: f"{c(TEXTURES)} {c(COLOURS)} and {c(COLOURS)} {c(SHAPES)}, {c(SIZES)} and {c(TEXTURES)}",
        lambda: f"{c(SUBJECTS)} next to a {c(COLOURS)} {c(SHAPES)} {c(PLACES)}",
        lambda: f"there is a {c(SIZES)} {c(SHAPES)} {c(PLACES)}; the {c(BACKS)} is {c(COLOURS)}.",
        lambda: f"{c(STYLES)}: {c(SUBJECTS)}, {c(SCENES)}, {c(LIGHT)}",
        lambda: f"a {c(COLOURS)}-{c(COLOURS)} {c(SHAPES)} with a {c(TEXTURES)} outline",
        lambda: f"the {c(SHAPES)} is {c(COLOURS)} and the {c(BACKS)} is {c(COLOURS)}",
        lambda: f"a {c(MATERIALS)} {c(OBJECTS)} on {c(SCENES)}, {c(MOODS)} mood, {c(STYLES)}",
        lambda: f"{c(SUBJECTS)} {c(ADVERBS)} holding a {c(COLOURS)} {c(OBJECTS)} {c(LIGHT)}",
        lambda: f"{c(NUMBERS)} {c(MATERIALS)} {c(OBJECTS)}s {c(PLACES)}, {c(MOODS)} and {c(MOODS)}",
    ]
    sentences = []
    for i in range(800):
        s = templates[i % len(templates)]()
        r = rng.random()
        if r < 0.25:  # Capitalised sentence with a full stop / exclamation mark
            s = s[0].upper() + s[1:]
            s = s.rstrip(".") + rng.choice([".", "!", "."])
        elif r < 0.35:  # one SHOUTED word
            words = s.split(" ")
            k = rng.randrange(len(words))
            words[k] = words[k].upper()
            s = " ".join(words)
        elif r < 0.45:  # Title Case
            s = " ".join(w[:1].upper() + w[1:] for w in s.split(" "))
        elif r < 0.5:
            s = f"\"{s}\" (it's {c(COLOURS)}, isn't it?)"
        sentences.append(s)
    return sentences
