"""The Gemma 2 data filters, each on/off in the recipe, each counting what it removed.

  pii             personal data anywhere in the row: e-mail addresses, phone numbers, card and social-security
                  numbers (regular expressions)
  unsafe          model turns that match the unsafe-content pattern list (`data/filters/unsafe_patterns.txt`,
                  replaceable); user turns are not checked, so refusals of unsafe requests stay
  identity        model turns that claim another assistant's name or maker ("I am ChatGPT", "made by OpenAI")
  contamination   rows whose prompt equals an evaluation prompt after normalisation, or shares a word
                  `ngram`-gram with one (the usual 13-gram rule, for prompts that long)
  duplicate       exact duplicates (same turns after whitespace normalisation); the first copy is kept
  near_duplicate  normalised text (case, punctuation, spacing removed) equal to a kept row's, or a Jaccard
                  similarity of character 4-grams ≥ `near_dup_threshold` (MinHash LSH, then checked exactly)

`apply_filters` runs them in that order and returns the kept rows and a report: rows in and out, and per
filter how many were removed with up to five example row ids.
"""

from __future__ import annotations

import re
from pathlib import Path

from datasketch import MinHash, MinHashLSH

from posttrain.chat import turn_text
from posttrain.config import FilterConfig
from posttrain.world import OTHER_ASSISTANTS, OTHER_MAKERS

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
_PHONE = re.compile(r"(\+\d{1,3}[\s.-]?)?(\(\d{2,4}\)[\s.-]?|\b\d{3}[\s.-])\d{3}[\s.-]\d{4}\b")
_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
_CARD = re.compile(r"\b(?:\d[ -]?){13,16}\b")
_SELF_CLAIM = re.compile(
    r"\b(?:I am|I'm|my name is|call me|I was (?:made|created|built|trained|developed) by|"
    r"(?:made|created|built|trained|developed) by)\s+(?:an? |the )?([\w-]+)",
    re.I,
)
_OTHER = {n.lower() for n in OTHER_ASSISTANTS + OTHER_MAKERS}


def model_text(row: dict) -> str:
    return "\n".join(turn_text(m) for m in row["messages"] if m["role"] in ("assistant", "model"))


def user_text(row: dict) -> str:
    return "\n".join(m["content"] for m in row["messages"] if m["role"] in ("user", "system"))


def normalize_text(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def has_pii(row: dict) -> bool:
    text = "\n".join(turn_text(m) for m in row["messages"])  # a model turn's attempt included
    return any(p.search(text) for p in (_EMAIL, _PHONE, _SSN, _CARD))


def load_patterns(path: str) -> list[re.Pattern]:
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                out.append(re.compile(line.strip(), re.I))
            except re.error as e:
                raise ValueError(f"{path}:{n}: not a valid regular expression ({e})") from None
    return out


def claims_other_identity(row: dict) -> bool:
    return any(m.group(1).lower() in _OTHER for m in _SELF_CLAIM.finditer(model_text(row)))


class Contamination:
    """Matches prompts against the evaluation prompts: equal after normalisation, or sharing an n-gram."""

    def __init__(self, eval_rows: list[dict], n: int):
        self.n = n
        self.exact = {normalize_text(user_text(r)) for r in eval_rows}
        self.grams = {g for r in eval_rows for g in self._grams(normalize_text(user_text(r)))}

    def _grams(self, text: str) -> set[tuple[str, ...]]:
        words = text.split()
        return {tuple(words[i : i + self.n]) for i in range(len(words) - self.n + 1)}

    def __call__(self, row: dict) -> bool:
        text = normalize_text(user_text(row))
        return text in self.exact or bool(self._grams(text) & self.grams)


class NearDuplicates:
    """Streaming near-duplicate detector: `seen(row)` is True when a kept row is near-identical."""

    def __init__(self, threshold: float, num_perm: int = 64):
        self.threshold, self.num_perm = threshold, num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.shingles: dict[str, set[str]] = {}
        self.exact: set[str] = set()

    def seen(self, row_id: str, row: dict) -> bool:
        text = normalize_text("\n".join(turn_text(m) for m in row["messages"]))
        if text in self.exact:
            return True
        sh = {text[i : i + 4] for i in range(max(len(text) - 3, 1))}
        mh = MinHash(num_perm=self.num_perm)
        mh.update_batch([s.encode() for s in sh])
        for other in self.lsh.query(mh):
            o = self.shingles[other]
            if len(sh & o) / len(sh | o) >= self.threshold:
                return True
        self.exact.add(text)
        self.lsh.insert(row_id, mh)
        self.shingles[row_id] = sh
        return False


def _exact_key(row: dict) -> str:
    return "\x1e".join(f"{m['role']}\x1f{' '.join(m['content'].split())}" for m in row["messages"])


def apply_filters(
    rows: list[dict], cfg: FilterConfig, eval_rows: list[dict] | None = None
) -> tuple[list, dict]:
    """Run the enabled filters in order. Returns (kept rows, report)."""
    removed: dict[str, list[str]] = {}
    checks = []
    if cfg.pii:
        checks.append(("pii", has_pii))
    if cfg.unsafe:
        patterns = load_patterns(cfg.unsafe_patterns)
        checks.append(("unsafe", lambda r: any(p.search(model_text(r)) for p in patterns)))
    if cfg.identity:
        checks.append(("identity", claims_other_identity))
    if cfg.contamination and eval_rows:
        checks.append(("contamination", Contamination(eval_rows, cfg.ngram)))
    kept = []
    for row in rows:
        reason = next((name for name, check in checks if check(row)), None)
        if reason:
            removed.setdefault(reason, []).append(row.get("id", "?"))
        else:
            kept.append(row)
    if cfg.duplicate or cfg.near_duplicate:
        exact, near, out = set(), NearDuplicates(cfg.near_dup_threshold), []
        for i, row in enumerate(kept):
            key = _exact_key(row)
            if cfg.duplicate and key in exact:
                removed.setdefault("duplicate", []).append(row.get("id", "?"))
                continue
            exact.add(key)
            if cfg.near_duplicate and near.seen(str(i), row):
                removed.setdefault("near_duplicate", []).append(row.get("id", "?"))
                continue
            out.append(row)
        kept = out
    report = {
        "rows_in": len(rows),
        "rows_out": len(kept),
        "removed": {k: {"count": len(v), "examples": v[:5]} for k, v in removed.items()},
    }
    return kept, report
