"""The bias probe, decomposed: which heads and MLP layers push the female word over the male one
after occupation prompts, and whether a component's push follows the occupation statistic.

For each occupation prompt, at its last prompt token, the dla job attributes the logit difference
logit(female) - logit(male) (= log p(female) - log p(male): the softmax normalizer cancels) to the
embedding, every attention layer, every head and every MLP layer (final-norm scale frozen at the
last depth; see dla.py). Contributions are averaged per occupation over templates, then each
component's mean is correlated across occupations with the statistic (Pearson r, Spearman rho,
scipy's two-sided p-values, n). Stored in analysis/bias_dla, keyed by the pair and statistic.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import xarray as xr

from .bias import occupation_rows, occupation_statistic, pair_ids, pair_label, parse_pairs
from .dla import dla
from .results import load_result, save_result

JOB = "bias_dla"
STATS = ("pearson_r", "pearson_p", "spearman_rho", "spearman_p")


def correlations(means: pd.DataFrame, stat: pd.Series) -> pd.DataFrame:
    """Per column of `means` (occupation x column): its correlation across occupations with `stat`.
    NaN where fewer than 3 occupations have both, or either side is constant."""
    from scipy import stats

    both = means.join(stat.rename("__stat__"), how="inner")
    both = both[both["__stat__"].notna()]
    y = both.pop("__stat__").to_numpy(np.float64)
    rows = []
    for col in means.columns:
        x = both[col].to_numpy(np.float64)
        row = dict.fromkeys(STATS, np.nan)
        if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
            pr, sr = stats.pearsonr(x, y), stats.spearmanr(x, y)
            row = {"pearson_r": float(pr.statistic), "pearson_p": float(pr.pvalue),
                   "spearman_rho": float(sr.statistic), "spearman_p": float(sr.pvalue)}
        rows.append({**row, "n": len(x)})
    return pd.DataFrame(rows, index=means.columns)


def bias_dla(run, pair=None, strict: bool = False, statistic: str | None = None, occupations=None,
             device: str = "cpu", progress: bool = True) -> BiasDLAResult:
    """Per head and MLP layer: the push towards the female word of `pair` (default ' she'/' he') per
    occupation, and its correlation with `statistic` (see the module docstring)."""
    run.require("z", "z")
    female, male = parse_pairs(pair)[0]
    pair_ids(run, [(female, male)], strict)  # the bias probe's checks and warnings for multi-token words
    occ = occupation_rows(run)
    name, stat = occupation_statistic(run, statistic, occupations)
    params = {"pair": pair_label((female, male)), "statistic": name,
              "statistic_sha256": hashlib.sha256(stat.to_json().encode()).hexdigest()}
    stored = load_result(run, JOB, params)
    if stored is None:
        res = dla(run, target=female, contrast=male, positions="last", device=device, progress=progress)
        stored = save_result(run, JOB, _dataset(res, occ, stat, name), params)
    return BiasDLAResult(run, stored)


def _dataset(res, occ: pd.DataFrame, stat: pd.Series, name: str) -> xr.Dataset:
    comp = res.by_component.droplevel("position")
    heads = res.by_head
    L, H = heads.sizes["layer"], heads.sizes["head"]
    flat = pd.DataFrame(heads.values.reshape(len(comp), L * H), index=comp.index,
                        columns=[f"{l}.{h}" for l in range(L) for h in range(H)])
    by_prompt = comp.join(flat).loc[occ["prompt"].to_numpy()]
    by_prompt.insert(0, "log_ratio", res.rows["total"].droplevel("position").loc[occ["prompt"].to_numpy()].to_numpy())
    by_prompt.index = pd.Index(occ["occupation"].to_numpy(), name="occupation")
    means = by_prompt.groupby(level="occupation", sort=False).mean()
    corr = correlations(means, stat)
    comps, head_cols = list(comp.columns), list(flat.columns)
    data = {"component_mean": (("occupation", "component"), means[comps].to_numpy(np.float32)),
            "head_mean": (("occupation", "layer", "head"), means[head_cols].to_numpy(np.float32).reshape(-1, L, H)),
            "log_ratio_mean": (("occupation",), means["log_ratio"].to_numpy(np.float32)),
            "statistic_value": (("occupation",), stat.reindex(means.index).to_numpy(np.float64))}
    for s in STATS + ("n",):
        data[f"component_{s}"] = (("component",), corr.loc[comps, s].to_numpy(np.float64))
        data[f"head_{s}"] = (("layer", "head"), corr.loc[head_cols, s].to_numpy(np.float64).reshape(L, H))
        data[f"log_ratio_{s}"] = ((), float(corr.loc["log_ratio", s]))
    ds = xr.Dataset(data, coords={"occupation": np.array([str(o) for o in means.index], dtype=object),
                                  "component": np.array(comps, dtype=object),
                                  "layer": np.arange(L, dtype=np.int32), "head": np.arange(H, dtype=np.int32)})
    ds.attrs.update({"statistic": name, "convention": res.ds.attrs["convention"],
                     "aggregation": "mean contribution per occupation over templates",
                     "p_values": "two-sided, scipy.stats.pearsonr / spearmanr"})
    return ds


class BiasDLAResult:
    """analysis/bias_dla: .components (component -> mean push, correlations), .heads ((layer, head) -> same)."""

    def __init__(self, run, ds: xr.Dataset):
        self.run, self.ds = run, ds

    def _table(self, prefix: str, index: pd.Index, mean: np.ndarray) -> pd.DataFrame:
        cols = {s: self.ds[f"{prefix}_{s}"].values.ravel() for s in STATS + ("n",)}
        return pd.DataFrame({"mean": mean, **cols}, index=index)

    @property
    def components(self) -> pd.DataFrame:
        """Per component (embed, attn.l, mlp.l, bias): mean push over occupations and its correlation."""
        return self._table("component", pd.Index([str(c) for c in self.ds["component"].values], name="component"),
                           self.ds["component_mean"].values.mean(0))

    @property
    def heads(self) -> pd.DataFrame:
        """Per (layer, head): mean push over occupations and its correlation with the statistic."""
        L, H = self.ds.sizes["layer"], self.ds.sizes["head"]
        index = pd.MultiIndex.from_product([range(L), range(H)], names=["layer", "head"])
        return self._table("head", index, self.ds["head_mean"].values.mean(0).ravel())

    def top(self, k: int = 5, what: str = "heads") -> pd.DataFrame:
        """The k heads (or components) whose push correlates most (|Spearman rho|) with the statistic."""
        table = self.heads if what == "heads" else self.components.drop(["embed", "bias"], errors="ignore")
        return table.reindex(table["spearman_rho"].abs().sort_values(ascending=False).index[:k])

    def summary(self, top: int = 5) -> list[str]:
        a, p = self.ds.attrs, self.ds.attrs["params"]
        fmt = lambda t: ", ".join(f"{n} (rho {r['spearman_rho']:+.2f}, p {r['spearman_p']:.2g}, mean {r['mean']:+.2f})"  # noqa: E731
                                  for n, r in t.iterrows())
        heads = self.top(top, "heads")
        heads.index = [f"{l}.{h}" for l, h in heads.index]
        return [f"bias dla: pair {p['pair']!r}, {self.ds.sizes['occupation']} occupations, statistic {a['statistic']}"
                f" (stored in {self.run.path}/analysis/bias_dla); {a['convention'].split(':')[0]}",
                f"log-ratio (sum of contributions) vs {a['statistic']}: "
                f"rho {float(self.ds['log_ratio_spearman_rho']):+.3f}"
                f" (p {float(self.ds['log_ratio_spearman_p']):.2g})",
                f"layers whose push follows {a['statistic']} most: {fmt(self.top(top, 'components'))}",
                f"heads whose push follows {a['statistic']} most: {fmt(heads)}"]
