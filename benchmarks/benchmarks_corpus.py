"""A deterministic corpus of varied-length prompts shared by the benchmarks."""

import numpy as np

TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "grain, wool and salt. Over the centuries the town grew into a port, and its harbour became one of the "
        "busiest on the coast. ")


def corpus(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = TEXT.split()
    return [" ".join(words[: int(k)]) for k in rng.integers(8, len(words), size=n)]
