"""CLIENT SIDE — the privacy audit (client or its auditor): do planted secrets come back, are members told apart?

DP bounds what any attack can learn; these audits measure what two concrete attacks do learn, so a broken
pipeline (a non-DP path, an accounting bug, a synthetic dataset copying its prompts) shows up as numbers:

- **Canary reconstruction rate**: the share of planted secrets (`ksg canary`) found (a) anywhere in the
  synthetic dataset and (b) in the model's answers to targeted prompts, each built from the canary's own
  record cut just before the canary. A secret counts as found when its full name (with middle initial), its
  phone number (any common formatting) or its record id appears; each is unique to one canary.
- **Loss-based membership inference**: the attacker guesses "member" when the model gives a record's answer a
  high mean log-probability (optionally: a high gain over a reference model). The AUC of that guess over member
  vs non-member records is 0.5 for a model that learned nothing record-specific and approaches 1.0 for one that
  memorised its training records; its permutation p-value says how likely chance alone reaches it.

The audit needs the secrets file (the audit key) and member records: it runs where those may be read — with
the client or its auditor, never on the synthesis server. Models are reached through the engine contract
(`generate`, `score`), so the same audit runs on a local engine or batched on Ray Data
(`ksg_ray.engines.batch_inference.RayDataModel`).

Where the canary sits matters. `ksg canary` appends it to a record's `input`, and the project's fine-tuning
puts the loss on the answer only, so a model is never trained to *write* those tokens: its targeted
generations can only leak secrets that appeared in trained (answer) tokens. A canary found in the record's
`output` is prompted with the record's full question, one found in its `input` with the question up to the
canary (the secret's `prefix`).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ksg_ray.common.chat_format import build_messages
from ksg_ray.common.records import Record
from ksg_ray.engines import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["SECRET_FIELDS", "CanaryScan", "MembershipInference", "bundle_privacy_flags", "canary_rate_generations",
           "find_secrets", "membership_inference", "mia_auc", "mia_p_value", "read_dataset_rows", "read_dataset_texts",
           "scan_canaries",
           "targeted_prompts"]

SECRET_FIELDS = ("name", "phone", "record_id")


def _secret_patterns(secret: dict) -> dict[str, re.Pattern]:
    """Regexes of one secret's fields, tolerant to the formatting a model may change (case, spaces, the dot
    of the initial, phone separators) but not to other content."""
    missing = [k for k in SECRET_FIELDS if not isinstance(secret.get(k), str) or not secret[k].strip()]
    if missing:
        raise ValueError(f"secret {secret.get('record_index', '?')}: missing field(s) {missing} (a ksg canary "
                         "secrets file has name, phone, record_id and prefix for every canary)")
    name = r"\s+".join(re.escape(w.rstrip(".")) + (r"\.?" if w.endswith(".") else "")
                       for w in secret["name"].split())
    digits = re.sub(r"\D", "", secret["phone"])
    if len(digits) != 10:
        raise ValueError(f"secret {secret.get('record_index', '?')}: phone {secret['phone']!r} is not 10 digits")
    phone = rf"(?<!\d)\(?\s*{digits[:3]}\s*\)?[\s.\-]*{digits[3:6]}[\s.\-]*{digits[6:]}(?!\d)"
    rid = secret["record_id"]
    head, _, tail = rid.partition("-")
    record_id = (rf"\b{re.escape(head)}[\s\-]*{re.escape(tail)}\b" if tail else rf"\b{re.escape(rid)}\b")
    return {"name": re.compile(rf"\b{name}(?!\w)", re.IGNORECASE), "phone": re.compile(phone),
            "record_id": re.compile(record_id, re.IGNORECASE)}


def find_secrets(text: str, secret: dict) -> list[str]:
    """The fields of `secret` ("name", "phone", "record_id") that occur in `text`."""
    return [k for k, pattern in _secret_patterns(secret).items() if pattern.search(text)]


@dataclass
class CanaryScan:
    """Which planted secrets were found in a set of texts.

    Attributes:
        rate: share of secrets with at least one field found (0.0 with no secrets is reported as NaN).
        by_field: per field ("name", "phone", "record_id"), the share of secrets whose field was found.
        found: per secret (in secrets order), the fields found and the index of the first text holding one.
        num_secrets: how many secrets were looked for.
        num_texts: how many texts were searched.
    """

    rate: float
    by_field: dict[str, float]
    found: list[dict[str, Any]]
    num_secrets: int
    num_texts: int

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (without the per-secret list, which names the secrets)."""
        return {"rate": self.rate, "by_field": self.by_field, "found": sum(bool(f["fields"]) for f in self.found),
                "secrets": self.num_secrets, "texts": self.num_texts}


