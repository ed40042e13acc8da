"""Encoder-decoder models (T5, BART families): sequences, forwards and attributions of both stacks.

A prompt's rows in the token dimension are its source tokens (the encoder input, is_decoder
false) followed by its decoder tokens (is_decoder true): the decoder start token, then the target text
(teacher-forced, --target-column) or the generated tokens (--generate N). Positions count
within each stack's own sequence. Decoder row r predicts decoder token r+1, as in causal runs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError, CorpusError
from .gradients import DELTA, IG_METHODS, _pack, memory_budget

SUPPORTED = ("hidden", "attention", "mlp", "attribution")
# what the root attrs `gradients` add for these runs
GRADIENT_ATTRS = {"target_row": "decoder row r holds the attribution of the prediction made at decoder position r of "
                                "decoder token r+1: attribution_<method> over the decoder prefix 0..r, "
                                "attribution_<method>_source over the source positions",
                  "wrt": "the encoder's and the decoder's input token embeddings",
                  "ig_baseline": "zero embeddings for both stacks"}


def check_options(cfg, adapter) -> None:
    """What an encoder-decoder capture can take, checked before any model call."""
    other = [c for c in cfg.capture if c not in SUPPORTED]
    if other:
        raise ConfigError(f"--capture {other[0]} is not available for encoder-decoder models ({adapter.family}); "
                          f"choose from {', '.join(SUPPORTED)}")
    if bool(cfg.target_column) == bool(cfg.generate):
        raise ConfigError("an encoder-decoder model needs its decoder text from exactly one of --target-column "
                          "COLUMN (teacher-forced) or --generate N" if not cfg.target_column else
                          "--target-column and --generate both give the decoder text; drop one")
    if adapter.decoder_start_token_id is None:
        raise ConfigError(f"the model's config has no decoder_start_token_id; {adapter.family} decoders start from it")


def sequences(tokenizer, adapter, data, cfg, limit: int, tokenize) -> tuple[list[np.ndarray], np.ndarray, int]:
    """Each prompt's source ids, then the decoder start token and the target ids (with --target-column;
    the generated ids join later), each stack cut to `limit` tokens. Returns (ids, n_source per prompt,
    prompts cut)."""
    source, _ = tokenize(tokenizer, data.texts, np.iinfo(np.int32).max, cfg.special_tokens)
    start = np.array([adapter.decoder_start_token_id], dtype=np.int32)
    targets = [np.zeros(0, dtype=np.int32)] * len(source)
    if cfg.target_column:
        if cfg.target_column not in data.metadata.columns:
            raise CorpusError(f"--target-column {cfg.target_column}: the corpus {data.source} has no such column "
                              f"(columns: {', '.join(map(str, data.metadata.columns))}); name the column holding "
                              "the decoder text")
        texts = ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                 for v in data.metadata[cfg.target_column]]
        targets = [np.asarray(seq, dtype=np.int32) for first in range(0, len(texts), 1024)
                   for seq in tokenizer(text_target=texts[first:first + 1024], add_special_tokens=True)["input_ids"]]
    truncated = sum(len(s) > limit or len(t) > limit - 1 for s, t in zip(source, targets))
    ids = [np.concatenate([s[:limit], start, t[:limit - 1]]) for s, t in zip(source, targets)]
    return ids, np.array([min(len(s), limit) for s in source], dtype=np.int64), truncated


def _padded(seqs, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.as_tensor(np.asarray(s, dtype=np.int64))
        mask[b, :len(s)] = 1
    return ids.to(device), mask.to(device)


def split(ids, n_source, p) -> tuple[np.ndarray, np.ndarray]:
    s = int(n_source[p])
    return np.asarray(ids[p][:s]), np.asarray(ids[p][s:])


def forward(model, ids, n_source, batch, device) -> None:
    """One padded forward of both stacks (no LM head): the recorders' hooks take what they need."""
    src, smask = _padded([split(ids, n_source, p)[0] for p in batch], device)
    dec, dmask = _padded([split(ids, n_source, p)[1] for p in batch], device)
    encoded = model.get_encoder()(input_ids=src, attention_mask=smask).last_hidden_state
    model.get_decoder()(input_ids=dec, attention_mask=dmask, encoder_hidden_states=encoded,
                        encoder_attention_mask=smask, use_cache=False)


