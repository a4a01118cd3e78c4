"""SERVER SIDE — the synthesis pipeline: bundle + public config → synthetic (query, answer) dataset.

Four Ray Data streams, each a chain of `map_batches` stages over autoscaling actor pools (every actor loads
its model once), with the driver as the only writer:

1. queries:  DP generator writes new questions from public seeds          → `queries_raw.jsonl` (per prompt)
2. answers:  professional judge → answer candidates → reward + perplexity → `scored.jsonl` (per query)
3. refine r: generator critique → rewriter's rewrites → reward + perplexity → `refine_r<r>.jsonl` (per query)
4. output:   Reward Guided Filtering pool ∪ kept rewrites → dedup → PII scrub → `synthetic.{jsonl,parquet}`

Between the streams the driver does what needs every row (exact deduplication, similarity to the seeds, the
top-1/8 cut, the pool minimum). The stores hold model work only, keyed by deterministic ids; everything
derived is recomputed from them, so a rerun after a crash redoes only unfinished units and writes no
duplicates (`ksg_ray.server.synth.store`). Rows that fail are written to `errors.jsonl` and retried by a rerun;
rejected queries go to `rejected.jsonl` with their reason; the counts of every step go to `funnel.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import ray

from ksg_ray.bundle import verify_bundle
from ksg_ray.common.chat_format import trim_to_sentence
from ksg_ray.common.errors import KsgError
from ksg_ray.common.hub import model_dir_engine_args, resolve_model
from ksg_ray.common.jsonl import atomic_open, read_jsonl, write_json_atomic, write_jsonl_atomic
from ksg_ray.engines import SamplingParams, shared_engines
from ksg_ray.engines.ray_llm_processor import processor_generate
from ksg_ray.engines.stage import ERROR_COLUMN, GenerateUDF, is_missing, passthrough, plain
from ksg_ray.server.bundle_models import component_base
from ksg_ray.server.synth import prompts
from ksg_ray.server.synth.config import DomainSection, EndpointSection, EngineSection, SynthConfig
from ksg_ray.server.synth.dedup import near_duplicates, normalise, similar_to_any
from ksg_ray.server.synth.filters import answer_filters, apply_filters, query_filters
from ksg_ray.server.synth.judge_stage import JudgeUDF
from ksg_ray.server.synth.pii import PIIScrubber
from ksg_ray.server.synth.reward_filter import best_rewrite, keep_top, positive_negative
from ksg_ray.server.synth.score_stage import ScoreUDF
from ksg_ray.server.synth.store import JsonlStore

__all__ = ["SynthModels", "run_synthesis"]

logger = logging.getLogger(__name__)
LIGHT_TASK_CPUS = 0.05  # pre/post-processing tasks between actor stages: they must not wait behind the actors
ENDPOINT_ACTOR_CPUS = 0.1  # actors that send requests to a served model: network-bound


@dataclasses.dataclass(frozen=True)
class SynthModels:
    """Every model the stages ask: local paths (base, adapter), or the professional's endpoint; their ids for
    provenance."""

    generator: tuple[str, str]
    professional: tuple[str, str | None] | EndpointSection
    rewriter: tuple[str, str | None] | EndpointSection
    ids: dict[str, str]

    @classmethod
    def from_config(cls, cfg: SynthConfig) -> SynthModels:
        """Verify the bundle and resolve every model (only public names and the bundle are used)."""
        verify_bundle(cfg.bundle)
        if not (cfg.bundle / "reward").is_dir():
            raise ValueError(f"{cfg.bundle}: the bundle has no reward model; run `ksg dp-reward` on the client "
                             "first (RewardDS scoring needs it)")
        generator = (component_base(cfg.bundle, "generator"), str(cfg.bundle / "generator"))
        professional = cfg.professional.endpoint or (resolve_model(cfg.professional.model), None)
        rewriter = {"professional": professional, "generator": generator}.get(cfg.refine.rewriter)
        if rewriter is None:
            rewriter = model_dir_engine_args(cfg.refine.rewriter)
        manifest = json.loads((cfg.bundle / "manifest.json").read_text())["files"]
        ids = {"generator": f"bundle-generator:{manifest['generator/adapter_model.safetensors']['sha256'][:12]}",
               "reward": f"bundle-reward:{manifest['reward/adapter_model.safetensors']['sha256'][:12]}",
               "professional": (f"{cfg.professional.endpoint.model}@{cfg.professional.endpoint.base_url}"
                                if cfg.professional.endpoint else cfg.professional.model)}
        ids["rewriter"] = ids.get(cfg.refine.rewriter, cfg.refine.rewriter)
        return cls(generator, professional, rewriter, ids)


def run_synthesis(cfg: SynthConfig) -> dict[str, Any]:
    """Run (or resume) every phase; returns the funnel summary also written to `funnel.json`."""
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = SynthModels.from_config(cfg)
    _check_same_run(cfg, out)
    errors = JsonlStore(out / "errors.jsonl", key="error_id")
    started = time.perf_counter()
    funnel: list[tuple[str, int]] = []

    stores = {"queries": _run_queries(cfg, models, out, errors)}
    queries, rejected = _derive_queries(cfg, stores["queries"].rows, funnel)
    stores["answers"] = _run_answers(cfg, models, out, errors, queries)
    candidates = _candidates_by_query(cfg, stores["answers"].rows, queries, rejected, funnel)
    pool = _reward_guided_filter(cfg, candidates, models, funnel)
    for r in range(1, cfg.refine.rounds + 1):
        stores[f"refine round {r}"] = refined = _run_refine_round(cfg, models, out, errors, r, candidates, queries)
        _update_pool(cfg, r, refined.rows, candidates, pool, models, funnel)
    rows = _finalise(cfg, pool, queries, models, funnel)

    write_jsonl_atomic(out / "rejected.jsonl", rejected)
    write_jsonl_atomic(out / "synthetic.jsonl", rows)
    _write_parquet(out / "synthetic.parquet", rows)
    # a unit that failed once and was finished by a later run is no longer a failure
    failed = [e for e in errors.rows.values() if e["unit"] not in stores.get(e["phase"], {})]
    summary = {
        "funnel": funnel,
        "failed_rows": len(failed),
        "rejected_reasons": dict(Counter(r["reason"] for r in rejected)),
        "duplicates_refused": sum(store.refused for store in stores.values()),
        "rewards": {"candidates": [c["reward"] for cs in candidates.values() for c in cs if c["round"] == 0],
                    "kept": [p["reward"] for p in pool]},
        "models": models.ids,
        "engine": cfg.engine.kind,
        "output": str(out / "synthetic.jsonl"),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for store in [*stores.values(), errors]:
        store.close()
    write_json_atomic(out / "funnel.json", summary)  # the layout `ksg report` reads (ksg_ray.common.run_layout)
    if failed:
        logger.warning("%d rows failed (see %s); a rerun retries them", len(failed), out / "errors.jsonl")
    if len(rows) < cfg.min_rows:
        raise TooFewRows(out, len(rows), cfg.min_rows, funnel, summary["rejected_reasons"], len(failed))
    return summary


# Funnel lines that count something else than its rows (candidates, rewrites, redactions): a drop to or from one
# of them is not rows lost.
_NOT_ROWS = re.compile(r"finished answer candidates$|PII redactions$|refine round \d+: ")


class TooFewRows(KsgError, RuntimeError):
    """The synthesis wrote fewer than `min_rows` rows: says which funnel step lost the most, and why."""

    def __init__(self, out: Path, rows: int, min_rows: int, funnel: list[tuple[str, int]],
                 reasons: dict[str, int], failed: int) -> None:
        chain = [step for step in funnel if not _NOT_ROWS.match(step[0])]  # counts of rows, in one unit
        drops = [(before[1] - after[1], after[0], before[1], after[1])
                 for before, after in zip(chain, chain[1:], strict=False) if after[1] < before[1]]
        worst = max(drops, default=None)
        where = (f"the step that lost the most is '{worst[1]}' ({worst[2]} -> {worst[3]})" if worst
                 else "no step lost rows: too few were asked for")
        steps = " -> ".join(f"{name} {n}" for name, n in funnel)
        top = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:5]) or "none"
        super().__init__(
            f"synthesis wrote {rows} rows < min_rows={min_rows} ({out / 'synthetic.jsonl'}); {where}. Funnel: "
            f"{steps}. Rejections: {top}; failed rows: {failed} ({out / 'errors.jsonl'}). Ask for more "
            "(queries.num_prompts, queries.per_prompt, scoring.keep_fraction) or loosen the step named above.")


def _check_same_run(cfg: SynthConfig, out: Path) -> None:
    """Refuse to resume stored work made under other settings: it would mix two experiments in one dataset.

    The settings that shape stored model work are fingerprinted with the bundle's manifest; what only changes
    the derived output (`dedup`, `run`, the engine) or checks it (`min_rows`), the number of refinement rounds and
    the rewriter (the pipeline passes a new target each round) may change between runs.
    """
    settings = cfg.model_dump(mode="json", exclude={"run": True, "dedup": True, "engine": True, "bundle": True,
                                                    "min_rows": True, "refine": {"rounds", "rewriter"},
                                                    "queries": {"share_from"}})
    settings["bundle_manifest"] = hashlib.sha256((cfg.bundle / "manifest.json").read_bytes()).hexdigest()
    path = out / "synth_run.json"
    if path.exists():
        stored = json.loads(path.read_text())
        stored.pop("min_rows", None)  # fingerprinted by earlier versions
        stored.get("refine", {}).setdefault("max_queries", None)  # earlier versions refined every query
        if stored != settings:
            changed = sorted(k for k in settings.keys() | stored.keys() if settings.get(k) != stored.get(k))
            raise ValueError(f"{out}: holds work made with other settings ({', '.join(changed)} changed); use a new "
                             f"run.output_dir, or delete {out} to start over")
    else:
        path.write_text(json.dumps(settings, indent=2))


# --- the streams -----------------------------------------------------------------------------------------

def _run_queries(cfg: SynthConfig, models: SynthModels, out: Path, errors: JsonlStore) -> JsonlStore:
    store = JsonlStore(out / "queries_raw.jsonl", key="prompt_id")
    def messages(i: int) -> list[dict]:
        if cfg.queries.mode == "sample":
            return prompts.sample_query_messages(cfg.queries.system_prompt, _user_prefix(cfg, i))
        return prompts.query_messages(cfg.domain, i, cfg.queries.seeds_per_prompt, cfg.queries.seed)

    if cfg.queries.share_from is not None:
        _share_queries(cfg, store, out)
    todo = [{"prompt_id": f"p{i:05d}", "messages": messages(i), "user_prefix": _user_prefix(cfg, i)}
            for i in range(cfg.queries.num_prompts) if f"p{i:05d}" not in store]
    if todo:
        q = cfg.queries
        # seeded per row (`seed_column`): a prompt's samples do not depend on its batch-mates or on a resume
        sampling = SamplingParams(temperature=q.temperature, top_p=q.top_p, max_new_tokens=q.max_new_tokens,
                                  n=q.per_prompt, seed=cfg.seed)
        sample = Step(GenerateUDF, _actor_kwargs(GenerateUDF, cfg.engine, model=models.generator, sampling=sampling,
                                                 messages_column="messages", output_column="samples",
                                                 seed_column="prompt_id"), True)
        ds = _apply(ray.data.from_items(todo), [sample], cfg.engine)
        _drain(ds, "queries", len(todo), cfg, store, errors, key="prompt_id",
               keep=("prompt_id", "user_prefix", "samples", "samples_finished"))
    logger.info("queries: %d/%d prompts done", len(store), cfg.queries.num_prompts)
    return store


# what a prompt's raw samples depend on (with the bundle, `seed` and `domain`); the other query settings only
# shape how samples become queries, so two runs that differ there may share samples
_SAMPLING_KEYS = ("mode", "system_prompt", "user_prefixes", "per_prompt", "seeds_per_prompt", "temperature", "top_p",
                  "max_new_tokens", "seed")


def _share_queries(cfg: SynthConfig, store: JsonlStore, out: Path) -> None:
    """Copy the raw samples of our prompts that `queries.share_from` already drew, if it drew them the same way
    (else log why not and draw our own)."""
    src = cfg.queries.share_from
    if not (src / "synth_run.json").is_file() or not (src / "queries_raw.jsonl").is_file():
        logger.info("queries: %s holds no samples to share; drawing our own", src)
        return
    def drawn(settings: dict[str, Any]) -> dict[str, Any]:
        return {"bundle": settings["bundle_manifest"], "seed": settings["seed"], "domain": settings["domain"],
                **{f"queries.{k}": settings["queries"].get(k) for k in _SAMPLING_KEYS}}
    theirs, ours = (drawn(json.loads((d / "synth_run.json").read_text())) for d in (src, out))
    if theirs != ours:
        logger.info("queries: not sharing %s's samples, they were drawn with other settings (%s); drawing our own",
                    src, ", ".join(sorted(k for k in ours if ours[k] != theirs[k])))
        return
    wanted = {f"p{i:05d}" for i in range(cfg.queries.num_prompts)}
    text = (src / "queries_raw.jsonl").read_text(encoding="utf-8")  # read only: the other run may still be writing
    rows = (row for _, row in read_jsonl(src / "queries_raw.jsonl", text=text[:text.rfind("\n") + 1]))
    copied = sum(store.append(row) for row in rows if row.get("prompt_id") in wanted and row["prompt_id"] not in store)
    logger.info("queries: %d prompts' samples shared from %s", copied, src)


def _user_prefix(cfg: SynthConfig, i: int) -> str:
    """Prompt i's public opening of the user message (sample mode; "" without prefixes)."""
    prefixes = cfg.queries.user_prefixes if cfg.queries.mode == "sample" else []
    return prefixes[i % len(prefixes)] if prefixes else ""


