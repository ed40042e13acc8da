"""The built-in occupation corpus: occupations x templates, with the Winogender statistics.

The statistics are Rudinger et al. 2018's data/occupations-stats.tsv (MIT; see data/PROVENANCE.md).
"""

from __future__ import annotations

from importlib.resources import files

import pandas as pd

# A handful of the templates of Vig et al. 2020.
TEMPLATES = ("The {} said that", "The {} yelled that", "The {} whispered that", "The {} wanted that",
             "The {} ate because", "The {} ran because")


def occupation_stats() -> pd.DataFrame:
    """occupation, bergsma_pct_female, bls_pct_female, bls_year (60 rows)."""
    return pd.read_csv(files("stratascope") / "data" / "winogender_occupations_stats.tsv", sep="\t")


def occupation_corpus(templates=TEMPLATES) -> pd.DataFrame:
    """One prompt per occupation and template: text, occupation, template, bls_pct_female, and
    gender = 'female' where the BLS share of women is at least 50%, else 'male'."""
    stats = occupation_stats()
    rows = [{"text": t.format(r.occupation), "occupation": r.occupation, "template": t,
             "bls_pct_female": float(r.bls_pct_female),
             "gender": "female" if r.bls_pct_female >= 50 else "male"}
            for t in templates for r in stats.itertuples()]
    return pd.DataFrame(rows)
