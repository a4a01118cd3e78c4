"""Every YAML in configs/ validates against its job's typed config, and its header names a real entrypoint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ksg_ray.audit.config import EvalConfig
from ksg_ray.client.config import DPFinetuneConfig, DPRewardConfig
from ksg_ray.common.config import KsgConfigError, apply_overrides, load_config, parse_override
from ksg_ray.pipeline.config import PipelineConfig
from ksg_ray.server.finetune.config import FinetuneConfig
from ksg_ray.server.synth.config import SynthConfig

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = {"dp_finetune": DPFinetuneConfig, "dp_reward": DPRewardConfig, "synthesize": SynthConfig,
           "pipeline": PipelineConfig, "finetune": FinetuneConfig, "evaluate": EvalConfig, "study": PipelineConfig}
STAGE_SCHEMAS = {"dp_train": DPFinetuneConfig, "dp_reward": DPRewardConfig, "synthesize": SynthConfig,
                 "finetune": FinetuneConfig, "evaluate": EvalConfig}


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_config_validates_and_names_its_entrypoint(path):
    schema = next(s for prefix, s in SCHEMAS.items() if path.name.startswith(prefix))
    load_config(schema, path)
    entry = re.search(r"python (jobs/\w+\.py) --config (configs/\S+\.yaml)", path.read_text())
    assert entry, f"{path.name}: header lacks its `ray job submit ... -- python jobs/X.py --config ...` line"
    assert (ROOT / entry.group(1)).is_file() and (ROOT / entry.group(2)) == path


@pytest.mark.parametrize("path", sorted([*(ROOT / "configs").glob("pipeline*.yaml"),
                                         *(ROOT / "configs").glob("study*.yaml")]), ids=lambda p: p.name)
def test_every_stage_of_a_pipeline_config_validates_with_its_overrides(path):
    """A typo in a stage's overrides fails here, not an hour into a study."""
    cfg = load_config(PipelineConfig, path)
    for stage, schema in STAGE_SCHEMAS.items():
        section = getattr(cfg, stage)
        load_config(schema, ROOT / section.config if section.config else None, list(section.overrides))
    from ksg_ray.pipeline.config import SYNTH_VARIANTS

    for variant in SYNTH_VARIANTS.values():  # the baselines' synthesis overrides on top of the pipeline's
        load_config(SynthConfig, ROOT / cfg.synthesize.config, [*cfg.synthesize.overrides, *variant])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("study*.yaml")), ids=lambda p: p.name)
def test_a_study_evaluates_every_held_out_record(path):
    """Its intervals are over the held-out slice it states, not over evaluate.yaml's default 16 records."""
    cfg = load_config(PipelineConfig, path)
    limit = load_config(EvalConfig, ROOT / cfg.evaluate.config, list(cfg.evaluate.overrides)).data.limit
    assert limit is None or limit >= cfg.held_out, f"{path.name}: evaluates {limit} of {cfg.held_out} held out"


def test_overrides_parse_yaml_values_and_reject_bad_forms():
    assert parse_override("train.epochs=2") == (["train", "epochs"], 2)
    assert parse_override("privacy.target_epsilon=inf")[1] == float("inf")
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[x, y]"]) == {"a": {"b": 1, "c": ["x", "y"]}}
    with pytest.raises(KsgConfigError, match="key=value"):
        parse_override("train.epochs")


def test_all_problems_are_reported_at_once():
    with pytest.raises(KsgConfigError) as err:
        load_config(DPFinetuneConfig, None, ["train.epochs=-1", "lora.r=0", "bogus=1"])
    assert len(err.value.problems) == 3


def test_train_probe_records_reach_both_trainers():
    """`train.probe_records` sizes the before/after probe of the DP trainers and the fine-tune (the embedded default
    probes 4 records: each probe is a forward pass that trains nothing)."""
    from ksg_ray.client.dp_trainer import plan_dp_run
    from ksg_ray.server.finetune.trainer import plan_finetune

    dp = load_config(DPFinetuneConfig, ROOT / "configs/dp_finetune.yaml", ["train.probe_records=3"])
    assert plan_dp_run(400, dp.privacy, dp.train, dp.scaling).probe_records == 3
    ft = load_config(FinetuneConfig, ROOT / "configs/finetune.yaml", ["train.probe_records=5"])
    assert plan_finetune(ft.train, ft.scaling, ft.dev, 100).probe_records == 5
    assert load_config(FinetuneConfig, ROOT / "configs/finetune.yaml").train.probe_records == 16
    with pytest.raises(KsgConfigError, match="probe_records"):
        load_config(DPFinetuneConfig, ROOT / "configs/dp_finetune.yaml", ["train.probe_records=0"])