def scan_canaries(texts: Iterable[str | None], secrets: Sequence[dict]) -> CanaryScan:
    """Look for every secret in every text (None texts, failed rows, are skipped but counted as searched).

    Args:
        texts: the texts to search (synthetic records, model answers).
        secrets: the canary secrets (`ksg_ray.client.canary.read_secrets`).

    Returns:
        The scan; `rate` is the canary reconstruction rate.

    Raises:
        ValueError: a secret lacks name, phone or record_id.
    """
    patterns = [_secret_patterns(s) for s in secrets]  # validates every secret before any search
    texts = list(texts)
    found = []
    for pats in patterns:
        fields, first = [], None
        for i, text in enumerate(texts):
            if text is None:
                continue
            hit = [k for k, p in pats.items() if k not in fields and p.search(text)]
            if hit and first is None:
                first = i
            fields += hit
            if len(fields) == len(pats):
                break
        found.append({"fields": sorted(fields), "first_text": first})
    n = len(secrets)
    rate = sum(bool(f["fields"]) for f in found) / n if n else math.nan
    by_field = {k: (sum(k in f["fields"] for f in found) / n if n else math.nan) for k in SECRET_FIELDS}
    return CanaryScan(rate, by_field, found, n, len(texts))


def read_dataset_texts(path: str | Path) -> list[str]:
    """One text per row of a JSONL or Parquet dataset: every string value of the row, joined (instruction,
    input, output and the provenance columns alike: a secret anywhere in the published data counts).

    Raises:
        ValueError: unsupported format, or a JSONL line is not valid JSON (file and line named).
        FileNotFoundError: no such file.
    """
    return ["\n".join(_strings(row)) for row in read_dataset_rows(path)]


def read_dataset_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL or Parquet dataset (errors as `read_dataset_texts`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: synthetic dataset not found")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows: Iterable[Any] = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{lineno}: not valid JSON: {e}") from e
    else:
        raise ValueError(f"{path}: unsupported format for a synthetic dataset; use .jsonl or .parquet")
    return list(rows)


def _strings(x: Any) -> Iterable[str]:
    if isinstance(x, str):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _strings(v)
    elif isinstance(x, list | tuple):
        for v in x:
            yield from _strings(v)


def targeted_prompts(secrets: Sequence[dict], records: Sequence[Record] | None = None) -> list[list[dict]]:
    """One extraction prompt per secret: the canary's record as the model was trained on it, cut before the canary.

    With `records` (the canary-injected training records, indexed by each secret's `record_index`), the
    record's instruction is the system message; a canary in the record's `output` is prompted with the whole
    question (the answer that follows should hold it), a canary in its `input` with the question up to the
    canary. Without `records`, the prompt is the secret's `prefix` alone.

    Raises:
        ValueError: a secret's record index is out of range, or its canary is in neither input nor output.
    """
    prompts = []
    for s in secrets:
        prefix = str(s.get("prefix", "")).rstrip()
        if records is None:
            prompts.append([{"role": "user", "content": prefix}])
            continue
        i = s.get("record_index")
        if not isinstance(i, int) or not 0 <= i < len(records):
            raise ValueError(f"secret {s.get('name')!r}: record_index {i!r} is outside the {len(records)} "
                             "canary records (use the records file written together with this secrets file)")
        record = records[i]
        if find_secrets(record.output, s):
            question = record.input
        elif find_secrets(record.input, s):
            question = prefix
        else:
            raise ValueError(f"{record.source or f'record {i}'}: secret {s['name']!r} is in neither its input "
                             "nor its output: the records and the secrets file do not belong together")
        prompts.append(build_messages(Record(record.instruction, question, ""))[:-1])
    return prompts


