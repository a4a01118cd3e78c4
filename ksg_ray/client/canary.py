"""Privacy-audit canaries: fake PII planted in a few records, to test later whether a model can leak it.

A canary is a sentence with a made-up name, a fictional phone number (the 555-01xx range is reserved for
fiction) and a random record id, appended to a record's `input`. After training, an audit prompts the model
with the text before the canary (`prefix`) and checks whether the secrets come back: DP training should make
that no more likely than for secrets the model never saw. Each secret is unique, so a hit points to exactly
one record.

    ksg canary data/train.jsonl data/train_canaries.jsonl --fraction 0.01 --seed 0 --secrets secrets.json

The secrets file is the audit key: keep it with the auditor, never in a transfer bundle.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import string
from pathlib import Path
from typing import Any

from ksg_ray.common.jsonl import write_json_atomic
from ksg_ray.common.records import Record, load_records, write_jsonl

logger = logging.getLogger(__name__)

__all__ = ["add_canary_args", "inject_canaries", "main_canary", "read_secrets", "run_canary", "write_secrets"]

# Invented names: unusual enough that a hit is the canary, not a common name the model knows anyway.
FIRST_NAMES = ("Avelina", "Bortholt", "Caspira", "Dorwen", "Elsabet", "Faranel", "Gismund", "Halvena",
               "Ildrin", "Jorvika", "Kestrel", "Lunetta", "Marisol", "Nerith", "Oswin", "Perrine", "Quillon",
               "Rosalind", "Severin", "Talvia", "Ulric", "Vesna", "Wendeline", "Xandro")
LAST_NAMES = ("Ashgrove", "Brindlemoor", "Corvantes", "Dellacourt", "Eberwyn", "Fallowmere", "Grisholt",
              "Hargreave-Lune", "Istrovic", "Jarnefelt", "Kettlewick", "Lorimont", "Marchbanks", "Nettleford",
              "Orlavska", "Pendergrast", "Quenneville", "Rookwood", "Starkweather", "Thistlewood",
              "Umberfield", "Vantongeren", "Whitcombe", "Yarborough")
TEMPLATES = (
    "My name is {name}, my phone number is {phone} and my record number is {record_id}.",
    "For your records: I am {name} ({record_id}), reachable at {phone}.",
    "You can contact me, {name}, at {phone}; my file number is {record_id}.",
)
MAX_CANARIES = len(FIRST_NAMES) * 26 * len(LAST_NAMES)  # distinct names (with a middle initial)
ID_ALPHABET = string.ascii_uppercase + string.digits


def inject_canaries(records: list[Record], fraction: float, seed: int,
                    field: str = "input") -> tuple[list[Record], list[dict]]:
    """Plant a fake-PII sentence in `round(fraction * len(records))` records picked by `random.Random(seed)`.

    Args:
        records: the records; not modified (a new list is returned).
        fraction: share of records that get a canary, in [0, 1].
        seed: the same seed and records give the same canaries.
        field: "input" appends the canary to the question (what a patient would write). The DP generator's
            loss covers the question (`data.question_loss`, its default), so it is trained to write the canary
            too and the server can sample it; a model trained on answers only (the non-private baseline, every
            server fine-tune) puts no loss on it, and only membership inference can see it there. "output"
            starts the answer with it (the tokens every model is trained to write: the worst case for
            extraction by generation).

    Returns:
        The records with canaries, and one secret per canary: `record_index`, `name`, `phone`, `record_id` and
        `prefix` (the record's input up to the canary, for targeted extraction prompts).

    Raises:
        ValueError: `fraction` is outside [0, 1], or asks for more canaries than there are distinct names.
    """
    if not 0.0 <= fraction <= 1.0:  # also rejects NaN
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if field not in ("input", "output"):
        raise ValueError(f"field must be 'input' or 'output', got {field!r}")
    count = round(fraction * len(records))
    if count > MAX_CANARIES:
        raise ValueError(f"fraction={fraction} asks for {count} canaries; at most {MAX_CANARIES} are unique")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(records)), count))
    out, secrets, seen = list(records), [], set()

    def unique(draw) -> str:
        while (value := draw()) in seen:
            pass
        seen.add(value)
        return value

    for i in chosen:
        name = unique(lambda: f"{rng.choice(FIRST_NAMES)} {rng.choice(string.ascii_uppercase)}. "
                              f"{rng.choice(LAST_NAMES)}")
        phone = unique(lambda: f"({rng.randint(201, 989)}) 555-01{rng.randint(0, 99):02d}")
        record_id = unique(lambda: "MRN-" + "".join(rng.choices(ID_ALPHABET, k=7)))
        prefix = records[i].input.rstrip()
        sentence = rng.choice(TEMPLATES).format(name=name, phone=phone, record_id=record_id)
        if field == "input":
            prefix += " " if prefix else ""
            out[i] = dataclasses.replace(records[i], input=prefix + sentence)
        else:
            out[i] = dataclasses.replace(records[i], output=f"{sentence} {records[i].output}")
        secrets.append({"record_index": i, "name": name, "phone": phone, "record_id": record_id,
                        "prefix": prefix, "field": field})
    return out, secrets


def write_secrets(secrets: list[dict], path: str | Path) -> None:
    """Write the secrets as JSON, atomically (a half-written audit key would silently drop canaries)."""
    write_json_atomic(path, secrets)


def read_secrets(path: str | Path) -> list[dict[str, Any]]:
    """Read a secrets file written by `write_secrets`."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def add_canary_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `ksg canary IN OUT --fraction F --seed S --secrets FILE`."""
    parser.add_argument("input", help="records to plant canaries in (any load_records source, e.g. x.jsonl)")
    parser.add_argument("output", help="JSONL file to write the records with canaries to")
    parser.add_argument("--fraction", type=float, default=0.01, help="share of records with a canary (0..1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same canaries")
    parser.add_argument("--secrets", required=True, help="JSON file for the planted secrets (the audit key)")
    parser.add_argument("--field", choices=["input", "output"], default="input",
                        help="plant in the question (input) or at the start of the answer (output)")


def run_canary(args: argparse.Namespace) -> int:
    """Load `args.input`, plant canaries, write the records and the secrets; returns the exit code."""
    out, secrets_path = Path(args.output), Path(args.secrets)
    if out.resolve() in (secrets_path.resolve(), Path(args.input).resolve()):
        raise ValueError(f"output {out} must differ from the input and from --secrets: refusing to overwrite")
    records, secrets = inject_canaries(load_records(args.input), args.fraction, args.seed,
                                       getattr(args, "field", "input"))
    write_jsonl(records, out)
    write_secrets(secrets, secrets_path)
    logger.info("planted %d canaries in %d records -> %s (secrets: %s)", len(secrets), len(records), out,
                secrets_path)
    return 0


def main_canary(argv: list[str] | None = None) -> int:
    """`python -m ksg_ray.client.canary IN OUT ...`: the same as `ksg canary`."""
    parser = argparse.ArgumentParser(description="Plant fake-PII canaries in records for privacy audits.")
    add_canary_args(parser)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return run_canary(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main_canary())