@dataclasses.dataclass
class Step:
    """One step of a synthesis phase, as Ray Data runs it: an engine actor class with its constructor's arguments
    (a pool of actors, each loading its model once), or a light row function with its keyword arguments."""

    fn: Any
    kwargs: dict[str, Any]
    actor: bool

    @property
    def num_cpus(self) -> float | None:
        """An actor that only waits on an endpoint (`professional.endpoint`) holds next to no CPU; None = the
        engine section's."""
        return ENDPOINT_ACTOR_CPUS if self.actor and self.kwargs.get("engine_kind") == "openai" else None


def answer_steps(cfg: SynthConfig, models: SynthModels) -> list[Step]:
    """The answers phase: the professional judge (then judged-out queries skip the rest), each source's answer
    candidates, candidate merging and filtering, then reward and log-probability scoring."""
    steps = []
    if cfg.professional.filter:
        steps += [Step(JudgeUDF, _actor_kwargs(JudgeUDF, cfg.engine, model=models.professional,
                                               min_yes_probability=cfg.professional.min_yes_probability), True),
                  Step(_skip_rejected, {}, False)]
    a = cfg.answers
    sampling = SamplingParams(temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens, n=a.n,
                              seed=cfg.seed)
    steps += [Step(GenerateUDF, _actor_kwargs(GenerateUDF, cfg.engine, model=getattr(models, source), sampling=sampling,
                                              messages_column="answer_messages", output_column=f"answers_{source}",
                                              seed_column="id"), True) for source in a.sources]
    return steps + [
        Step(_merge_candidates, dict(sources=a.sources, require_finished=a.require_finished,
                                     filters=answer_filters(cfg)), False),
        Step(ScoreUDF, _actor_kwargs(ScoreUDF, cfg.engine, bundle_dir=str(cfg.bundle), candidates_column="candidates",
                                     prompt_column="answer_messages"), True)]