def canary_rate_generations(model: Any, secrets: Sequence[dict], records: Sequence[Record] | None,
                            sampling: SamplingParams) -> tuple[CanaryScan, list[list[str] | None]]:
    """Prompt `model` with each canary's targeted prompt and look for that canary's secrets in its answers.

    Args:
        model: anything with the engine's `generate(prompts, params)` (a failed row may come back as None).
        secrets: the canary secrets.
        records: the canary-injected training records (see `targeted_prompts`), or None.
        sampling: `sampling.n` answers per prompt; a secret counts as found if any answer holds it.

    Returns:
        (the scan, where each secret is searched only in the answers to its own prompt; the answers).
    """
    if not secrets:
        return scan_canaries([], []), []
    generations = model.generate(targeted_prompts(secrets, records), sampling)
    answers = [None if g is None else [x.text for x in g] for g in generations]
    per_secret = [scan_canaries(["\n".join(a)] if a is not None else [None], [s]) for s, a in zip(secrets, answers,
                                                                                               strict=True)]
    found = [{"fields": p.found[0]["fields"], "first_text": i if p.found[0]["fields"] else None}
             for i, p in enumerate(per_secret)]
    n = len(secrets)
    by_field = {k: sum(k in f["fields"] for f in found) / n for k in SECRET_FIELDS}
    failed = sum(a is None for a in answers)
    if failed:
        logger.warning("canary audit: %d of %d targeted prompts failed to generate (counted as not found)", failed, n)
    return CanaryScan(sum(bool(f["fields"]) for f in found) / n, by_field, found, n, n), answers


def _midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)  # rank of the last member of each tie group
    return (upper - (counts - 1) / 2.0)[inverse]


