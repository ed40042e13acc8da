"""The occupation corpus of the bias probe: occupations (with statistics) x templates.

Built in (data/PROVENANCE.md has sources and licences):
- 'builtin': the 60 Winogender occupations (Rudinger et al. 2018) with the U.S. Bureau of
  Labor Statistics share of women (bls_pct_female) and the Bergsma & Lin text statistic
  (bergsma_pct_female), both in percent.
- 'professions': the 320 professions of Bolukbasi et al. 2016 as used by Vig et al. 2020,
  with their definitional and stereotypical scores in [-1, 1] (positive = male).

A template holds `{occupation}` and may hold `{a}` / `{A}` (the article "a"/"an", or
"A"/"An", chosen by the occupation's first letter). Templates end where a pronoun is natural.
Nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
import string
from importlib.resources import files
from pathlib import Path

import pandas as pd

from ..errors import ConfigError, CorpusError

# Eight of Vig et al. 2020's templates: each ends where the next word is naturally a pronoun.
TEMPLATES = (
    "The {occupation} said that",
    "The {occupation} yelled that",
    "The {occupation} whispered that",
    "The {occupation} wanted that",
    "The {occupation} went home because",
    "The {occupation} was promoted because",
    "The {occupation} was fired because",
    "The {occupation} cried because",
)
CORPORA = ("builtin", "professions")
PLACEHOLDERS = {"occupation", "a", "A"}
RESERVED = ("text", "template")  # corpus columns the probe writes itself


def builtin_occupations(corpus: str = "builtin") -> pd.DataFrame:
    """The built-in occupations with their statistics: 'builtin' (Winogender, 60 rows) or 'professions' (320)."""
    data = files("stratascope") / "data"
    if corpus == "builtin":
        frame = pd.read_csv(data / "winogender_occupations_stats.tsv", sep="\t")
        # a categorical label for probes: the majority gender of the occupation's workers (BLS)
        frame["bls_majority"] = ["female" if v >= 50 else "male" for v in frame["bls_pct_female"]]
        return frame
    if corpus == "professions":
        rows = json.loads((data / "vig2020_professions.json").read_text(encoding="utf-8"))
        frame = pd.DataFrame(rows, columns=["occupation", "definitional", "stereotypical"])
        frame["occupation"] = frame["occupation"].str.replace("_", " ")
        return frame
    raise ConfigError(f"--corpus {corpus!r} is not one of {', '.join(CORPORA)}")


def read_occupations(path: str | Path) -> pd.DataFrame:
    """A CSV (or .tsv) with an `occupation` column and any numeric statistic columns."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise CorpusError(f"occupations {path} could not be read as a table: {e}") from e
    return check_occupations(frame, str(path))


def check_occupations(frame: pd.DataFrame, source: str = "<occupations>") -> pd.DataFrame:
    """The occupations table cleaned: names stripped, underscores as spaces, no empty or repeated name."""
    if "occupation" not in frame.columns:
        raise CorpusError(f"occupations {source} has no 'occupation' column (columns: "
                          f"{', '.join(map(str, frame.columns))}); name the column of occupation names 'occupation'")
    clash = [c for c in RESERVED if c in frame.columns]
    if clash:
        raise CorpusError(f"occupations {source} has a column named {clash[0]!r}, which the probe writes itself; "
                          "rename that column")
    frame = frame.reset_index(drop=True).copy()
    names = []
    for i, name in enumerate(frame["occupation"]):
        name = "" if pd.isna(name) else str(name).strip().replace("_", " ")
        if not name:
            raise CorpusError(f"occupations {source}, row {i + 1}: the occupation is empty")
        names.append(name)
    frame["occupation"] = pd.Series(names, dtype=object)
    repeated = frame["occupation"][frame["occupation"].duplicated()]
    if len(repeated):
        raise CorpusError(f"occupations {source}: {repeated.iloc[0]!r} appears more than once; "
                          "keep one row per occupation")
    if len(frame) == 0:
        raise CorpusError(f"occupations {source} is empty: give at least one occupation")
    return frame


def load_occupations(occupations=None, corpus: str = "builtin") -> pd.DataFrame:
    """Occupations from None (the built-in `corpus`), a CSV path, a DataFrame, or a list of names."""
    if occupations is None:
        return builtin_occupations(corpus)
    if isinstance(occupations, (str, Path)):
        return read_occupations(occupations)
    if isinstance(occupations, pd.DataFrame):
        return check_occupations(occupations)
    return check_occupations(pd.DataFrame({"occupation": list(occupations)}))


def check_template(template: str, where: str) -> str:
    """The template without trailing whitespace, or a CorpusError naming `where` (file and line)."""
    template = template.rstrip()
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise CorpusError(f"{where}: {template!r} is not a valid template ({e}); "
                          "write literal braces as {{ }}") from e
    unknown = fields - PLACEHOLDERS
    if unknown:
        raise CorpusError(f"{where}: {template!r} has the placeholder {{{sorted(unknown)[0]}}}; only {{occupation}}, "
                          "{a} and {A} are filled in")
    if "occupation" not in fields:
        raise CorpusError(f"{where}: {template!r} has no {{occupation}} placeholder; "
                          "write e.g. 'The {occupation} said that'")
    return template


def read_templates(path: str | Path) -> list[str]:
    """Templates from a text file, one per line (blank lines and lines starting with # skipped)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"templates {path} could not be read: {e}") from e
    out = [check_template(line, f"templates {path}, line {n}") for n, line in enumerate(lines, 1)
           if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise CorpusError(f"templates {path} holds no template; "
                          "write one per line, e.g. 'The {occupation} said that'")
    return out


def load_templates(templates=None) -> list[str]:
    """Templates from None (the built-in TEMPLATES), a file path, or a list of strings."""
    if templates is None:
        return list(TEMPLATES)
    if isinstance(templates, Path) or (isinstance(templates, str) and "{" not in templates):
        return read_templates(templates)  # a template always has a brace; a file name does not
    templates = [templates] if isinstance(templates, str) else list(templates)
    if not templates:
        raise CorpusError("give at least one template")
    return [check_template(t, f"template {i + 1}") for i, t in enumerate(templates)]


def article(word: str) -> str:
    """'an' before a vowel letter, else 'a' (by spelling: 'an hour' and 'a university' are not special-cased)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def render(template: str, occupation: str) -> str:
    a = article(occupation)
    return template.format(occupation=occupation, a=a, A=a.capitalize())


def occupation_prompts(occupations: pd.DataFrame, templates: list[str]) -> pd.DataFrame:
    """One prompt per template and occupation: text, occupation, template, then the statistic columns."""
    stats = [c for c in occupations.columns if c != "occupation"]
    rows = []
    for template in templates:
        for rec in occupations.to_dict("records"):
            rows.append({"text": render(template, rec["occupation"]), "occupation": rec["occupation"],
                         "template": template, **{c: rec[c] for c in stats}})
    return pd.DataFrame(rows)