def answer_rows(cfg: SynthConfig, queries: dict[str, dict]) -> list[dict]:
    """The answers phase's input rows, one per query."""
    return [{"id": qid, "query": q["query"], "judge_messages": prompts.judge_messages(cfg.domain, q["query"]),
             "answer_messages": prompts.answer_messages(cfg.domain, q["query"])} for qid, q in queries.items()]


def _run_answers(cfg: SynthConfig, models: SynthModels, out: Path, errors: JsonlStore,
                 queries: dict[str, dict]) -> JsonlStore:
    store = JsonlStore(out / "scored.jsonl", key="id")
    todo = [row for row in answer_rows(cfg, queries) if row["id"] not in store]
    if todo:
        ds = _apply(ray.data.from_items(todo), answer_steps(cfg, models), cfg.engine)
        keep = ("id", "query", "judge_yes_probability", "judge_pass", "candidates", "candidates_source",
                "candidates_finished", "candidates_reward", "candidates_logprob", "unfinished_dropped",
                "candidates_rejected")
        _drain(ds, "answers", len(todo), cfg, store, errors, key="id", keep=keep)
    logger.info("answers: %d/%d queries done", len(store), len(queries))
    return store


def _run_refine_round(cfg: SynthConfig, models: SynthModels, out: Path, errors: JsonlStore, r: int,
                      candidates: dict[str, list[dict]], queries: dict[str, dict]) -> JsonlStore:
    """One Self-Optimizing Refinement round over every query with candidates (RewardDS: only answers change), or
    over a fixed sample of `refine.max_queries` of them (the same sample on a rerun, so a resumed round adds none)."""
    store = JsonlStore(out / f"refine_r{r}.jsonl", key="id")
    todo = []
    for qid in refine_queries(candidates, cfg.refine.max_queries, cfg.seed, r):
        if qid in store:
            continue
        cands = candidates[qid]
        pos, neg = positive_negative([c["reward"] for c in cands], [c["logprob"] for c in cands], cfg.scoring.alpha)
        query = queries[qid]["query"]
        todo.append({"id": qid, "query": query, "positive": cands[pos]["text"],
                     "critique_messages": prompts.critique_messages(query, cands[pos]["text"], cands[neg]["text"]),
                     "answer_messages": prompts.answer_messages(cfg.domain, query)})
    if todo:
        ds = _apply(ray.data.from_items(todo), refine_steps(cfg, models, r), cfg.engine)
        keep = ("id", "critique", "candidates", "candidates_finished", "candidates_reward", "candidates_logprob",
                "unfinished_dropped", "candidates_rejected")
        _drain(ds, f"refine round {r}", len(todo), cfg, store, errors, key="id", keep=keep)
    return store