def _check_scores(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    pos, neg = np.asarray(member_scores, dtype=float), np.asarray(nonmember_scores, dtype=float)
    if pos.size == 0 or neg.size == 0:
        raise ValueError(f"mia_auc needs members and non-members, got {pos.size} and {neg.size}")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("mia_auc: scores hold NaN; drop (and report) unscorable records first")
    return pos, neg


def mia_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of "higher score = member": P(member > non-member) + ½·P(tie), computed exactly.

    This is the Mann–Whitney U statistic over midranks, so tied scores count one half; it equals the area
    under the full ROC curve of the threshold attack.

    Raises:
        ValueError: either side is empty or holds NaN.
    """
    pos, neg = _check_scores(member_scores, nonmember_scores)
    ranks = _midranks(np.concatenate([pos, neg]))
    u = ranks[:pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def mia_p_value(member_scores: Sequence[float], nonmember_scores: Sequence[float], permutations: int = 10_000,
                seed: int = 0) -> float:
    """One-sided permutation p-value of the AUC: how often member/non-member labels drawn at random reach it.

    An audit on a few canaries is noisy (with 4 members and 12 non-members, AUC 0.73 happens by chance one
    time in ten), so an AUC is reported with the chance of seeing it from a model that learned nothing
    record-specific. Seeded, so the same scores give the same p.

    Raises:
        ValueError: either side is empty or holds NaN.
    """
    pos, neg = _check_scores(member_scores, nonmember_scores)
    ranks = _midranks(np.concatenate([pos, neg]))
    observed = ranks[:pos.size].sum()
    rng = np.random.default_rng(seed)
    keys = rng.random((permutations, ranks.size))
    members = np.argpartition(keys, pos.size - 1, axis=1)[:, :pos.size]  # a uniform random member set per row
    at_least = int((ranks[members].sum(axis=1) >= observed - 1e-9).sum())
    return (1 + at_least) / (1 + permutations)


@dataclass
class MembershipInference:
    """Result of the loss-based membership-inference attack.

    Attributes:
        auc: ROC AUC (None when one side had no scorable record).
        p_value: one-sided permutation p-value of the AUC (`mia_p_value`; None with the AUC).
        member_scores: mean answer log-prob of each scorable member record.
        nonmember_scores: the same for non-members.
        unscored: records that could not be scored (empty answer, failed row), by side.
        attack: "loss" (raw log-prob) or "reference" (log-prob gain over a reference model).
    """

    auc: float | None
    p_value: float | None
    member_scores: list[float]
    nonmember_scores: list[float]
    unscored: dict[str, int] = field(default_factory=dict)
    attack: str = "loss"

    def summary(self) -> dict[str, Any]:
        def mean(x: list[float]) -> float | None:
            return float(np.mean(x)) if x else None

        return {"attack": self.attack, "auc": self.auc, "p_value": self.p_value, "members": len(self.member_scores),
                "nonmembers": len(self.nonmember_scores),
                "unscored": self.unscored, "member_mean_logprob": mean(self.member_scores),
                "nonmember_mean_logprob": mean(self.nonmember_scores)}


def membership_inference(model: Any, members: Sequence[Record], nonmembers: Sequence[Record],
                         reference: Any | None = None) -> MembershipInference:
    """Score every record's answer under `model` and compute the attack's AUC and its p-value.

    Args:
        model: anything with the engine's `score(prompts, answers)` (mean answer-token log-prob; NaN = unscorable).
        members: records the model was trained on.
        nonmembers: records from the same distribution it never saw.
        reference: optional model that never saw either set (e.g. the public base). The attack statistic is
            then the *gain* in log-prob over the reference, which removes how easy each record is anyway
            (the reference-model attack); without it, the raw log-prob (the loss attack).

    Returns:
        The attack result; unscorable records are left out of the AUC and counted in `unscored`.
    """
    records = [*members, *nonmembers]  # one call per model: on Ray Data each call starts an actor pool
    prompts, answers = [build_messages(r)[:-1] for r in records], [r.output for r in records]
    raw = list(model.score(prompts, answers)) if records else []
    if reference is not None and records:
        raw = [a - b for a, b in zip(raw, reference.score(prompts, answers), strict=True)]

    def kept(xs: list[float]) -> list[float]:
        return [float(x) for x in xs if x is not None and not math.isnan(x)]

    m, nm = kept(raw[:len(members)]), kept(raw[len(members):])
    m_bad, nm_bad = len(members) - len(m), len(nonmembers) - len(nm)
    if m_bad or nm_bad:
        logger.warning("membership inference: %d member and %d non-member records could not be scored", m_bad, nm_bad)
    auc, p = (mia_auc(m, nm), mia_p_value(m, nm)) if m and nm else (None, None)
    return MembershipInference(auc, p, m, nm, {"members": m_bad, "nonmembers": nm_bad},
                               "reference" if reference is not None else "loss")


def bundle_privacy_flags(bundle_dir: str | Path) -> dict[str, Any]:
    """The bundle's privacy report (every key, ε as a float) plus `dp`: True only when ε is finite and nothing
    touched the private data outside DP (`not_dp` empty).

    Raises:
        FileNotFoundError: the bundle has no privacy.json.
    """
    from ksg_ray.bundle import read_privacy

    path = Path(bundle_dir) / "privacy.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bundle's privacy report is missing")
    report = read_privacy(bundle_dir)
    eps = report.get("epsilon")
    report["dp"] = isinstance(eps, int | float) and math.isfinite(eps) and not report.get("not_dp")
    return report
