"""CLIENT SIDE — candidate answers to the private questions, for the reward model's preference pairs.

The base model's and the DP generator's greedy answers come from batched generation through the same engine code
the server uses (`ksg_ray.engines.stage.GenerateUDF`): on Ray Data actor pools, or (`candidates.ray: false`, a
small run on one machine) called in this process, with no actors to start. Results are cached per record in the
run directory (client-side: they are derived from private questions), so a rerun generates nothing twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ksg_ray.bundle import NOT_DP_REASONS
from ksg_ray.common.batching import longest_first
from ksg_ray.common.chat_format import build_messages
from ksg_ray.common.jsonl import write_json_atomic
from ksg_ray.common.records import Record

logger = logging.getLogger(__name__)

__all__ = ["NOT_DP_PROXY", "GeneratorRef", "build_reward_examples", "candidate_cache_key", "generate_answers",
           "load_or_generate_candidates", "question_messages"]


def question_messages(record: Record) -> list[dict[str, str]]:
    """The record's prompt (system = instruction, user = input) without its private answer."""
    return [m for m in build_messages(record) if m["role"] != "assistant"]


def generate_answers(records: list[Record], *, engine: str, model_path: str, adapter_path: str | None,
                     max_new_tokens: int, batch_size: int, max_actors: int = 1, ray: bool = True) -> list[str | None]:
    """Greedy answers, one per record, in record order; None where the engine failed (reported, not dropped)."""
    return generate_answer_sets(records, answers=dict(engine=engine, model_path=model_path, adapter_path=adapter_path,
                                                      max_new_tokens=max_new_tokens, batch_size=batch_size,
                                                      max_actors=max_actors, ray=ray))["answers"]


def generate_answer_sets(records: list[Record], **sources: dict) -> dict[str, list[str | None]]:
    """For each named source (`generate_answers`' keyword arguments), greedy answers per record, in record order.

    Sources with `ray` (the default) run as one Ray Data execution: each is a branch with its own engine pool, and
    the branches are unioned, so their pools start and run side by side (on a 2-core machine two 1-CPU engines use
    both cores, where one source after the other left a core idle and started an actor twice). Sources with
    `ray: False` run in this process, one after the other, on this process's threads: no actor starts (on 2
    cores the demo's two candidate sets took 30.5 s on Ray Data and 24.9 s here, the same answers).
    A failed row is None in its source only.
    """
    prompts = [question_messages(r) for r in records]
    order = longest_first(prompts)
    rows: list[dict] = []
    on_ray = {name: kw for name, kw in sources.items() if kw.get("ray", True)}
    if on_ray:
        rows += _generate_on_ray(prompts, order, on_ray)
    for name, kw in sources.items():
        if name not in on_ray:
            rows += _generate_here(prompts, order, name, kw)
    answers: dict[str, list[str | None]] = {name: [None] * len(records) for name in sources}
    for row in rows:
        if row["__error__"]:
            logger.warning("record %s, %s: generation failed: %s", records[row["idx"]].source, row["source"],
                           row["__error__"])
        else:
            answers[row["source"]][row["idx"]] = list(row["generations"])[0]
    return answers


def _greedy(kw: dict) -> Any:
    from ksg_ray.engines import SamplingParams

    return SamplingParams(temperature=0.0, max_new_tokens=kw["max_new_tokens"], n=1)


def _generate_on_ray(prompts: list[list[dict]], order: list[int], sources: dict[str, dict]) -> list[dict]:
    """Every source's rows (idx, source, generations, __error__) from one Ray Data execution."""
    import ray.data

    from ksg_ray.engines.stage import generate_dataset

    branches = []
    for name, kw in sources.items():
        ds = ray.data.from_items([{"idx": i, "source": name, "messages": prompts[i]} for i in order])
        branches.append(generate_dataset(
            ds, engine_kind=kw["engine"], model_path=kw["model_path"], adapter_path=kw["adapter_path"],
            sampling=_greedy(kw), batch_size=kw["batch_size"], min_actors=1, max_actors=kw.get("max_actors", 1)))
    out = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
    return list(out.select_columns(["idx", "source", "generations", "__error__"]).iter_rows())


def _generate_here(prompts: list[list[dict]], order: list[int], name: str, kw: dict) -> list[dict]:
    """One source's rows, as `_generate_on_ray` gives them, from the same `GenerateUDF` called in this process."""
    import dataclasses

    import numpy as np

    from ksg_ray.engines.stage import GenerateUDF

    udf = GenerateUDF(kw["engine"], kw["model_path"], kw["adapter_path"], dataclasses.asdict(_greedy(kw)))
    rows = []
    for start in range(0, len(order), kw["batch_size"]):
        idx = order[start:start + kw["batch_size"]]
        messages = np.empty(len(idx), dtype=object)  # one list of messages per row, as Ray Data hands them over
        messages[:] = [prompts[i] for i in idx]
        out = udf({"idx": np.array(idx), "messages": messages})
        rows += [{"idx": i, "source": name, "generations": g, "__error__": e}
                 for i, g, e in zip(idx, out["generations"], out["__error__"], strict=True)]
    return rows