def refine_queries(candidates: dict[str, list[dict]], max_queries: int | None, seed: int | None, r: int) -> list[str]:
    """The queries round `r` refines, in `candidates`' order: every one with candidates, or a sample of
    `max_queries` of them drawn from (seed, round) alone, so a rerun refines the same ones."""
    chosen = [qid for qid, cands in candidates.items() if cands]
    if max_queries is None or len(chosen) <= max_queries:
        return chosen
    sample = set(random.Random(f"refine round {r}, seed {seed}").sample(sorted(chosen), max_queries))
    return [qid for qid in chosen if qid in sample]


def refine_steps(cfg: SynthConfig, models: SynthModels, r: int) -> list[Step]:
    """One refinement round: the generator critiques the best vs the worst candidate, the rewriter rewrites
    the best with the critique, then the rewrites are merged, filtered and scored like the answers."""
    rf = cfg.refine
    critique = SamplingParams(temperature=0.0, max_new_tokens=rf.critique_max_new_tokens)
    rewrite = SamplingParams(temperature=rf.temperature, top_p=rf.top_p, max_new_tokens=rf.max_new_tokens,
                             n=rf.n, seed=None if cfg.seed is None else cfg.seed + r)
    return [
        Step(GenerateUDF, _actor_kwargs(GenerateUDF, cfg.engine, model=models.generator, sampling=critique,
                                        messages_column="critique_messages", output_column="critique"), True),
        Step(_rewrite_prompts, dict(domain=cfg.domain.model_dump()), False),
        Step(GenerateUDF, _actor_kwargs(GenerateUDF, cfg.engine, model=models.rewriter, sampling=rewrite,
                                        messages_column="rewrite_messages", output_column="answers_rewriter",
                                        seed_column="id"), True),
        Step(_merge_candidates, dict(sources=["rewriter"], require_finished=cfg.answers.require_finished,
                                     filters=answer_filters(cfg)), False),
        Step(ScoreUDF, _actor_kwargs(ScoreUDF, cfg.engine, bundle_dir=str(cfg.bundle), candidates_column="candidates",
                                     prompt_column="answer_messages"), True)]


