"""Privacy audit: exact MIA AUC, canary matching, targeted prompts, and — on a real SmolLM2 fine-tune — that the
canary rates and the MIA AUC separate a model built to leak from the same canaries never trained on."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import re

import pytest

from ksg_ray.audit.privacy_audit import (
    bundle_privacy_flags,
    canary_rate_generations,
    find_secrets,
    membership_inference,
    mia_auc,
    read_dataset_texts,
    scan_canaries,
    targeted_prompts,
)
from ksg_ray.client.canary import inject_canaries
from ksg_ray.common.records import Record, load_records

SECRET = {"record_index": 0, "name": "Elsabet Y. Dellacourt", "phone": "(834) 555-0132", "record_id": "MRN-9TZVFDC",
          "prefix": "I have a cough. "}


def brute_force_auc(pos, neg):
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_mia_auc_is_exact_with_ties(seed):
    rng = random.Random(seed)
    pos = [rng.choice([-2.0, -1.5, -1.0, -0.5]) for _ in range(rng.randint(1, 12))]  # many ties on purpose
    neg = [rng.choice([-2.5, -2.0, -1.5, -1.0]) for _ in range(rng.randint(1, 12))]
    assert mia_auc(pos, neg) == pytest.approx(brute_force_auc(pos, neg), abs=1e-12)


def test_mia_auc_extremes_and_bad_input():
    assert mia_auc([0.0, 1.0], [-3.0, -2.0]) == 1.0
    assert mia_auc([-3.0, -2.0], [0.0, 1.0]) == 0.0
    assert mia_auc([1.0, 1.0], [1.0]) == 0.5
    with pytest.raises(ValueError, match="members and non-members"):
        mia_auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        mia_auc([math.nan], [1.0])


@pytest.mark.parametrize("text,fields", [
    ("Patient Elsabet Y. Dellacourt, tel (834) 555-0132, file MRN-9TZVFDC.", ["name", "phone", "record_id"]),
    ("elsabet y dellacourt called from 834-555-0132", ["name", "phone"]),
    ("Reach her at 834.555.0132 or 834 555 0132; id mrn 9tzvfdc", ["phone", "record_id"]),
    ("Mrs Dellacourt (Elsabet) phoned.", []),                            # surname alone is shared by canaries
    ("Account 18345550132 and MRN-9TZVFDCX", []),                        # digits/ids inside longer tokens
    ("Elsabet Q. Dellacourt at (834) 555-0133", []),                     # another canary's name and phone
])
def test_secret_matching_tolerates_formatting_but_not_other_content(text, fields):
    assert sorted(find_secrets(text, SECRET)) == fields


def test_scan_counts_each_secret_once_and_by_field():
    other = {**SECRET, "name": "Oswin V. Fallowmere", "phone": "(214) 555-0160", "record_id": "MRN-Y657XNX"}
    scan = scan_canaries(["nothing", None, "call (834) 555-0132", "MRN-9TZVFDC again (834) 555-0132"], [SECRET, other])
    assert scan.rate == 0.5 and scan.by_field == {"name": 0.0, "phone": 0.5, "record_id": 0.5}
    assert scan.found[0] == {"fields": ["phone", "record_id"], "first_text": 2} and scan.found[1]["fields"] == []
    assert scan.summary()["found"] == 1 and "Elsabet" not in json.dumps(scan.summary())  # no secret in the summary
    with pytest.raises(ValueError, match="missing field"):
        scan_canaries(["x"], [{"name": "A B"}])


def test_dataset_texts_include_every_string_column(tmp_path):
    rows = [{"instruction": "", "input": "q", "output": "a", "provenance": {"seed_prompt": "call (834) 555-0132"}},
            {"instruction": "", "input": "q2", "output": "Elsabet Y. Dellacourt", "round": 1}]
    path = tmp_path / "synthetic.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert scan_canaries(read_dataset_texts(path), [SECRET]).found[0] == {"fields": ["name", "phone"],
                                                                          "first_text": 0}
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "synthetic.parquet")
    assert read_dataset_texts(tmp_path / "synthetic.parquet") == read_dataset_texts(path)
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        read_dataset_texts(tmp_path / "bad.jsonl")


def test_targeted_prompts_cut_the_record_before_its_canary():
    records = [Record("Be a doctor.", f"Question {i}?", f"Answer {i}.") for i in range(3)]
    planted, secrets = inject_canaries(records, 1.0, seed=1)  # canaries in the input (`ksg canary`)
    moved = [dataclasses.replace(r, input=s["prefix"].rstrip(), output=r.input[len(s["prefix"]):])  # in the answer
             for r, s in zip(planted, secrets, strict=True)]
    for recs in (planted, moved):
        for prompt, s in zip(targeted_prompts(secrets, recs), secrets, strict=True):
            assert prompt == [{"role": "system", "content": "Be a doctor."},
                              {"role": "user", "content": s["prefix"].rstrip()}]
            assert not find_secrets(json.dumps(prompt), s)  # the prompt never contains the secret itself
    assert targeted_prompts(secrets[:1]) == [[{"role": "user", "content": secrets[0]["prefix"].rstrip()}]]
    with pytest.raises(ValueError, match="do not belong together"):
        targeted_prompts(secrets, records)
    with pytest.raises(ValueError, match="outside the 1 canary records"):
        targeted_prompts(secrets, planted[:1])


def test_bundle_flags_mark_non_dp(tmp_path):
    from ksg_ray.bundle import dump_privacy

    (tmp_path / "privacy.json").write_text(dump_privacy({"epsilon": 8.0, "delta": 1e-5, "not_dp": [],
                                                         "mechanisms": []}))
    assert bundle_privacy_flags(tmp_path)["dp"] is True
    (tmp_path / "privacy.json").write_text(dump_privacy({"epsilon": math.inf, "delta": 1e-5, "not_dp": [],
                                                         "mechanisms": []}))
    flags = bundle_privacy_flags(tmp_path)
    assert flags["dp"] is False and math.isinf(flags["epsilon"])
    (tmp_path / "privacy.json").write_text(dump_privacy({"epsilon": 8.0, "delta": 1e-5, "mechanisms": [],
                                                         "not_dp": ["candidates.non_dp_proxy_adapter"]}))
    assert bundle_privacy_flags(tmp_path)["dp"] is False
    with pytest.raises(FileNotFoundError, match="privacy report is missing"):
        bundle_privacy_flags(tmp_path / "nope")


# --- leak vs no leak on a real model ------------------------------------------------------------------------------

def canary_in_answer_records(n: int) -> tuple[list[Record], list[dict]]:
    """`n` demo questions, each with a canary planted by `ksg canary` and then moved into the answer: a record
    whose answer repeats the patient's contact details. The project's fine-tuning puts the loss on answers only,
    so only secrets in answers can be learned (and leaked) at all. A short instruction and the question's first
    sentence keep the sequences short for a fast test."""
    records = [dataclasses.replace(r, instruction="Be a doctor.", input=re.split(r"(?<=[.?!])\s", r.input)[0])
               for r in load_records("demo:medical", limit=n)]
    planted, secrets = inject_canaries(records, 1.0, seed=0)
    moved = [dataclasses.replace(planted[s["record_index"]], input=s["prefix"].rstrip(),
                                 output=planted[s["record_index"]].input[len(s["prefix"]):]) for s in secrets]
    return moved, secrets


def finetune_non_private(model_path: str, records: list[Record], out, steps: int, lr: float) -> None:
    """Non-private LoRA fine-tune (ε = ∞), full batch: the canary records repeated `steps` times. Uses the
    project's own tokenisation (answer-only labels), LoRA builder and loss."""
    import torch
    from transformers import AutoTokenizer

    from ksg_ray.common.chat_format import collate, tokenize_records
    from ksg_ray.common.lora import build_lora_lm, lm_loss, save_adapter
    from ksg_ray.common.sections import LoraSection

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples, truncated = tokenize_records(tokenizer, records, max_seq_len=128)
    assert truncated == 0  # the canary must be in the trained tokens
    model = build_lora_lm(torch.device("cpu"), model_path=model_path, seed=0, lora=LoraSection(
        r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = collate(examples, tokenizer.pad_token_id)
    for _ in range(steps):
        lm_loss(model, batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    save_adapter(model, out)


@pytest.fixture(scope="module")
def leak_setup(tmp_path_factory):
    import torch

    from ksg_ray.common.hub import resolve_model
    from ksg_ray.engines.transformers_engine import TransformersEngine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is many times faster than two under contention
    try:
        model_path = resolve_model("smollm2-135m")
        records, secrets = canary_in_answer_records(16)
        members, nonmembers = records[:4], records[4:]  # the same construction; only the first 4 are trained on
        adapter = tmp_path_factory.mktemp("leaky") / "adapter"
        finetune_non_private(model_path, members, adapter, steps=12, lr=5e-3)
        yield {"records": records, "secrets": secrets, "members": members, "nonmembers": nonmembers,
               "leaky": TransformersEngine(model_path, str(adapter), batch_size=8),
               "never_trained": TransformersEngine(model_path, batch_size=8)}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.e2e
def test_canary_rate_and_mia_separate_leak_from_no_leak(leak_setup, tmp_path):
    from ksg_ray.engines import SamplingParams

    s = leak_setup
    trained = s["secrets"][:4]
    audited = s["secrets"][:8]  # 4 trained-on canaries, 4 never trained on
    greedy = SamplingParams(temperature=0.0, max_new_tokens=48)
    results = {}
    for name in ("leaky", "never_trained"):
        model = s[name]
        scan, answers = canary_rate_generations(model, audited, s["records"], greedy)
        # The "synthetic dataset" this model writes for questions it never trained on.
        synthetic = tmp_path / f"{name}.jsonl"
        synthetic.write_text("".join(json.dumps({"instruction": "", "input": r.input, "output": a[0],
                                                 "provenance": {"model": name}}) + "\n"
                                     for r, a in zip(s["records"][4:8], answers[4:], strict=True)))
        results[name] = {
            "generations_trained": sum(bool(f["fields"]) for f in scan.found[:4]) / 4,
            "generations_untrained": sum(bool(f["fields"]) for f in scan.found[4:]) / 4,
            "synthetic": scan_canaries(read_dataset_texts(synthetic), trained).rate,
            "mia": membership_inference(model, s["members"], s["nonmembers"]),
            "mia_reference": membership_inference(model, s["members"], s["nonmembers"], reference=s["never_trained"]),
        }
    leak, clean = results["leaky"], results["never_trained"]
    print({k: {kk: (vv.summary() if hasattr(vv, "summary") else vv) for kk, vv in v.items()}
           for k, v in results.items()})
    # Built to leak: ε = ∞, the canary records seen 12 times each; the secrets come back under targeted prompts,
    # leak into text written for other questions, and members are told from non-members.
    assert leak["generations_trained"] >= 0.75
    assert leak["synthetic"] > 0
    assert leak["mia"].auc >= 0.95 and leak["mia"].p_value < 0.01
    assert leak["mia_reference"].auc >= 0.95 and leak["mia_reference"].attack == "reference"
    # Built not to: the same canaries never trained on. With 4 members the loss attack's AUC is noisy around
    # 0.5 (per-record difficulty), so "no signal" is "not significant"; against the reference the gain is 0 for
    # every record, all ties: exactly 0.5.
    assert clean["generations_trained"] == 0 and clean["synthetic"] == 0
    assert clean["mia"].p_value > 0.05 and leak["mia"].auc - clean["mia"].auc >= 0.2
    assert clean["mia_reference"].auc == 0.5
    # The rate is specific to trained secrets: the leaky model does not produce the secrets it never saw.
    assert leak["generations_untrained"] == 0 and clean["generations_untrained"] == 0
    assert leak["mia"].unscored == {"members": 0, "nonmembers": 0}
    assert (len(leak["mia"].member_scores), len(leak["mia"].nonmember_scores)) == (4, 12)


def test_an_evaluated_model_scores_each_pair_once(tiny_model_path):
    """The held-out answer loss and the attack's non-members share pairs: the second ask is not scored again."""
    from ksg_ray.audit.method_eval import ScoredOnce
    from ksg_ray.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(tiny_model_path)
    engine_score, calls = engine.score, []
    engine.score = lambda p, a: calls.append(len(a)) or engine_score(p, a)
    model = ScoredOnce(engine)
    prompts = [[{"role": "user", "content": q}] for q in ("how are you", "what is a cold", "why")]
    answers = ["fine thanks", "a virus of the nose", "because"]
    first = model.score(prompts[:2], answers[:2])
    again = model.score(prompts, answers)
    assert calls == [2, 1]  # only the new pair was scored
    assert again[:2] == first
    assert again == pytest.approx(engine_score(prompts, answers), abs=1e-5)
    assert model.tokenizer is engine.tokenizer  # everything else is the engine's
