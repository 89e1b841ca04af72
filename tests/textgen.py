"""English-looking text for test corpora (shared by the conftests)."""
from __future__ import annotations

import random

WORDS = ("the state of union nation people congress year war peace law trade whale ship sea captain "
         "king queen lord love night day house city river money work government freedom justice time "
         "good great new old first last long little own other right high small large next early young "
         "said made went came took found gave told asked called thought knew felt seemed became left").split()


def make_text(rng: random.Random, n_sentences: int) -> str:
    """English-looking paragraphs: capitalized sentences of common words, some punctuation."""
    paragraphs, sentences = [], []
    for i in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 16))]
        if rng.random() < 0.3:
            words[rng.randrange(1, len(words))] += ","
        sentences.append(" ".join(words).capitalize() + rng.choice(".....?!"))
        if rng.random() < 0.25 or i == n_sentences - 1:
            paragraphs.append(" ".join(sentences))
            sentences = []
    return "\n\n".join(paragraphs) + "\n"