def _actor_kwargs(udf: type, engine: EngineSection, model: tuple[str, str | None] | EndpointSection | None = None,
                  sampling: SamplingParams | None = None, **kwargs: Any) -> dict[str, Any]:
    """An engine actor's constructor arguments: the engine, its model (and adapter) or endpoint, its sampling."""
    engine_kwargs = dict(engine.engine_kwargs)
    if engine.kind == "transformers":
        engine_kwargs.setdefault("batch_size", engine.batch_size)
        engine_kwargs.setdefault("dtype", engine.dtype)
    ctor = dict(engine_kind=engine.kind, engine_kwargs=engine_kwargs, **kwargs)
    if isinstance(model, EndpointSection):  # the professional on a server: its own engine, no local model
        ctor |= dict(engine_kind="openai", engine_kwargs=model.engine_kwargs(), model_path=model.model)
        model = (model.model, None)
    if model is not None:
        ctor["model_path"] = model[0]
        if udf is GenerateUDF:
            ctor["adapter_path"] = model[1]
    if sampling is not None:
        ctor["sampling"] = dataclasses.asdict(sampling)
    return ctor


def _as_processor(step: Step) -> Step:
    """A `GenerateUDF` step as the same generation through `ray.data.llm` (`processor_generate`)."""
    k = step.kwargs
    return Step(processor_generate, dict(
        model_path=k["model_path"], adapter_path=k.get("adapter_path"), sampling=k["sampling"],
        messages_column=k["messages_column"], output_column=k["output_column"], seed_column=k.get("seed_column"),
        engine_kwargs=k["engine_kwargs"]), actor=False)


class StepChain:
    """A phase's steps in one actor (`engine.fuse_steps`): each actor step's class is built once here (its model
    loaded, once for the steps that share it), and every batch goes through all the steps in turn, as the separate
    stages would pass it on."""

    def __init__(self, steps: list[Step]) -> None:
        with shared_engines():  # steps on one model share its engine: loaded once per actor
            self.steps = [step.fn(**step.kwargs) if step.actor else functools.partial(step.fn, **step.kwargs)
                          for step in steps]

    def __call__(self, batch: dict) -> dict:
        for step in self.steps:
            batch = step(batch)
        return batch


