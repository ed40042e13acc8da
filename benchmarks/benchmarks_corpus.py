"""A deterministic corpus of varied-length prompts shared by the benchmarks."""

import numpy as np

TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "grain, wool and salt. Over the centuries the town grew into a port, and its harbour became one of the "
        "busiest on the coast. ")


def corpus(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = TEXT.split()
    return [" ".join(words[: int(k)]) for k in rng.integers(8, len(words), size=n)]


def demo_hidden_run(tokens: int, out):
    """SmolLM2 hidden states of the demo prompts, repeated to about `tokens` tokens, at out/run.zarr."""
    import json
    from pathlib import Path

    import stratascope as ss
    from stratascope.workflows.demo import demo_corpus

    Path(out).mkdir(parents=True, exist_ok=True)
    prompts = [json.loads(line)["text"] for line in open(demo_corpus())]
    return ss.capture(model="smollm2", prompts=prompts * max(1, tokens // 44), out=str(Path(out) / "run.zarr"),
                      capture=("hidden",), device="cpu", overwrite=True, progress=False)


def tiled_hidden_run(out, prompts: int, reps: int, dtype: str = "float32") -> tuple[str, str]:
    """SmolLM2 hidden states of corpus(prompts) at out/x1.zarr, and that store tiled `reps` times
    (stratascope.testing.tile_store: the same tokens repeated) at out/x<reps>.zarr; both paths."""
    from pathlib import Path

    import stratascope as ss
    from stratascope.testing import tile_store

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    small = ss.capture(model="smollm2", prompts=corpus(prompts), out=str(out / "x1.zarr"), capture=("hidden",),
                       dtype=dtype, device="cpu", overwrite=True, progress=False)
    big = str(out / f"x{reps}.zarr")
    tile_store(small.path, big, reps)
    return small.path, big


def padded_batch(ids, lengths, batch):
    """input_ids and attention_mask of `batch` (prompt indices), right-padded to its longest prompt."""
    import torch

    width = int(lengths[batch].max())
    input_ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for b, p in enumerate(batch):
        input_ids[b, : lengths[p]] = torch.tensor(ids[p])
        mask[b, : lengths[p]] = 1
    return input_ids, mask
