"""Generation before the capture: extend each prompt by exactly N new tokens.

Exactly N tokens are generated per prompt, never fewer: generation does not stop at the
end-of-sequence token (an EOS is stored like any other token and the model continues after
it). So every sequence's length, and every array's size, is known before the first model
call. Greedy decoding equals `model.generate(..., do_sample=False, eos_token_id=None)` run
prompt by prompt.

Batches are left-padded with position ids taken from the attention mask, and decoded with
the model's key/value cache. Sampling draws each prompt's tokens from its own generator,
seeded from (seed, prompt index), so the sampled tokens do not depend on the batch size,
the batch order or which other prompts share a batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..errors import ConfigError, UnsupportedModelError


@dataclass(frozen=True)
class GenerationConfig:
    """How many tokens to generate per prompt and how to choose them."""

    n_new: int
    sample: bool = False
    seed: int = 0
    temperature: float = 1.0

    def __post_init__(self):
        if not isinstance(self.n_new, int) or isinstance(self.n_new, bool) or self.n_new < 0:
            raise ConfigError(f"--generate {self.n_new!r} must be a whole number of new tokens, 0 or more")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"--seed {self.seed!r} must be a whole number, 0 or more")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0 and np.isfinite(self.temperature)):
            raise ConfigError(f"--temperature {self.temperature!r} must be a positive number (1.0 samples "
                              "from the model's distribution; use greedy decoding, the default, for 0)")

    def to_attrs(self) -> dict:
        return {**asdict(self), "strategy": "sample" if self.sample else "greedy", "stop_at_eos": False,
                "padding": "left, position ids from the attention mask, key/value cache",
                "sampling_rng": "torch.Generator per prompt seeded with SeedSequence([seed, prompt_index])"
                if self.sample else None}


def require_lm(model: torch.nn.Module, causal: bool, what: str) -> None:
    """Generation and gradients need a causal LM with an output head; say so for encoders."""
    if not causal or model.get_output_embeddings() is None:
        raise UnsupportedModelError(
            f"{what} needs a causal language model with an LM head, but {type(model).__name__} is an encoder "
            "(or has no LM head); drop it, or use a causal model such as --model smollm2")


def _generators(prompts, seed: int) -> list[torch.Generator]:
    gens = []
    for p in prompts:
        state = np.random.SeedSequence([seed, int(p)]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


def _choose(logits: torch.Tensor, cfg: GenerationConfig, gens: list[torch.Generator] | None) -> torch.Tensor:
    if not cfg.sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1).cpu()  # sampled on the CPU: same on any device
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(gens)]).to(logits.device)


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, prompts: list[list[int]], cfg: GenerationConfig, device,
                   prompt_ids=None) -> list[list[int]]:
    """The cfg.n_new generated ids for each prompt of one batch (prompt_ids seed the sampler)."""
    B, width = len(prompts), max(len(s) for s in prompts)
    input_ids = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for b, seq in enumerate(prompts):  # left padding: every prompt's last token sits in the last column
        input_ids[b, width - len(seq):] = torch.tensor(seq)
        mask[b, width - len(seq):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    gens = _generators(prompt_ids if prompt_ids is not None else range(B), cfg.seed) if cfg.sample else None
    new, cache = [], None
    for _ in range(cfg.n_new):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        chosen = _choose(out.logits[:, -1], cfg, gens)
        new.append(chosen)
        input_ids = chosen[:, None]
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        positions = positions[:, -1:] + 1
    ids = torch.stack(new, dim=1).cpu().tolist()
    return [list(map(int, row)) for row in ids]


def generate_window(model: torch.nn.Module, ids: list[list[int]], lo: int, hi: int, cfg: GenerationConfig,
                    device, batch_size: int) -> None:
    """Append cfg.n_new generated ids to the prompts lo..hi-1 of `ids`, in place.

    Prompts are batched by length (longest first) so left padding stays small.
    """
    order = sorted(range(lo, hi), key=lambda p: -len(ids[p]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        generated = generate_batch(model, [ids[p] for p in batch], cfg, device, prompt_ids=batch)
        for p, new in zip(batch, generated):
            ids[p] = np.concatenate([np.asarray(ids[p], dtype=np.int32), np.asarray(new, dtype=np.int32)])



@torch.inference_mode()
def generate_seq2seq_batch(model: torch.nn.Module, sources: list[list[int]], start: int, cfg: GenerationConfig,
                           device, prompt_ids=None) -> list[list[int]]:
    """Encoder-decoder models: the cfg.n_new ids the decoder produces for each source of one batch,
    starting from the decoder start token; the encoder runs once (right padding, masked), the decoder
    with its key/value cache. Greedy is the argmax of the model's logits at every step (no forced
    BOS/EOS processors, no stop at EOS)."""
    B, width = len(sources), max(len(s) for s in sources)
    input_ids = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    for b, seq in enumerate(sources):
        input_ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    encoded = model.get_encoder()(input_ids=input_ids, attention_mask=mask)
    gens = _generators(prompt_ids if prompt_ids is not None else range(B), cfg.seed) if cfg.sample else None
    decoder_ids = torch.full((B, 1), int(start), dtype=torch.long, device=device)
    new, cache = [], None
    for _ in range(cfg.n_new):
        out = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=decoder_ids,
                    cache=cache, use_cache=True)
        cache = out.cache
        chosen = _choose(out.logits[:, -1], cfg, gens)
        new.append(chosen)
        decoder_ids = chosen[:, None]
    return [list(map(int, row)) for row in torch.stack(new, dim=1).cpu().tolist()]


def generate_seq2seq_window(model: torch.nn.Module, ids: list, n_source: np.ndarray, lo: int, hi: int, start: int,
                            cfg: GenerationConfig, device, batch_size: int) -> None:
    """Append cfg.n_new decoder ids to the prompts lo..hi-1 of `ids` (each its source, then the
    decoder start token), in place; batched by source length, longest first."""
    order = sorted(range(lo, hi), key=lambda p: -int(n_source[p]))
    for first in range(0, len(order), batch_size):
        batch = order[first:first + batch_size]
        sources = [list(ids[p][:int(n_source[p])]) for p in batch]
        for p, new in zip(batch, generate_seq2seq_batch(model, sources, start, cfg, device, prompt_ids=batch)):
            ids[p] = np.concatenate([np.asarray(ids[p], dtype=np.int32), np.asarray(new, dtype=np.int32)])