def stage_batch(stage: dict, tensors: dict, batch, plan, shard_start: int, stack: int) -> None:
    """Copy one stack's batch tensors (batch, seq, ...) into the shard's rows of that stack."""
    for b, p in enumerate(batch):
        s, n = int(plan.n_source[p]), int(plan.lengths[p])
        o = int(plan.offsets[p]) - shard_start + (0 if stack == 0 else s)
        count = s if stack == 0 else n - s
        for name, values in tensors.items():
            if name == "attention":
                stage[name][o:o + count, :, :, :count] = values[b, :count, :, :, :count]
            elif name == "cross_attention":
                stage[name][o:o + count, :, :, :s] = values[b, :count, :, :, :s]
            else:
                stage[name][o:o + count] = values[b, :count]


# ---------------------------------------------------------------- attributions


def _row_bytes(model, width: int, dec_width: int) -> int:
    c = model.config
    d, layers = c.hidden_size, 2 * c.num_hidden_layers
    d_mlp = getattr(c, "d_ff", None) or getattr(c, "decoder_ffn_dim", None) or 4 * d
    per_token = layers * (16 * d + 4 * d_mlp + 4 * c.num_attention_heads * width) * 4
    return width * per_token + 3 * dec_width * c.vocab_size * 4


def _scores(model, src_e, smask, dec_e, dmask, at, token) -> torch.Tensor:
    """log p(token | source, decoder prefix) at decoder position `at` of each row."""
    logits = model(inputs_embeds=src_e, attention_mask=smask, decoder_inputs_embeds=dec_e,
                   decoder_attention_mask=dmask, use_cache=False).logits
    rows = torch.arange(len(at), device=at.device)
    return torch.log_softmax(logits[rows, at].float(), dim=-1).gather(1, token[:, None])[:, 0]


