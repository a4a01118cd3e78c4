"""Canaries: how many, reproducible, unique, really in the records' text, and the CLI entry."""

import argparse
import math
import re

import pytest

from ksg_ray.client.canary import add_canary_args, inject_canaries, read_secrets, run_canary, write_secrets
from ksg_ray.common.records import Record, load_records, write_jsonl

RECORDS = [Record("sys", f"Question number {i}.", f"Answer {i}.", f"f:{i + 1}") for i in range(40)]


@pytest.mark.parametrize("fraction, count", [(0.0, 0), (0.1, 4), (0.26, 10), (1.0, 40)])
def test_count(fraction, count):
    out, secrets = inject_canaries(RECORDS, fraction, seed=0)
    assert len(out) == len(RECORDS) and len(secrets) == count
    assert sum(a != b for a, b in zip(out, RECORDS, strict=True)) == count


def test_deterministic_per_seed():
    assert inject_canaries(RECORDS, 0.25, seed=7) == inject_canaries(RECORDS, 0.25, seed=7)
    assert inject_canaries(RECORDS, 0.25, seed=7)[1] != inject_canaries(RECORDS, 0.25, seed=8)[1]


def test_secrets_are_in_the_modified_records_and_unique():
    out, secrets = inject_canaries(RECORDS, 1.0, seed=3)
    for s in secrets:
        record, original = out[s["record_index"]], RECORDS[s["record_index"]]
        assert s["prefix"] == original.input + " " and record.input.startswith(s["prefix"])
        canary = record.input[len(s["prefix"]):]
        assert s["name"] in canary and s["phone"] in canary and s["record_id"] in canary
        assert re.fullmatch(r"\(\d{3}\) 555-01\d\d", s["phone"])
        assert re.fullmatch(r"MRN-[A-Z0-9]{7}", s["record_id"])
        assert (record.instruction, record.output, record.source) == (original.instruction, original.output,
                                                                       original.source)
    for key in ("record_index", "name", "phone", "record_id"):
        assert len({s[key] for s in secrets}) == len(secrets)
    assert RECORDS[0].input == "Question number 0."  # the input list is not modified


def test_empty_input_gets_the_canary_alone():
    out, [secret] = inject_canaries([Record("", "", "a")], 1.0, seed=0)
    assert secret["prefix"] == "" and out[0].input.startswith(("My name", "For your", "You can"))


@pytest.mark.parametrize("fraction", [-0.1, 1.5, math.nan])
def test_fraction_validation(fraction):
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        inject_canaries(RECORDS, fraction, seed=0)


def test_secrets_round_trip(tmp_path):
    _, secrets = inject_canaries(RECORDS, 0.2, seed=1)
    write_secrets(secrets, tmp_path / "s.json")
    assert read_secrets(tmp_path / "s.json") == secrets


def test_cli_entry(tmp_path):
    write_jsonl(RECORDS, tmp_path / "in.jsonl")
    parser = argparse.ArgumentParser()
    add_canary_args(parser)
    args = parser.parse_args([str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), "--fraction", "0.05",
                              "--seed", "2", "--secrets", str(tmp_path / "secrets.json")])
    assert run_canary(args) == 0
    records, secrets = load_records(tmp_path / "out.jsonl"), read_secrets(tmp_path / "secrets.json")
    assert len(records) == 40 and len(secrets) == 2
    assert all(s["record_id"] in records[s["record_index"]].input for s in secrets)
    args.output = args.input
    with pytest.raises(ValueError, match="must differ from the input"):
        run_canary(args)