def _apply(ds: ray.data.Dataset, steps: list[Step], engine: EngineSection) -> ray.data.Dataset:
    """Each step a `map_batches`: an actor pool (every actor builds its engine once, then maps batches), or a light
    task; with `engine.fuse_steps`, each run of steps between generation processors as one actor pool
    (`StepChain`). On `engine.kind: vllm` every generating step is a `ray.data.llm` processor."""
    if engine.kind == "vllm":
        steps = [_as_processor(s) if s.fn is GenerateUDF and s.kwargs["engine_kind"] == "vllm" else s for s in steps]
    if engine.fuse_steps:
        runs: list[list[Step]] = []
        for step in steps:
            if step.fn is processor_generate or not runs or runs[-1][-1].fn is processor_generate:
                runs.append([step])
            else:
                runs[-1].append(step)
        steps = [Step(StepChain, {"steps": run}, actor=True) if len(run) > 1 else run[0] for run in runs]
    for step in steps:
        if step.fn is processor_generate:
            ds = processor_generate(ds, **step.kwargs, batch_size=engine.batch_size,
                                    concurrency=(engine.min_actors, engine.max_actors), num_cpus=engine.num_cpus,
                                    num_gpus=engine.num_gpus, resources=engine.resources or None)
            continue
        if not step.actor:
            ds = ds.map_batches(step.fn, num_cpus=LIGHT_TASK_CPUS, fn_kwargs=step.kwargs)
            continue
        # Ray sets OMP_NUM_THREADS (torch's thread count) to floor(num_cpus) >= 1 unless the worker's env sets it;
        # torch takes MKL_NUM_THREADS over it where the cluster's env sets that, so both.
        env = {"OMP_NUM_THREADS": str(engine.threads), "MKL_NUM_THREADS": str(engine.threads)} if engine.threads else {}
        for inner in step.kwargs.get("steps", [step]):  # the endpoint's token, from the driver to its actors only
            token_env = inner.kwargs.get("engine_kwargs", {}).get("api_key_env") if inner.num_cpus else None
            if token_env and token_env in os.environ:
                env[token_env] = os.environ[token_env]
        remote_args: dict = {"runtime_env": {"env_vars": env}} if env else {}
        if not step.num_cpus:  # the model-holding actors (an endpoint client's are light and go anywhere)
            remote_args |= {"resources": engine.resources} if engine.resources else {}
            remote_args |= {"scheduling_strategy": "SPREAD"} if engine.spread else {}
        ds = ds.map_batches(step.fn, fn_constructor_kwargs=step.kwargs, batch_size=engine.batch_size,
                            compute=ray.data.ActorPoolStrategy(min_size=engine.min_actors, max_size=engine.max_actors),
                            num_cpus=step.num_cpus or engine.num_cpus,
                            num_gpus=0 if step.num_cpus else engine.num_gpus, **remote_args)
    return ds


def _drain(ds: ray.data.Dataset, phase: str, total: int, cfg: SynthConfig, store: JsonlStore, errors: JsonlStore,
           key: str, keep: tuple[str, ...]) -> None:
    """Stream the finished rows into the store (driver = single writer); failed rows into `errors`."""
    done = failed = 0
    started = time.perf_counter()
    for row in ds.iter_rows():
        row = {k: None if is_missing(v) else v for k, v in ((k, plain(v)) for k, v in row.items())}
        if row.get(ERROR_COLUMN):
            failed += 1
            errors.append({"error_id": f"{phase}:{row[key]}:{time.time_ns()}", "phase": phase, "unit": row[key],
                           "error": row[ERROR_COLUMN]})
            logger.warning("%s: %s failed: %s", phase, row[key], row[ERROR_COLUMN])
            continue
        store.append({k: row.get(k) for k in keep})
        done += 1
        if done % cfg.run.log_every == 0 or done + failed == total:
            elapsed = time.perf_counter() - started
            eta = elapsed / (done + failed) * (total - done - failed)
            print(f"[synthesize] {phase}: {done}/{total} done, {failed} failed, {60 * done / max(elapsed, 1e-9):.1f} "
                  f"rows/min, ETA {eta:.0f} s", flush=True)
    print(f"[synthesize] {phase}: {done} done, {failed} failed of {total} in {time.perf_counter() - started:.1f} s",
          flush=True)


# --- row functions between actor stages (cheap tasks) ----------------------------------------------------

def _skip_rejected(batch: dict) -> dict:
    """Queries the judge rejected need no answers: their answer prompt becomes None (skipped downstream)."""
    out = passthrough(batch)
    out["answer_messages"] = [m if not is_missing(ok) and bool(ok) else None
                              for m, ok in zip(out["answer_messages"], out["judge_pass"], strict=True)]
    return out


def _merge_candidates(batch: dict, sources: list[str], require_finished: bool, filters: tuple = ()) -> dict:
    """All sources' answers of a row as one candidate list. Empty ones (and, if required, unfinished ones) are
    left out and counted in `unfinished_dropped`; ones the answer filters reject (another language, a loop) are
    left out with their reason in `candidates_rejected`. An unfinished answer that is kept is trimmed to its
    last complete sentence (`trim_to_sentence`)."""
    out = passthrough(batch)
    n = len(next(iter(out.values())))
    texts, origins, finished, dropped = [[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)], [0] * n
    for source in sources:
        for i in range(n):
            answers, flags = out[f"answers_{source}"][i], out[f"answers_{source}_finished"][i]
            if is_missing(answers):  # skipped (judge said no) or failed (its error travels on)
                continue
            for text, done in zip(answers, flags, strict=True):
                if not done and not require_finished:
                    text = trim_to_sentence(text)
                if not text.strip() or (require_finished and not done):
                    dropped[i] += 1
                    continue
                texts[i].append(text)
                origins[i].append(source)
                finished[i].append(done)
        del out[f"answers_{source}"], out[f"answers_{source}_finished"]
    rejected: list[list[str]] = [[] for _ in range(n)]
    for i in range(n):
        reasons = apply_filters(filters, texts[i], out["query"][i])
        rejected[i] = [r for r in reasons if r is not None]
        texts[i], origins[i], finished[i] = ([x for x, r in zip(col, reasons, strict=True) if r is None]
                                             for col in (texts[i], origins[i], finished[i]))
    out |= {"candidates": texts, "candidates_source": origins, "candidates_finished": finished,
            "unfinished_dropped": dropped, "candidates_rejected": rejected}
    return out