def attribute(model, sources: list, decoders: list, targets: list, cfg, device) -> dict[str, list[np.ndarray]]:
    """Attributions of each decoder target r (the prediction of decoder token r+1) over the source
    tokens and the decoder prefix 0..r, w.r.t. both stacks' input embeddings (what the encoder and
    decoder embedding modules return, BART's scaling included), batched as the causal path
    (capture/gradients.py): each (target, path point) is a row; integrated gradients scales source
    and prefix together from the zero baseline. Returns name -> one array per prompt:
    attribution_<m> (n_dec, n_dec) over the prefix, attribution_<m>_source (n_dec, n_src), and the
    IG completeness gap (n_dec,)."""
    emb_s, emb_d = model.get_encoder().get_input_embeddings(), model.get_decoder().get_input_embeddings()
    with torch.no_grad():
        S = [emb_s(torch.as_tensor(np.asarray(s, dtype=np.int64), device=device)).detach() for s in sources]
        D = [emb_d(torch.as_tensor(np.asarray(d, dtype=np.int64), device=device)).detach() for d in decoders]
    dec_ids = [torch.as_tensor(np.asarray(d, dtype=np.int64), device=device) for d in decoders]
    plain = [m for m in cfg.methods if m != "integrated_gradients"]
    ig = "integrated_gradients" in cfg.methods
    alphas, weights = IG_METHODS[cfg.ig_method](cfg.ig_steps) if ig else (np.zeros(0), np.zeros(0))
    rows = [(i, int(r), 1.0, None) for i, rs in enumerate(targets) for r in rs] if plain else []
    rows += [(i, int(r), float(a), float(w))
             for i, rs in enumerate(targets) for r in rs for a, w in zip(alphas, weights)]
    rows.sort(key=lambda row: (len(sources[row[0]]) + row[1], row[0]))
    out = {}
    for m in cfg.methods:
        out[f"attribution_{m}"] = [np.full((len(d), len(d)), np.nan, dtype=np.float32) for d in decoders]
        out[f"attribution_{m}_source"] = [np.full((len(d), len(s)), np.nan, dtype=np.float32)
                                          for s, d in zip(sources, decoders)]
    ig_sum = {}
    groups = _pack(rows, lambda row: len(sources[row[0]]) + row[1] + 1,
                   lambda w: _row_bytes(model, w, w), memory_budget(device))
    for group in groups:
        ws, wd = max(len(sources[i]) for i, *_ in group), max(r for _, r, _, _ in group) + 1
        src_e = torch.zeros((len(group), ws, S[0].shape[-1]), dtype=S[0].dtype, device=device)
        dec_e = torch.zeros((len(group), wd, D[0].shape[-1]), dtype=D[0].dtype, device=device)
        smask = torch.zeros((len(group), ws), dtype=torch.long, device=device)
        dmask = torch.zeros((len(group), wd), dtype=torch.long, device=device)
        for j, (i, r, a, _) in enumerate(group):
            src_e[j, :len(S[i])], smask[j, :len(S[i])] = a * S[i], 1
            dec_e[j, :r + 1], dmask[j, :r + 1] = a * D[i][:r + 1], 1
        at = torch.tensor([r for _, r, _, _ in group], device=device)
        token = torch.stack([dec_ids[i][r + 1] for i, r, _, _ in group])
        src_e.requires_grad_(True)
        dec_e.requires_grad_(True)
        with torch.enable_grad():
            gs, gd = torch.autograd.grad(_scores(model, src_e, smask, dec_e, dmask, at, token).sum(), (src_e, dec_e))
        for j, (i, r, _, w) in enumerate(group):
            g_src, g_dec = gs[j, :len(S[i])], gd[j, :r + 1]
            if w is not None:
                acc = ig_sum.setdefault((i, r), [torch.zeros_like(g_src), torch.zeros_like(g_dec)])
                acc[0] += w * g_src
                acc[1] += w * g_dec
                continue
            for m in plain:
                a_src, a_dec = (g_src, g_dec) if m == "gradient_norm" else (g_src * S[i], g_dec * D[i][:r + 1])
                _put(out, m, i, r, a_src.norm(dim=-1), a_dec.norm(dim=-1))
    if ig:
        out[DELTA] = [np.full(len(d), np.nan, dtype=np.float32) for d in decoders]
        with torch.no_grad():
            for (i, r), (g_src, g_dec) in ig_sum.items():
                a_src, a_dec = g_src * S[i], g_dec * D[i][:r + 1]
                _put(out, "integrated_gradients", i, r, a_src.norm(dim=-1), a_dec.norm(dim=-1))
                ones = lambda n: torch.ones((2, n), dtype=torch.long, device=device)  # noqa: E731
                src2 = torch.stack([S[i], torch.zeros_like(S[i])])
                dec2 = torch.stack([D[i][:r + 1], torch.zeros_like(D[i][:r + 1])])
                logp = _scores(model, src2, ones(len(S[i])), dec2, ones(r + 1), torch.tensor([r, r], device=device),
                               dec_ids[i][r + 1].expand(2))
                out[DELTA][i][r] = float(a_src.sum() + a_dec.sum() - (logp[0] - logp[1]))
    return out


def _put(out, method, i, r, src_values, dec_values) -> None:
    out[f"attribution_{method}_source"][i][r, :] = src_values.cpu().numpy()
    row = out[f"attribution_{method}"][i][r]
    row[:] = 0
    row[:len(dec_values)] = dec_values.cpu().numpy()


def gradient_rows(model, ids, n_source, batch, n_new: int, cfg, device) -> dict[str, list[np.ndarray]]:
    """Every attribution array for the prompts of one batch: name -> one array per prompt, covering
    its decoder rows."""
    from .gradients import target_positions

    model.eval()
    pairs = [split(ids, n_source, p) for p in batch]
    targets = [target_positions(len(d), n_new, cfg.targets) for _, d in pairs]
    with torch.inference_mode(False):
        return attribute(model, [s for s, _ in pairs], [d for _, d in pairs], targets, cfg, device)
