"""CLIENT SIDE — DP reward proxy (RewardDS): LoRA + scalar head, Bradley–Terry on per-record preference pairs.

    ksg dp-reward configs/dp_reward.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/dp_reward.py --config configs/dp_reward.yaml

Reads private records. Runs after `ksg dp-train` on the same records: both models spend one privacy budget,
kept in the client's ledger (`privacy.ledger_dir`); a run that would push the composed ε over
`privacy.total_epsilon_budget` is refused before anything is generated or trained. The reward adapter and head
join the generator in the transfer bundle.
"""

from __future__ import annotations

import json
import logging
import sys
from functools import partial
from pathlib import Path

from ksg_ray.client.config import DPRewardConfig
from ksg_ray.client.dp_trainer import DPTask
from ksg_ray.client.privacy.engine import PrivacyEngine
from ksg_ray.client.reward_candidates import GeneratorRef, build_reward_examples
from ksg_ray.common.config import job_config

logger = logging.getLogger("ksg.dp_reward")
CONFIG = DPRewardConfig  # the config this recipe takes (`ksg config show`)


def main(argv: list[str] | None = None) -> dict:
    cfg = job_config(CONFIG, argv, __doc__.split("\n")[0])

    from transformers import AutoTokenizer

    from ksg_ray.bundle import read_privacy, verify_bundle
    from ksg_ray.common.hub import resolve_model
    from ksg_ray.common.lora import load_adapter, save_adapter
    from ksg_ray.common.records import load_records
    from ksg_ray.common.reward_model import bradley_terry_loss, collate_reward, reward_builder, reward_pad_id
    from ksg_ray.common.reward_model import reward_example_tokens as example_tokens

    model_path = resolve_model(cfg.model.name)
    records = load_records(cfg.data.path, limit=cfg.data.limit)
    engine = PrivacyEngine(cfg.privacy, records)
    spec = engine.make_private("reward", len(records), cfg.train, cfg.scaling, cfg.run)  # budget check first
    verify_bundle(cfg.candidates.generator_bundle)  # the DP generator must exist before its answers are asked for
    engine.require_recorded(read_privacy(cfg.candidates.generator_bundle), "the generator bundle's privacy.json")
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    generator = GeneratorRef.from_bundle(cfg.candidates.generator_bundle)
    examples, _, failed = build_reward_examples(cfg, records, tokenizer, generator, run_dir, engine)

    task = DPTask(name="reward", build_model=reward_builder(model_path, cfg.lora, cfg.train.seed), examples=examples,
                  collate=partial(collate_reward, pad_token_id=reward_pad_id(tokenizer)), loss_fn=bradley_terry_loss,
                  save=save_adapter, load=load_adapter,  # peft saves LoRA + the `score` head together
                  length=example_tokens)
    ckpt, metrics = engine.fit(task, cfg.scaling, cfg.run)
    bundle, report = engine.publish(cfg.candidates.generator_bundle, "reward", ckpt / "model",
                                    staging=run_dir / "reward_component",
                                    model_ref={"base_model": cfg.model.name, "tokenizer": cfg.model.name,
                                               "kind": "reward-lora-seq-cls",  # the generator it was trained on:
                                               "generator_sha256": generator.sha256})
    summary = {"bundle": str(bundle), "epsilon": report["epsilon"], "epsilon_rdp": report["epsilon_rdp"],
               "reward_noise_multiplier": spec.noise_multiplier, "steps": spec.steps, "not_dp": report["not_dp"],
               "probe_loss_start": metrics.get("probe_loss_start"), "probe_loss_end": metrics.get("probe_loss_end"),
               "candidate_failures": len(failed), "checkpoint": str(ckpt)}
    if cfg.eval.path:
        summary |= evaluate(cfg, model_path, ckpt / "model")
    print(json.dumps(summary, indent=2))
    return summary


def evaluate(cfg: DPRewardConfig, model_path: str, adapter_dir: Path) -> dict:
    """Pairwise accuracy on held-out records: truth ranked above the base model's answer, before vs after."""
    import torch

    from ksg_ray.client.reward_candidates import generate_answers
    from ksg_ray.common.lora import load_adapter
    from ksg_ray.common.records import load_records
    from ksg_ray.common.reward_model import build_lora_reward, pairwise_accuracy

    held_out = load_records(cfg.eval.path, limit=cfg.eval.limit)
    base = generate_answers(held_out, engine=cfg.candidates.engine, model_path=model_path, adapter_path=None,
                            max_new_tokens=cfg.candidates.max_new_tokens, batch_size=cfg.candidates.batch_size,
                            max_actors=cfg.candidates.max_actors, ray=cfg.candidates.ray)
    keep = [i for i, a in enumerate(base) if a is not None]
    questions = [held_out[i].input for i in keep]
    truth, other = [held_out[i].output for i in keep], [base[i] for i in keep]
    model = build_lora_reward(torch.device("cpu"), model_path=model_path, lora=cfg.lora, seed=cfg.train.seed)
    before = pairwise_accuracy(model, model_path, questions, truth, other, cfg.data.max_seq_len)
    load_adapter(model, adapter_dir)
    after = pairwise_accuracy(model, model_path, questions, truth, other, cfg.data.max_seq_len)
    print(f"pairwise accuracy (truth ≻ base) on {len(keep)} held-out records: untrained {before:.3f} → "
          f"trained {after:.3f} (ε={cfg.privacy.target_epsilon})")
    return {"eval_records": len(keep), "pairwise_accuracy_before": before, "pairwise_accuracy_after": after}


if __name__ == "__main__":
    from ksg_ray.common.cpu_blas import reexec_with_mkl_intel_path

    reexec_with_mkl_intel_path()  # before any model runs: MKL at full speed on AMD CPUs
    main(sys.argv[1:])