def _rewrite_prompts(batch: dict, domain: dict) -> dict:
    dom = DomainSection(**domain)
    out = passthrough(batch)
    out["rewrite_messages"] = [None if is_missing(c) else prompts.rewrite_messages(dom, q, p, c[0])
                               for q, p, c in zip(out["query"], out["positive"], out["critique"], strict=True)]
    return out


# --- what the driver derives from the stores -------------------------------------------------------------

def _derive_queries(cfg: SynthConfig, raw: dict[str, dict],
                    funnel: list) -> tuple[dict[str, dict], list[dict]]:
    """Parse, deduplicate and seed-filter the generator's samples; every rejected sample keeps its reason."""
    samples = [(pid, k, text, done) for pid in sorted(raw) for k, (text, done)
               in enumerate(zip(raw[pid]["samples"], raw[pid]["samples_finished"], strict=True))]
    funnel += [("prompts", cfg.queries.num_prompts), ("query samples generated", len(samples))]
    rejected, parsed = [], {}
    for pid, k, text, finished in samples:
        prefix = raw[pid].get("user_prefix") or ""
        if not finished and not cfg.queries.require_question:  # a description cut mid-sentence: to its last sentence
            trimmed = trim_to_sentence(text)
            finished, text = bool(trimmed) and trimmed != text, trimmed
        message = prompts.first_sentences(prompts.join_prefix(prefix, text), cfg.queries.max_sentences)
        query, reason = prompts.parse_query(message, cfg.queries.min_words, cfg.queries.require_question)
        qid = None if query is None else hashlib.sha256(normalise(query).encode()).hexdigest()[:16]
        if reason is None and not finished and cfg.queries.require_finished and not cfg.queries.require_question:
            reason = "cut at max_new_tokens"  # (a question that ended at its '?' is whole even if the sample is not)
        elif reason is None and qid in parsed:
            reason = "exact duplicate"
        if reason:
            rejected.append({"prompt_id": pid, "sample": k, "text": text, "reason": reason})
        else:
            parsed[qid] = {"id": qid, "query": query, "prompt_id": pid, "sample": k}
    funnel.append(("unique well-formed queries", len(parsed)))
    for f in query_filters(cfg):
        ids = list(parsed)
        for qid, reason in zip(ids, f([parsed[q]["query"] for q in ids]), strict=True):
            if reason is not None:
                q = parsed.pop(qid)
                rejected.append({"prompt_id": q["prompt_id"], "sample": q["sample"], "text": q["query"],
                                 "reason": reason.split(":")[0], "detail": reason})
        funnel.append((f"passed the {f.name} filter", len(parsed)))
    ids = list(parsed)
    similar = similar_to_any([parsed[q]["query"] for q in ids], cfg.domain.seed_questions,
                             cfg.queries.similarity_method, cfg.queries.max_seed_similarity)
    for qid, sim in zip(ids, similar, strict=True):
        if sim is not None:
            q = parsed.pop(qid)
            rejected.append({"prompt_id": q["prompt_id"], "sample": q["sample"], "text": q["query"],
                             "reason": f"too similar to a seed ({cfg.queries.similarity_method})", "similarity": sim})
    funnel.append((f"not copies of a seed ({cfg.queries.similarity_method} < {cfg.queries.max_seed_similarity})",
                   len(parsed)))
    return parsed, rejected


def _candidates_by_query(cfg: SynthConfig, scored: dict[str, dict], queries: dict[str, dict],
                         rejected: list[dict], funnel: list) -> dict[str, list[dict]]:
    """Scored candidates per query that passed the judge; judge rejections join `rejected`."""
    candidates: dict[str, list[dict]] = {}
    passed = 0
    answered = [scored[q] for q in queries if q in scored]
    for row in answered:
        if cfg.professional.filter and row["judge_pass"] is not True:
            rejected.append({"id": row["id"], "text": row["query"], "reason": "professional judge said no",
                             "yes_probability": row["judge_yes_probability"]})
            continue
        passed += 1
        candidates[row["id"]] = _candidate_list(row, round_=0)
    if cfg.professional.filter:
        funnel.append(("passed the professional filter", passed))
    for row in (r for r in answered if r["id"] in candidates):
        for reason in row.get("candidates_rejected") or []:
            rejected.append({"id": row["id"], "text": row["query"], "reason": f"answer {reason.split(':')[0]}",
                             "detail": reason})
    n_answers = sum(len(c) for c in candidates.values())
    funnel.append(("finished answer candidates", n_answers))  # the filters' drops: rejected_reasons "answer ..."
    funnel.append(("queries with a scored candidate", sum(1 for c in candidates.values() if c)))
    for row in answered:
        if row["id"] in candidates and not candidates[row["id"]]:
            rejected.append({"id": row["id"], "text": row["query"], "reason": "no finished answer"})
    return {q: c for q, c in candidates.items() if c}


