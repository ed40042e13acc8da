"""The bias probe: at every depth, how much more the lens reads out a female word than a male
one after occupation prompts, and how that follows a statistic such as the share of women.

For each prompt with an `occupation` (metadata column), at its last prompt position and at
every captured depth, for each word pair (female, male):

- log_ratio = log p(female) - log p(male) under the logit lens (final norm, unembedding),
  or with lens='tuned' / 'tuned:RUN' under the tuned lens (each depth's residual through its
  trained affine translator first, analyze/tuned_lens.py). It is the difference of the two
  logits read through the stored readout: the softmax normalizer cancels, so it is exact
  and finite even where both probabilities underflow.
- rank_female, rank_male: the words' 1-based ranks over the vocabulary (the lens' watch ranks).

The lens is part of the result's parameters (the logit lens adds none, so earlier results
still match): a logit and a tuned result of the same pairs are stored side by side.

The per-prompt table is stored in analysis/bias (dims prompt x depth x pair, reused for the
same pairs). Per occupation the log-ratios are averaged over templates, then correlated
across occupations with a statistic (Pearson r and Spearman rho, scipy p-values, n) at every
depth, for every pair; that is stored in analysis/bias_correlation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import xarray as xr

from ..errors import ConfigError, MissingMetadataError
from ..progress import tqdm
from ..schemas import BIAS, BIAS_CORRELATION
from .bias_corpus import load_occupations
from .lens import _translate, captured_depths, lens_tokens, lens_translator, readout_for, require_hidden
from .results import load_result, save_result
from .targets import first_token_ids, last_prompt_rows

JOB, CORRELATION_JOB = BIAS.job, BIAS_CORRELATION.job
DEFAULT_PAIRS = ((" she", " he"), (" her", " his"), (" her", " him"))
PREFERRED_STATISTICS = ("bls_pct_female", "stereotypical")
NOT_STATISTICS = ("text", "token_offset", "n_tokens", "occupation", "template")
ROW_DEPTHS_PER_STEP = 4096  # prompts x depths read and read out at once: bounded memory


# ---------------------------------------------------------------- inputs


def parse_pairs(pairs=None) -> list[tuple[str, str]]:
    """Word pairs (female, male) from None (the defaults), 'female/male' strings or 2-tuples."""
    if pairs is None or (not isinstance(pairs, str) and len(pairs) == 0):
        return [tuple(p) for p in DEFAULT_PAIRS]
    out = []
    for p in [pairs] if isinstance(pairs, str) else pairs:
        parts = p.split("/") if isinstance(p, str) else list(p)
        if len(parts) != 2 or not all(isinstance(w, str) and w for w in parts):
            raise ConfigError(f"--pairs {p!r} is not a female/male word pair; write it like ' she/ he' "
                              "(the leading space is part of the word)")
        out.append((parts[0], parts[1]))
    return out


def pair_label(pair: tuple[str, str]) -> str:
    return f"{pair[0]}/{pair[1]}"


def pair_ids(run, pairs: list[tuple[str, str]], strict: bool = False) -> list[tuple[int, int]]:
    """Vocabulary ids of each pair's words, tokenized with the run's stored tokenizer. A word that
    is several tokens is read out through its first token, with a warning; refused if `strict`
    (the mechanism every per-word score uses: analyze.targets.first_token_ids)."""
    out = []
    for pair in pairs:
        ids = [int(first_token_ids(run, [word], strict, "pair")[0]) for word in pair]
        if ids[0] == ids[1]:
            raise ConfigError(f"pair {pair_label(pair)!r}: both words read out as the same token (id {ids[0]}); "
                              "choose words whose first tokens differ")
        out.append((ids[0], ids[1]))
    return out


def occupation_rows(run) -> pd.DataFrame:
    """The prompts that carry an occupation: prompt index, occupation, template, metadata."""
    prompts = run.prompts
    if "occupation" not in prompts.columns:
        columns = [c for c in prompts.columns if c not in ("text", "token_offset", "n_tokens")]
        raise MissingMetadataError(
            f"{run.path} has no 'occupation' metadata (its prompt metadata: {', '.join(columns) or 'none'}); capture "
            "a corpus with an occupation column, or let `stratascope probe bias --model MODEL --out RUN` build one")
    occupation = prompts["occupation"].astype(object).map(lambda v: "" if pd.isna(v) else str(v).strip())
    rows = prompts[occupation != ""].copy()
    if rows.empty:
        raise MissingMetadataError(f"{run.path}: every prompt's occupation is empty; nothing to probe")
    rows["occupation"] = occupation[occupation != ""]
    if "template" not in rows.columns:  # a corpus without templates: the prompt with its occupation cut out
        rows["template"] = [t.replace(o, "{occupation}", 1) for t, o in zip(rows["text"], rows["occupation"])]
    rows.insert(0, "prompt", rows.index.to_numpy())
    return rows.reset_index(drop=True)


# ---------------------------------------------------------------- the probe


@torch.inference_mode()
def probe_rows(run, rows: np.ndarray, ids: list[tuple[int, int]], device: str = "cpu",
               progress: bool = True, lens="logit") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log_ratio, rank_female, rank_male), each (rows, depths, pairs), at every captured depth,
    read out through `lens` ('logit', 'tuned' or 'tuned:RUN')."""
    hidden = require_hidden(run)
    readout = readout_for(run, device)
    translator = lens_translator(run, lens, captured_depths(run), "final")
    watch = list(dict.fromkeys(i for pair in ids for i in pair))
    fcol = [watch.index(f) for f, _ in ids]
    mcol = [watch.index(m) for _, m in ids]
    watch_t = torch.tensor(watch, device=readout.device)
    n, D, P = len(rows), hidden.sizes["depth"], len(ids)
    log_ratio = np.empty((n, D, P), dtype=np.float32)
    rank_f = np.empty((n, D, P), dtype=np.int32)
    rank_m = np.empty((n, D, P), dtype=np.int32)
    step = max(1, ROW_DEPTHS_PER_STEP // D)
    with tqdm(total=n, unit="prompt", desc="bias probe", disable=not progress, mininterval=1.0) as bar:
        for s in range(0, n, step):
            part = rows[s:s + step]
            got = lens_tokens(run, part, None, watch=watch, topk=1, device=device, lens=lens)
            rank_f[s:s + len(part)] = got.watch_rank[:, :, fcol]
            rank_m[s:s + len(part)] = got.watch_rank[:, :, mcol]
            h = torch.from_numpy(np.asarray(hidden.isel(token=part).values, dtype=np.float32))
            h = _translate(h, translator).to(readout.device)
            z = readout.logits(readout.normalize(h).reshape(-1, h.shape[-1]), watch_t).reshape(len(part), D, -1)
            log_ratio[s:s + len(part)] = (z[..., fcol] - z[..., mcol]).cpu().numpy()
            bar.update(len(part))
    return log_ratio, rank_f, rank_m


def bias_params(run, pairs, strict: bool = False, lens="logit") -> dict:
    """What decides the probe; a tuned lens adds its translators' identity, as in lens_params."""
    from .tuned_lens import resolve_lens

    tuned = resolve_lens(run, lens)
    pairs = parse_pairs(pairs)
    ids = pair_ids(run, pairs, strict)
    params = {"pairs": [list(p) for p in pairs], "pair_ids": [list(i) for i in ids], "depths": captured_depths(run),
              "norm": "final", "precision": "float32", "position": "last prompt token"}
    if tuned is not None:
        params["lens"] = tuned.identity()
    return params


def bias_table(run, pairs=None, strict: bool = False, device: str = "cpu", progress: bool = True,
               lens="logit") -> xr.Dataset:
    """The per-prompt probe (prompt x depth x pair), stored in analysis/bias; reused for the same pairs and lens."""
    require_hidden(run)
    prompts = occupation_rows(run)
    params = bias_params(run, pairs, strict, lens)
    stored = load_result(run, JOB, params)
    if stored is not None:
        return stored
    rows = last_prompt_rows(run, prompts["prompt"].to_numpy())
    ids = [tuple(i) for i in params["pair_ids"]]
    log_ratio, rank_f, rank_m = probe_rows(run, rows, ids, device, progress, lens)
    dims = ("prompt", "depth", "pair")
    obj = lambda values: np.array([str(v) for v in values], dtype=object)  # noqa: E731
    ds = xr.Dataset(
        {"log_ratio": (dims, log_ratio), "rank_female": (dims, rank_f), "rank_male": (dims, rank_m),
         "occupation": (("prompt",), obj(prompts["occupation"])), "template": (("prompt",), obj(prompts["template"]))},
        coords={"prompt": prompts["prompt"].to_numpy(np.int64), "depth": np.array(params["depths"], dtype=np.int32),
                "pair": obj(pair_label(p) for p in params["pairs"]),
                "female": ("pair", obj(p[0] for p in params["pairs"])),
                "male": ("pair", obj(p[1] for p in params["pairs"])),
                "female_id": ("pair", np.array([i[0] for i in ids], dtype=np.int32)),
                "male_id": ("pair", np.array([i[1] for i in ids], dtype=np.int32))})
    ds.attrs.update({
        "log_ratio": "log p(female) - log p(male) under the logit lens (final norm, unembedding) at the prompt's "
                     "last token: the difference of the two logits, exact (the softmax normalizer cancels)",
        "rank": "1-based: 1 + number of vocabulary entries with a strictly larger logit",
        "token_row": "the prompt's last token that is not generated",
        "lens": (f"tuned: translators of {params['lens']['run']}/analysis/tuned_lens applied below the last depth"
                 if "lens" in params else "logit")})
    return save_result(run, JOB, ds, params)


def table_frame(ds: xr.Dataset) -> pd.DataFrame:
    """The stored probe as a long table: one row per prompt, depth and pair."""
    ds = ds.load()
    n, D, P = ds.sizes["prompt"], ds.sizes["depth"], ds.sizes["pair"]
    ip, idp, iq = (g.ravel() for g in np.meshgrid(np.arange(n), np.arange(D), np.arange(P), indexing="ij"))
    return pd.DataFrame({
        "occupation": ds["occupation"].values.astype(object)[ip], "template": ds["template"].values.astype(object)[ip],
        "depth": ds["depth"].values[idp], "pair": ds["pair"].values.astype(object)[iq],
        "log_ratio": ds["log_ratio"].values.ravel(), "rank_female": ds["rank_female"].values.ravel(),
        "rank_male": ds["rank_male"].values.ravel(), "prompt": ds["prompt"].values[ip]})


# ---------------------------------------------------------------- statistics and correlation


def occupation_statistic(run, statistic: str | None = None, occupations=None) -> tuple[str, pd.Series]:
    """(name, value per occupation) of the statistic to correlate with: a numeric column of the
    run's prompt metadata, or of `occupations` (a CSV path or DataFrame with an occupation column).
    None picks bls_pct_female, else stereotypical, else the first numeric column."""
    if occupations is not None:
        source, where = load_occupations(occupations), "the --occupations table"
    else:
        source, where = occupation_rows(run), f"{run.path}'s prompt metadata"
    numeric = [c for c in source.columns if c not in NOT_STATISTICS and c != "prompt"
               and pd.api.types.is_numeric_dtype(source[c]) and not pd.api.types.is_bool_dtype(source[c])]
    if statistic is None:
        statistic = next((c for c in PREFERRED_STATISTICS if c in numeric), numeric[0] if numeric else None)
        if statistic is None:
            raise MissingMetadataError(f"{where} has no numeric statistic column to correlate with; give "
                                       "--occupations a CSV with an occupation column and a numeric one")
    elif statistic not in numeric:
        raise ConfigError(f"--statistic {statistic!r} is not a numeric column of {where}; choose one of: "
                          f"{', '.join(numeric) or 'none (give --occupations a CSV with one)'}")
    values = source.groupby("occupation", sort=False)[statistic].mean()
    if occupations is not None and not set(values.index) & set(occupation_rows(run)["occupation"]):
        raise ConfigError(f"the --occupations table names none of the occupations in {run.path}; "
                          "its occupation column must use the same names as the run's prompts")
    return statistic, values.astype(np.float64)


def occupation_means(table: pd.DataFrame, pair: str) -> pd.DataFrame:
    """Occupation x depth: the mean log-ratio of `pair` over templates."""
    sub = table[table["pair"] == pair]
    if sub.empty:
        raise ConfigError(f"pair {pair!r} is not in this result (pairs: {', '.join(table['pair'].unique())})")
    means = sub.pivot_table(index="occupation", columns="depth", values="log_ratio", aggfunc="mean", sort=False)
    means.columns.name = "depth"
    return means


def correlate(table: pd.DataFrame, stat: pd.Series) -> pd.DataFrame:
    """Per pair and depth: Pearson and Spearman correlation across occupations between the mean
    log-ratio and the statistic, with scipy's two-sided p-values and n (occupations with both)."""
    from scipy import stats

    rows = []
    for pair in table["pair"].unique():
        means = occupation_means(table, pair)
        both = means.join(stat.rename("__stat__"), how="inner")
        both = both[both["__stat__"].notna()]
        y = both.pop("__stat__").to_numpy()
        for depth in means.columns:
            x = both[depth].to_numpy(np.float64)
            ok = np.isfinite(x)
            n = int(ok.sum())
            row = {"pair": pair, "depth": int(depth), "pearson_r": np.nan, "pearson_p": np.nan,
                   "spearman_rho": np.nan, "spearman_p": np.nan, "n": n}
            if n >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:  # undefined for constant input
                pr, sr = stats.pearsonr(x[ok], y[ok]), stats.spearmanr(x[ok], y[ok])
                row.update(pearson_r=float(pr.statistic), pearson_p=float(pr.pvalue),
                           spearman_rho=float(sr.statistic), spearman_p=float(sr.pvalue))
            rows.append(row)
    return pd.DataFrame(rows, columns=["pair", "depth", "pearson_r", "pearson_p", "spearman_rho", "spearman_p", "n"])


def _store_correlation(run, params: dict, corr: pd.DataFrame, statistic: str, stat: pd.Series) -> None:
    digest = hashlib.sha256(stat.to_json().encode()).hexdigest()
    params = {**params, "statistic": statistic, "statistic_sha256": digest}
    if load_result(run, CORRELATION_JOB, params) is not None:
        return
    pairs, depths = list(dict.fromkeys(corr["pair"])), sorted(corr["depth"].unique())
    grid = corr.set_index(["pair", "depth"]).reindex(pd.MultiIndex.from_product([pairs, depths]))
    shape = (len(pairs), len(depths))
    data = {c: (("pair", "depth"), grid[c].to_numpy().reshape(shape))
            for c in ("pearson_r", "pearson_p", "spearman_rho", "spearman_p", "n")}
    data["statistic_value"] = (("occupation",), stat.to_numpy(np.float64))  # the scatter's x in the viewer
    ds = xr.Dataset(data, coords={"pair": np.array(pairs, dtype=object), "depth": np.array(depths, dtype=np.int32),
                                  "occupation": np.array([str(o) for o in stat.index], dtype=object)})
    ds.attrs.update({"statistic": statistic, "aggregation": "mean log-ratio per occupation over templates",
                     "p_values": "two-sided, scipy.stats.pearsonr / spearmanr"})
    save_result(run, CORRELATION_JOB, ds, params)


# ---------------------------------------------------------------- the result


@dataclass
class BiasResult:
    """The bias probe of one run.

    table: one row per prompt, depth and pair (occupation, template, depth, pair, log_ratio,
    rank_female, rank_male, prompt). correlation: per pair and depth, against `statistic`.
    statistics: the statistic per occupation. by_occupation: occupation x depth mean log-ratio
    of the first pair (occupation_means(pair) for the others).
    """

    table: pd.DataFrame
    correlation: pd.DataFrame
    statistic: str
    statistics: pd.Series
    pairs: list[str]
    path: str = ""
    ds: xr.Dataset | None = field(default=None, repr=False)
    lens: str = "logit"

    @property
    def by_occupation(self) -> pd.DataFrame:
        return self.occupation_means(self.pairs[0])

    def occupation_means(self, pair: str | None = None) -> pd.DataFrame:
        return occupation_means(self.table, pair or self.pairs[0])

    def headline(self, pair: str | None = None) -> dict:
        """The correlation of `pair` (default: the first) at the last depth (the model's output)."""
        pair = pair or self.pairs[0]
        rows = self.correlation[self.correlation["pair"] == pair]
        row = rows.loc[rows["depth"].idxmax()]
        return {"pair": pair, "statistic": self.statistic, **{k: row[k] for k in rows.columns if k != "pair"}}

    def leaning(self, top: int = 5, pair: str | None = None) -> tuple[pd.Series, pd.Series]:
        """The most female-leaning and most male-leaning occupations at the last depth (mean log-ratio)."""
        last = self.occupation_means(pair).iloc[:, -1].sort_values()
        return last[::-1].head(top), last.head(top)

    def summary(self, top: int = 5) -> list[str]:
        """The headline lines `stratascope probe bias` prints."""
        h = self.headline()
        female, male = self.leaning(top)
        pair = self.pairs[0].split("/")
        n_templates = self.table["template"].nunique()
        fmt = lambda s: ", ".join(f"{o} ({v:+.2f})" for o, v in s.items())  # noqa: E731
        trace = self.correlation[self.correlation["pair"] == self.pairs[0]]
        every = max(1, len(trace) // 8)
        picks = pd.concat([trace.iloc[::every], trace.iloc[[-1]]]).drop_duplicates("depth")
        return [
            f"bias probe{' (tuned lens)' if self.lens == 'tuned' else ''}: "
            f"{self.table['occupation'].nunique()} occupations x {n_templates} templates, "
            f"pairs {', '.join(repr(p) for p in self.pairs)} (stored in {self.path}/analysis/bias)",
            f"at depth {int(h['depth'])}, mean log p({pair[0]!r}) - log p({pair[1]!r}) per occupation vs "
            f"{self.statistic}: Spearman rho = {h['spearman_rho']:+.3f} (p = {h['spearman_p']:.2g}), "
            f"Pearson r = {h['pearson_r']:+.3f} (p = {h['pearson_p']:.2g}), n = {int(h['n'])}",
            "Spearman rho by depth: " + "  ".join(f"{int(d)}:" + ("n/a" if np.isnan(r) else f"{r:+.2f}")
                                                 for d, r in zip(picks["depth"], picks["spearman_rho"])),
            f"most female-leaning: {fmt(female)}",
            f"most male-leaning:   {fmt(male)}",
        ]


def bias(run, pairs=None, strict: bool = False, statistic: str | None = None, occupations=None,
         device: str = "auto", progress: bool = True, lens: str = "logit") -> BiasResult:
    """The bias probe of a run whose prompts carry occupation metadata (see the module docstring).

    statistic: the numeric column to correlate with (None: bls_pct_female, else stereotypical,
    else the first numeric one). occupations: a CSV path or DataFrame (occupation + numeric
    columns) whose statistics are used instead of the run's metadata. lens: 'logit', 'tuned'
    (this run's analysis/tuned_lens) or 'tuned:RUN' (another run's, same model).
    """
    ds = bias_table(run, pairs, strict, device, progress, lens)
    table = table_frame(ds)
    name, stat = occupation_statistic(run, statistic, occupations)
    corr = correlate(table, stat)
    _store_correlation(run, ds.attrs["params"], corr, name, stat)
    kind = "tuned" if "lens" in ds.attrs["params"] else "logit"
    return BiasResult(table, corr, name, stat, [str(p) for p in ds["pair"].values], run.path, ds, kind)
