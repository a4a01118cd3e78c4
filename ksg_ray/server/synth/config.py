"""SERVER SIDE — typed config of `ksg synthesize`: a bundle path and public settings, nothing else.

There is deliberately no data path in this schema: the server never reads the client's records. Seed
questions are public text written into the config (or none: seedless domain prompts). Defaults follow the
papers where they fit a CPU (RewardDS: n = 6, temperature 1.0, top_p 0.7, α = 0.5, keep 1/8; KnowledgeSG: the
professional model filters and answers, TF-IDF similarity 0.52 to the seeds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ksg_ray.common.config import StrictModel

__all__ = ["AnswersSection", "DEFAULT_PII_PATTERNS", "DedupSection", "DomainSection", "EngineSection", "FiltersSection",
           "ProfessionalSection", "QueriesSection", "RefineSection", "ScoringSection", "SynthConfig",
           "SynthRunSection"]

SimilarityMethod = Literal["tfidf", "rouge_l", "embedding"]  # = ksg_ray.common.text_metrics.SIMILARITY_METHODS

# Redacted in everything written: the DP models should not emit these, and if they do, nothing downstream
# (fine-tuning, serving) should learn them. Names of the patterns appear in the redaction marker.
DEFAULT_PII_PATTERNS = {
    "email": r"[\w.+-]+@[\w-]+\.[\w.-]+",
    "phone": r"(?<!\w)(?:\+?\d{1,3}[ .-]?)?(?:\(\d{3}\)|\d{3})[ .-]\d{3}[ .-]\d{4}(?!\w)",
    "ssn": r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)",
    "credit_card": r"(?<!\d)(?:\d{4}[ -]){3}\d{4}(?!\d)",
    "iban": r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}\b",
}


class DomainSection(StrictModel):
    name: str = Field("medical", description="short domain name, used in prompts ('a medical question')")
    description: str = Field("medicine and patient health",
                             description="what the domain covers, used in the query and judge prompts")
    seed_questions: list[str] = Field(
        [], description="PUBLIC example questions shown to the generator (never private records); empty = seedless")
    answer_system_prompt: str = Field(
        "Answer the patient's medical question clearly and specifically, as a careful doctor would.",
        description="system message of every answer request: a doctor's task, not a persona to play ('You are a "
                    "helpful, careful medical doctor' had SmolLM2-135M write 'As a medical doctor': 52 of 74 queries "
                    "kept an answer, 61 with this one); also the rows' instruction unless `train_instruction` is set")
    language: str = Field("en", description="the domain's language (ISO 639-1), kept by the language filter")
    topics: list[str] = Field(
        [], description="PUBLIC in-domain anchors for the domain filter, beside the seed questions: short texts of "
                        "what the domain's users write about")
    off_topics: list[str] = Field(
        [], description="PUBLIC off-domain anchors for the domain filter: what the domain is not (other domains' "
                        "kinds of question); empty = no domain filter")
    train_instruction: str | None = Field(
        None, description="the system message of the written rows, which the target is trained with: set it to the "
                          "domain's public task preamble, the one held-out questions and users come with; "
                          "None = answer_system_prompt")


class QueriesSection(StrictModel):
    mode: Literal["seed_prompt", "sample"] = Field(
        "seed_prompt", description="seed_prompt (RewardDS): ask the generator for a new question like two public "
                                   "seeds; sample (KnowledgeSG): let a generator trained with a question loss write "
                                   "the user turn itself, after `system_prompt`")
    system_prompt: str = Field(
        "If you are a doctor, please answer the medical questions based on the patient's description.",
        description="sample mode: the PUBLIC system message the generator's training records carry (the task "
                    "preamble of the domain's data)")
    user_prefixes: list[str] = Field(
        [], description="sample mode: PUBLIC openings of the user's message (prompt i starts with prefix i mod "
                        "len); the generator continues them. A small or weakly trained generator drifts off the "
                        "domain from an empty user turn; an opening such as 'Hi doctor, my son has' keeps it there")
    num_prompts: int = Field(8, gt=0, description="prompts to the DP generator (each yields `per_prompt` samples)")
    per_prompt: int = Field(6, gt=0, description="samples per prompt (RewardDS: 6)")
    seeds_per_prompt: int = Field(2, ge=0, description="public seed questions shown per prompt (RewardDS: 2)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.7, gt=0, le=1)
    max_new_tokens: int = Field(96, gt=0)
    max_sentences: int | None = Field(
        None, ge=1, description="keep the first N sentences of a sampled message (None = all): a small generator "
                                "drifts off the subject after one or two (on the medical dev split, 2 sentences "
                                "raised the nearest-real share of the demo's synthetic questions from 0.70 to 0.85)")
    min_words: int = Field(3, ge=1, description="shorter queries are rejected (reason 'too short')")
    require_finished: bool = Field(
        True, description="without require_question: a sample cut at max_new_tokens is rejected (a fragment)")
    require_question: bool = Field(
        False, description="True: keep only the sentence ending at the first '?' (none = rejected); False: the "
                           "first paragraph is the query, since patients often describe rather than ask")
    similarity_method: SimilarityMethod = Field("tfidf", description="similarity to the seeds (baseline filters)")
    max_seed_similarity: float = Field(
        0.52, gt=0, le=1, description="a query this similar to a seed is a copy, rejected (KnowledgeSG: TF-IDF 0.52)")
    seed: int = Field(0, description="picks each prompt's seed questions (sampling is seeded by the top-level "
                                     "`seed`; reruns regenerate nothing: finished work is kept)")
    share_from: Path | None = Field(
        None, description="another synthesis output dir whose raw samples are copied in instead of drawn again, "
                          "when it was made from the same bundle with the same seeds, domain and sampling settings "
                          "(sampling is seeded per prompt, so they are the samples this run would draw). The "
                          "pipeline's synthesis baselines share the pipeline's: they then differ only in what their "
                          "methods do with the same questions")


class EndpointSection(StrictModel):
    """The professional model on an OpenAI-compatible server (`ksg_ray.engines.openai_engine`)."""

    base_url: str = Field(..., description="the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(..., description="the served model's id")
    api_key_env: str | None = Field(None, description="the environment variable holding the token (never the "
                                                      "token itself); null = no token")
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once per actor")
    max_retries: int = Field(3, ge=0, description="retries with back-off per request (connection errors, 429, 5xx)")
    timeout_s: float = Field(120.0, gt=0, description="per request")

    def engine_kwargs(self) -> dict:
        return self.model_dump(exclude={"model"})


class ProfessionalSection(StrictModel):
    model: str = Field("smollm2-135m", description="the strong public domain model: judge, distillation answers")
    endpoint: EndpointSection | None = Field(
        None, description="ask the professional model on an OpenAI-compatible server instead of loading `model`: "
                          "judge, answers and (rewriter: professional) rewrites; scoring stays local")
    filter: bool = Field(True, description="KnowledgeSG's professional filter: drop invalid or off-domain queries")
    min_yes_probability: float = Field(
        0.5, gt=0, lt=1, description="keep a query when P(yes) / (P(yes) + P(no)) reaches this")


class FiltersSection(StrictModel):
    """The cheap filters of every query and answer (`ksg_ray.server.synth.filters`), each a funnel step."""

    language: bool = Field(True, description="drop text py3langid places in another language than domain.language")
    min_language_confidence: float = Field(0.5, gt=0, le=1, description="how sure the detector must be to drop")
    degenerate: bool = Field(True, description="drop loops (a repeated word n-gram), mostly non-alphabetic text, "
                                               "too few or too many words")
    repeat_ngram: int = Field(6, ge=0, description="a word n-gram of this length seen twice is a loop (0 = off)")
    max_non_alpha: float = Field(0.25, gt=0, le=1, description="largest share of non-alphabetic characters")
    max_query_words: int = Field(250, gt=0, description="longer queries are dropped")
    min_answer_words: int = Field(6, ge=1, description="shorter answers are dropped ('That's a great question.'; "
                                                       "of the 5,187 real medical and financial answers only 'nan' "
                                                       "x4 and 'Money Manager Ex PROS: CONS' are)")
    asks_back: bool = Field(True, description="drop answers that mostly ask the asker questions (AsksBackFilter)")
    asks_back_min_questions: int = Field(2, ge=1, description="questions an answer must ask to be dropped ...")
    asks_back_min_share: float = Field(0.3, ge=0, le=1, description="... and their least share of its sentences")
    off_question: bool = Field(True, description="drop answers about something other than their question "
                                                 "(OffQuestionFilter, MiniLM)")
    min_question_cosine: float = Field(0.3, ge=-1, le=1, description="least cosine(question, answer); every medical "
                                                                     "and financial dev pair has >= 0.31")
    domain: bool = Field(True, description="drop queries closer to domain.off_topics than to the domain's anchors "
                                           "(MiniLM); needs domain.off_topics")
    min_domain_margin: float = Field(
        0.0, description="max cosine to an in-domain anchor minus max cosine to an off-domain anchor must reach "
                         "this (calibrated on public data: README 'Filters')")


class AnswersSection(StrictModel):
    sources: list[Literal["professional", "generator"]] = Field(
        ["professional"], min_length=1,
        description="who writes candidates: professional = KnowledgeSG distillation, generator = RewardDS")
    n: int = Field(6, gt=0, description="candidates per query and source (RewardDS: 6)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.7, gt=0, le=1)
    max_new_tokens: int = Field(192, gt=0)
    require_finished: bool = Field(True, description="only answers that ended with end-of-turn are candidates")


class ScoringSection(StrictModel):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the reward rank vs the perplexity rank")
    keep_fraction: float = Field(0.125, gt=0, le=1, description="queries kept by their positive's reward (1/8)")


class RefineSection(StrictModel):
    rounds: int = Field(1, ge=0, description="Self-Optimizing Refinement rounds (RewardDS: 2)")
    n: int = Field(6, gt=0, description="rewrites per query and round")
    max_queries: int | None = Field(
        None, gt=0, description="refine a fixed sample of at most this many queries per round (a small run's "
                                "size); None = every query with candidates (RewardDS)")
    rewriter: str = Field(
        "professional", description="professional | generator | a model folder (the current fine-tuned target)")
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(0.7, gt=0, le=1)
    critique_max_new_tokens: int = Field(64, gt=0)
    max_new_tokens: int = Field(192, gt=0)


class DedupSection(StrictModel):
    method: SimilarityMethod = Field("tfidf", description="near-duplicate measure of the output")
    threshold: float = Field(0.9, gt=0, le=1, description="a pair at least this similar is a near-duplicate")
    pii_patterns: dict[str, str] = Field(DEFAULT_PII_PATTERNS, description="name -> regex, redacted in the output")

    @field_validator("pii_patterns")
    @classmethod
    def _compiles(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for name, pattern in v.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"pii pattern {name!r} is not a valid regex: {e}") from e
        return v


class EngineSection(StrictModel):
    kind: Literal["transformers", "vllm", "auto"] = Field("transformers", description="engine of every stage")
    batch_size: int = Field(8, gt=0, description="rows per map_batches call (and per engine call)")
    min_actors: int = Field(1, gt=0, description="actors kept per stage pool (each holds a model)")
    max_actors: int = Field(1, gt=0, description="actors a stage pool autoscales up to")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per actor (0.5 lets the 3 streaming stages share 2 cores)")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (1 for vLLM on a GPU node)")
    resources: dict[str, float] = Field({}, description=(
        "custom Ray resources each model-holding actor asks for: a cluster pins the engines to the nodes that offer "
        "them (e.g. {engine_slot: 1} on each node = at most one engine per node)"))
    spread: bool = Field(False, description="place a pool's actors on different nodes (Ray's SPREAD), not packed")
    fuse_steps: bool = Field(False, description=(
        "run each phase's steps (judge, answers, scoring) in one actor, a batch through all of them in turn: on a "
        "small CPU machine the streaming stages' actors only compete for the same cores (README 'Benchmarks'); "
        "false = one actor pool per step, each scaled on its own (clusters)"))
    threads: int | None = Field(None, gt=0, description=(
        "CPU threads per actor (OMP_NUM_THREADS); None = Ray's floor(num_cpus), at least 1. A small run's stages "
        "take turns, so on a laptop 2 lets each use both cores while their CPU shares stay fractional"))
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="transformers engine weights: auto = bfloat16 where the hardware has it, else float32")
    engine_kwargs: dict = Field({}, description="extra engine options (vLLM: gpu_memory_utilization, ...)")

    @model_validator(mode="after")
    def _pool(self) -> EngineSection:
        if self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) must be >= min_actors ({self.min_actors})")
        return self


class SynthRunSection(StrictModel):
    output_dir: Path = Field(Path("runs/synth"), description="all outputs; a rerun resumes what is there")
    log_every: int = Field(8, gt=0, description="progress line every N finished rows")


class SynthConfig(StrictModel):
    """`ksg synthesize`: bundle → synthetic (query, answer) dataset, on Ray Data."""

    bundle: Path = Field(Path("runs/bundle"), description="the client's transfer bundle (verified before use)")
    seed: int | None = Field(
        0, description="PUBLIC server-side sampling seed: the same seed and bundle give the same funnel and rows "
                       "(each row is seeded by its id); None = unseeded. Not the client's secret DP seeds")
    min_rows: int = Field(
        1, ge=0, description="fewer rows written is an error that names the funnel step that lost them (before any "
                             "fine-tune starts); 0 = accept any count")
    domain: DomainSection = DomainSection()
    queries: QueriesSection = QueriesSection()
    professional: ProfessionalSection = ProfessionalSection()
    filters: FiltersSection = FiltersSection()
    answers: AnswersSection = AnswersSection()
    scoring: ScoringSection = ScoringSection()
    refine: RefineSection = RefineSection()
    dedup: DedupSection = DedupSection()
    engine: EngineSection = EngineSection()
    run: SynthRunSection = SynthRunSection()