def _candidate_list(row: dict, round_: int) -> list[dict]:
    texts = row["candidates"] or []
    sources = row.get("candidates_source") or ["rewriter"] * len(texts)
    finished = row.get("candidates_finished") or [True] * len(texts)
    return [{"text": t, "source": s, "finished": f, "reward": r, "logprob": lp, "round": round_}
            for t, s, f, r, lp in zip(texts, sources, finished, row["candidates_reward"] or [],
                                      row["candidates_logprob"] or [], strict=True)]


def _reward_guided_filter(cfg: SynthConfig, candidates: dict[str, list[dict]], models: SynthModels,
                          funnel: list) -> list[dict]:
    """Round-0 pool: the positive of each of the top `keep_fraction` queries by positive reward."""
    positives = {}
    for qid, cands in candidates.items():
        pos, _ = positive_negative([c["reward"] for c in cands], [c["logprob"] for c in cands], cfg.scoring.alpha)
        positives[qid] = cands[pos]
    kept = keep_top({q: c["reward"] for q, c in positives.items()}, cfg.scoring.keep_fraction)
    funnel.append((f"kept by reward-guided filtering (top {cfg.scoring.keep_fraction:g})", len(kept)))
    return [_pool_row(q, positives[q], 0, "reward_filter", models) for q in kept]


def _update_pool(cfg: SynthConfig, r: int, refined: dict[str, dict], candidates: dict[str, list[dict]],
                 pool: list[dict], models: SynthModels, funnel: list) -> None:
    """Keep each query's best rewrite that reaches the pool's lowest reward; rewrites join the candidates."""
    pool_min = min((p["reward"] for p in pool), default=float("-inf"))
    kept = 0
    rewrites = 0
    for qid in sorted(refined):
        if qid not in candidates:
            continue
        new = _candidate_list(refined[qid], round_=r)
        rewrites += len(new)
        usable = [c["finished"] or not cfg.answers.require_finished for c in new]
        best = best_rewrite([c["reward"] for c in new], usable, pool_min)
        if best is not None:
            pool.append(_pool_row(qid, new[best], r, "refine", models))
            kept += 1
        candidates[qid] = candidates[qid] + new
    funnel += [(f"refine round {r}: queries refined", sum(q in candidates for q in refined)),
               (f"refine round {r}: finished rewrites", rewrites),
               (f"refine round {r}: rewrites kept (reward >= pool min {pool_min:.3f})", kept),
               (f"pool after round {r}", len(pool))]


def _pool_row(qid: str, cand: dict, round_: int, stage: str, models: SynthModels) -> dict:
    lp = cand["logprob"]
    return {"id": f"{qid}-r{round_}", "query_id": qid, "answer": cand["text"], "round": round_, "stage": stage,
            "reward": cand["reward"], "perplexity": None if lp is None else math.exp(-lp),
            "answer_model": models.ids["rewriter"] if cand["source"] == "rewriter" else models.ids[cand["source"]]}


def _finalise(cfg: SynthConfig, pool: list[dict], queries: dict[str, dict], models: SynthModels,
              funnel: list) -> list[dict]:
    """Dedup (best reward first, so the better duplicate stays), PII scrub, and the record + provenance rows."""
    ordered = sorted(pool, key=lambda p: (-p["reward"], p["id"]))
    texts = [f"{queries[p['query_id']]['query']}\n{p['answer']}" for p in ordered]
    dropped = near_duplicates(texts, cfg.dedup.method, cfg.dedup.threshold)
    funnel.append((f"after duplicate removal ({cfg.dedup.method} < {cfg.dedup.threshold})",
                   len(ordered) - len(dropped)))
    scrub = PIIScrubber(cfg.dedup.pii_patterns)
    instruction = cfg.domain.train_instruction or cfg.domain.answer_system_prompt
    rows = []
    for i, p in enumerate(ordered):
        if i in dropped:
            continue
        query, n_q = scrub(queries[p["query_id"]]["query"])
        answer, n_a = scrub(p["answer"])
        rows.append({"id": p["id"], "instruction": instruction, "input": query, "output": answer,
                     "round": p["round"], "stage": p["stage"], "reward": p["reward"], "perplexity": p["perplexity"],
                     "query_id": p["query_id"], "answer_model": p["answer_model"],
                     "generator_model": models.ids["generator"], "reward_model": models.ids["reward"],
                     "pii_redactions": n_q + n_a})
    rows.sort(key=lambda r: r["id"])
    funnel += [("PII redactions", sum(scrub.counts.values())), ("written", len(rows))]
    return rows


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_open(path, "wb") as f:
        pq.write_table(pa.Table.from_pylist(rows), f)