def load_or_generate_candidates(records: list[Record], cache: Path, key: dict | None = None,
                                **sources: dict) -> dict[str, list[str | None]]:
    """For each named source (`base`, `dp_generator`, ...: kwargs of `generate_answers`), answers per record.

    A source already in `cache` is not generated again, but only for the same records and the same `key`
    (`candidate_cache_key`: the generator adapter's sha256, the data fingerprint, the engine settings): a
    retrained generator, other data or other settings invalidate the whole cache.
    """
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    identity = {"records": [r.source for r in records], "key": key or {}}
    if {k: cached.get(k) for k in identity} != identity:
        if cached:
            logger.info("%s: made for other records, another generator or other settings; generating again", cache)
        cached = dict(identity)
    todo = {name: kwargs for name, kwargs in sources.items() if name not in cached}
    if todo:
        logger.info("generating %s answers for %d private questions", " and ".join(todo), len(records))
        cached |= generate_answer_sets(records, **todo)
        write_json_atomic(cache, cached, indent=None)
    return {name: cached[name] for name in sources}


NOT_DP_PROXY = NOT_DP_REASONS[0]  # the bundle accepts only known non-DP uses, never free text


@dataclass(frozen=True)
class GeneratorRef:
    """The DP generator the candidates come from: its own public base, its adapter, the adapter's sha256."""

    base_path: str
    adapter_path: str
    sha256: str

    @classmethod
    def from_bundle(cls, bundle_dir: Path) -> GeneratorRef:
        """From the generator bundle: the base is the generator's own (its `model_ref.json`), not the reward
        model's (on the GPU configs a 7B generator and a 0.5B reward model)."""
        from ksg_ray.bundle import component_sha256, read_model_ref
        from ksg_ray.common.hub import resolve_model

        return cls(resolve_model(read_model_ref(bundle_dir, "generator")["base_model"]),
                   str(Path(bundle_dir) / "generator"), component_sha256(bundle_dir, "generator"))


def candidate_cache_key(cfg: Any, generator: GeneratorRef, data_fingerprint: str) -> dict[str, Any]:
    """What the cached candidates depend on besides the records (`load_or_generate_candidates`)."""
    c = cfg.candidates
    return {"generator_sha256": generator.sha256, "generator_base": generator.base_path, "data": data_fingerprint,
            "engine": c.engine, "max_new_tokens": c.max_new_tokens,
            "non_dp_proxy": str(c.non_dp_proxy_adapter) if c.non_dp_proxy_adapter else None}


def build_reward_examples(cfg: Any, records: list[Record], tokenizer: Any, generator: GeneratorRef, run_dir: Path,
                          privacy: Any) -> tuple[list[Any], dict[str, list[str | None]], list[str]]:
    """Candidates per record in `CANDIDATES` order (truth, DP generator, base[, non-DP proxy]) → one example each.

    `cfg` is the `DPRewardConfig`; `tokenizer` the reward model's; `privacy` (the job's `PrivacyEngine`) is told
    when the non-DP proxy is used. The base and DP-generator answers come from `generator`.

    Returns (examples, answers by source, sources of the records that lost a candidate to an engine error).
    """
    from ksg_ray.common.reward_model import tokenize_reward_example

    gen = dict(engine=cfg.candidates.engine, model_path=generator.base_path,
               max_new_tokens=cfg.candidates.max_new_tokens, batch_size=cfg.candidates.batch_size,
               max_actors=cfg.candidates.max_actors, ray=cfg.candidates.ray)
    sources = {"base": gen | {"adapter_path": None}, "dp_generator": gen | {"adapter_path": generator.adapter_path}}
    if cfg.candidates.non_dp_proxy_adapter is not None:
        sources["non_dp_proxy"] = gen | {"adapter_path": str(cfg.candidates.non_dp_proxy_adapter)}
        privacy.mark_not_dp(NOT_DP_PROXY)
    fingerprint = privacy.record_set  # the records' fingerprint set: other data, other candidates
    answers = load_or_generate_candidates(records, run_dir / "candidates.json",
                                          key=candidate_cache_key(cfg, generator, fingerprint), **sources)
    examples, failed = [], []
    for i, r in enumerate(records):
        cands = [r.output, answers["dp_generator"][i], answers["base"][i]]
        if "non_dp_proxy" in answers:
            cands.append(answers["non_dp_proxy"][i])
        if any(c is None for c in cands):
            failed.append(r.source)
            cands = [c if c is not None else r.output for c in cands]  # a failed candidate makes no pair
        examples.append(tokenize_reward_example(tokenizer, r.input, cands, cfg.data.max_seq_len))
    if failed:
        logger.warning("%d records lost a candidate to a generation error: %s", len(failed), failed[:10])
    return examples, answers, failed
