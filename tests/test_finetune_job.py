"""`ksg finetune` on a tiny model: answer-only loss, best-epoch export, resume after a killed worker, a second
round continuing the first, both export formats through the engine layer, DeepSpeed on CPU, bad input."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import my_processes, save_varied_model, skip_without_extra
from safetensors.torch import load_file

from ksg_ray.common.chat_format import IGNORE_INDEX, build_messages, collate, tokenize_records
from ksg_ray.common.config import KsgConfigError
from ksg_ray.common.lora import lm_loss
from ksg_ray.common.records import DataError, load_records
from ksg_ray.common.sections import LoraSection
from ksg_ray.engines import SamplingParams, build_engine
from ksg_ray.jobs import finetune
from ksg_ray.server.finetune.data import NO_DEV
from ksg_ray.server.finetune.export import engine_paths, read_model_dir
from ksg_ray.server.finetune.trainer import (
    best_epoch,
    build_finetune_model,
    check_run_identity,
    dev_rouge_l,
    greedy_answers,
    micro_batches,
)

SMALL = ["model.name=tiny-random", "data.max_seq_len=64", "dev.limit=4", "dev.max_new_tokens=8", "train.lr=5e-3",
         "train.expected_batch_size=8", "train.physical_batch_size=4", "lora.dropout=0"]


def write_synthetic(path: Path) -> Path:
    """A synthetic data set as `ksg synthesize` writes it: the demo records as the round-0 pool, plus 16 rows of
    refinement round 1 (same queries, rewritten answers), with provenance columns."""
    rows = [{"id": f"q{i}", "round": 0, "stage": "reward_filter", "reward": 0.5, "perplexity": 3.0,
             "instruction": r.instruction, "input": r.input, "output": r.output}
            for i, r in enumerate(load_records("demo:medical"))]
    rows += [dict(row, id=row["id"] + "-r1", round=1, stage="refine", output=row["output"] + " See a doctor soon.")
             for row in rows[:16]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synth") / "synthetic.jsonl")


def _has_a_registered_checkpoint(run_dir: Path) -> bool:
    """Ray has registered a checkpoint (every rank reported it): files on disk alone may be half a report."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(snapshot.get("latest_checkpoint_result"))


def _kill_a_worker_after_a_checkpoint(run_dir: Path, killed: list) -> None:
    deadline = time.time() + 300
    while time.time() < deadline:
        if _has_a_registered_checkpoint(run_dir):
            workers = my_processes("RayTrainWorker")
            if workers:
                os.kill(workers[-1].pid, signal.SIGKILL)
                killed.append(workers[-1].pid)
                return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def round0(ray_cluster, synthetic, tmp_path_factory):
    """Round 0 on 2 DDP workers, 2 epochs of 6 steps; a worker is killed after the first checkpoint (step 2)."""
    out = tmp_path_factory.mktemp("ft")
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_a_worker_after_a_checkpoint, args=(out / "round0", killed))
    watcher.start()
    summary = finetune.main(SMALL + [f"data.path={synthetic}", "data.max_round=0", "train.epochs=2",
                                     "train.checkpoint_every=2", "scaling.num_workers=2", f"run.output_dir={out}",
                                     "run.name=round0", "run.max_failures=1", "export=adapter"])
    watcher.join()
    return out, summary, killed


@pytest.fixture(scope="module")
def round1(round0, synthetic):
    """Round 1 (pool grown by the refinement rows) continues from round 0's model, merged, in Ray Train's local
    mode (the loop in this process, as the embedded default runs it)."""
    out, first, _ = round0
    return finetune.main(SMALL + [f"data.path={synthetic}", "data.max_round=1", "train.epochs=1", "train.max_steps=3",
                                  f"init.from={out / 'round0' / 'model'}", "scaling.num_workers=0",
                                  f"run.output_dir={out}", "run.name=round1", "export=merged"])


def test_only_answer_tokens_carry_loss(tiny_model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    record = load_records("demo:medical", limit=1)[0]
    (ex,), _ = tokenize_records(tok, [record], max_seq_len=512)
    n_prompt = sum(label == IGNORE_INDEX for label in ex.labels)
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:] and record.output in tok.decode(ex.input_ids[n_prompt:])
    model = build_finetune_model(torch.device("cpu"), model_path=tiny_model_path, mode="lora", lora=LoraSection())
    hidden = []  # the last hidden states, which the LM head reads (it sees only the labelled positions)

    def keep_hidden(module, inputs, out):
        out.retain_grad()
        hidden.append(out)

    model.get_base_model().get_decoder().norm.register_forward_hook(keep_hidden)
    lm_loss(model, collate([ex], tok.pad_token_id)).sum().backward()
    grad = hidden[0].grad[0].abs().sum(-1)  # position t predicts token t + 1
    assert torch.all(grad[: n_prompt - 1] == 0), "a prompt token carried loss"
    assert torch.all(grad[n_prompt - 1: len(ex.input_ids) - 1] > 0), "an answer token carried no loss"


def test_micro_batches_cover_each_record_once_in_lockstep():
    batch = list(range(11))
    shares = [micro_batches(batch, r, 3, micro=2, accum=2) for r in range(3)]
    assert all(len(s) == 2 for s in shares)  # every rank makes the same number of passes
    assert sorted(i for s in shares for chunk in s for i in chunk) == batch
    assert micro_batches([0], 1, 2, micro=2, accum=1) == [[]]  # a rank with nothing makes a zero-weight pass


def test_best_epoch_is_the_highest_dev_score_ties_to_the_later():
    epochs = [{"epoch": 1, "dev_rouge_l": 0.1}, {"epoch": 2, "dev_rouge_l": 0.3}, {"epoch": 3, "dev_rouge_l": 0.2}]
    assert best_epoch(epochs)["epoch"] == 2
    assert best_epoch(epochs + [{"epoch": 4, "dev_rouge_l": 0.3}])["epoch"] == 4


@pytest.mark.e2e
def test_round0_resumes_after_a_kill_and_loss_goes_down(round0):
    out, s, killed = round0
    assert killed, "the test must have killed a worker"
    assert s["attempt_start_steps"][0] == 0 and s["attempt_start_steps"][1] >= 2  # resumed from a checkpoint
    assert s["steps"] == 12 and len(s["losses"]) == 12  # ceil(44 rows / 8) × 2 epochs: no step redone nor lost
    assert s["epoch_probe_loss"][-1] < s["epoch_probe_loss"][0] < s["probe_loss_start"]  # answer-token loss
    assert s["epoch_train_loss"][-1] < s["epoch_train_loss"][0]
    assert len(s["rounds"]) == 1 and s["rows"] == 44 and s["dev"]["records"] == 4  # 4 queries held out for dev


@pytest.mark.e2e
def test_best_epoch_is_exported_as_a_portable_adapter(round0):
    out, s, _ = round0
    scores = s["dev_rouge_l"]
    assert s["best_epoch"] == max(i for i in range(1, 3) if scores[i - 1] == max(scores))
    assert Path(s["checkpoint"]).name.startswith(f"checkpoint_epoch{s['best_epoch']:03d}_")
    ref = read_model_dir(out / "round0" / "model")
    assert ref.format == "adapter" and ref.base_model == "tiny-random"
    config = json.loads((ref.path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-random"  # the public name, not this machine's cache path
    exported = load_file(str(ref.path / "adapter_model.safetensors"))
    best = load_file(str(Path(s["checkpoint"]) / "model" / "adapter_model.safetensors"))
    assert exported.keys() == best.keys() and all(torch.equal(exported[k], best[k]) for k in best)
    summary = json.loads((ref.path / "finetune_summary.json").read_text())
    assert summary["best_epoch"] == s["best_epoch"] and summary["wall_time_s"] > 0


@pytest.mark.e2e
def test_exported_adapter_loads_in_the_engine_and_scores_answers_better(round0, synthetic, tiny_model_path):
    out, _, _ = round0
    records = load_records(synthetic, limit=8)
    prompts = [build_messages(r)[:-1] for r in records]
    answers = [r.output for r in records]
    tuned = build_engine("transformers", *engine_paths(out / "round0" / "model"))
    base = build_engine("transformers", tiny_model_path)
    gens = tuned.generate(prompts[:2], SamplingParams(max_new_tokens=8))
    assert all(g[0].num_tokens > 0 for g in gens)
    tuned_lp, base_lp = tuned.score(prompts, answers), base.score(prompts, answers)
    assert sum(tuned_lp) / 8 > sum(base_lp) / 8  # answer tokens of training rows are likelier after training


@pytest.mark.e2e
def test_round1_continues_from_round0_and_exports_merged(round0, round1, tiny_model_path):
    out, first, _ = round0
    s = round1
    assert [r["run"] for r in s["rounds"]] == ["round0", "round1"]
    assert s["rows_per_round"] == {"0": 44, "1": 16}
    # The fixed probe (the first training rows, the same in both rounds): round 1 starts exactly where round 0's
    # best epoch ended, well below a fresh start.
    assert s["probe_loss_start"] == pytest.approx(first["epoch_probe_loss"][first["best_epoch"] - 1], abs=1e-4)
    assert s["probe_loss_start"] < first["probe_loss_start"] - 0.01
    model_path, adapter = engine_paths(out / "round1" / "model")
    assert adapter is None and (Path(model_path) / "config.json").is_file()
    engine = build_engine("transformers", model_path)
    assert engine.generate([[{"role": "user", "content": "I have a cough."}]], SamplingParams(max_new_tokens=8))
    base = load_file(str(Path(tiny_model_path) / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(engine.model.state_dict()[key], base[key])  # the adapter is merged in


@pytest.mark.e2e
@pytest.mark.deepspeed
def test_deepspeed_zero3_full_finetune_on_cpu(ray_cluster, synthetic, tmp_path):
    skip_without_extra("deepspeed")
    s = finetune.main(SMALL + [f"data.path={synthetic}", "data.max_round=0", "train.epochs=1", "train.max_steps=2",
                               "dev.limit=2", "scaling.num_workers=2", "scaling.strategy=deepspeed",
                               "scaling.zero_stage=3", "mode=full", "export=merged", f"run.output_dir={tmp_path}"])
    assert s["steps"] == 2 and s["epoch_probe_loss"][0] < s["probe_loss_start"]
    model_path, adapter = engine_paths(tmp_path / "round0" / "model")
    assert adapter is None
    assert build_engine("transformers", model_path).generate([[{"role": "user", "content": "Hi"}]],
                                                             SamplingParams(max_new_tokens=4))


@pytest.mark.e2e
def test_one_query_trains_without_dev_and_exports_the_last_epoch(ray_cluster, tmp_path):
    """A strict reward filter on a tiny funnel can keep a single query: nothing can be held out, so the run
    trains on it with no dev set, exports the last epoch, and its summary says so."""
    rows = [{"round": 0, "instruction": "Answer the patient.", "input": "Is a fever of 38 C dangerous?",
             "output": f"Usually not; rest and drink water. Note {i}."} for i in range(4)]
    path = tmp_path / "synthetic.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = finetune.main(SMALL + [f"data.path={path}", "train.epochs=2", "train.expected_batch_size=4",
                               "scaling.num_workers=0", f"run.output_dir={tmp_path}", "export=adapter"])
    assert s["dev"] == {"source": NO_DEV, "records": 0} and s["rows"] == 4
    assert s["dev_rouge_l"] == [None, None] and s["best_epoch"] == 2 and s["best_dev_rouge_l"] is None
    assert s["checkpoint"].endswith("checkpoint_epoch002_step0000002")
    assert "n/a" in finetune.format_summary(s)
    assert best_epoch([{"epoch": 1, "dev_rouge_l": None}, {"epoch": 2, "dev_rouge_l": None}])["epoch"] == 2
    model_path, adapter = engine_paths(tmp_path / "round0" / "model")
    assert adapter is not None and build_engine("transformers", model_path, adapter).generate(
        [[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=2))


def test_rounds_select_the_pool_and_held_out_queries_leave_every_round(synthetic):
    from ksg_ray.server.finetune.data import load_finetune_data

    assert load_finetune_data(str(synthetic), max_round=0, dev_path=None, dev_limit=4).rounds_per_row == {0: 44}
    assert len(load_finetune_data(str(synthetic), max_round=0, dev_path=None, dev_limit=40).dev) == 9  # 20% of 48
    data = load_finetune_data(str(synthetic), max_round=1, dev_path=None, dev_limit=40, holdout_fraction=0.9)
    held = {r.input for r in data.dev}
    assert len(held) == 40 and not held & {r.input for r in data.train}
    assert data.rounds_per_row[1] < 16  # rewrites of held-out queries are not trained on either
    assert all(r.output == rec.output for r in data.dev for rec in load_records(synthetic, limit=48)
               if rec.input == r.input)  # the reference answer is the round-0 one


def test_dev_limit_0_trains_on_every_row_and_holds_nothing_out(synthetic, tmp_path):
    from ksg_ray.server.finetune.data import DEV_OFF, load_finetune_data

    dev_file = tmp_path / "dev.jsonl"
    dev_file.write_text(json.dumps({"instruction": "Answer.", "input": "Q?", "output": "A."}) + "\n")
    for dev_path in (None, str(dev_file)):
        data = load_finetune_data(str(synthetic), max_round=1, dev_path=dev_path, dev_limit=0)
        assert data.dev == [] and data.dev_source == DEV_OFF
        assert len(data.train) == len(load_records(synthetic))
    with pytest.raises(KsgConfigError, match="dev.limit"):
        finetune.main(SMALL + [f"data.path={synthetic}", "dev.limit=-1", f"run.output_dir={tmp_path}"])


def test_bad_row_is_named_by_file_and_line(tmp_path):
    bad = write_synthetic(tmp_path / "synthetic.jsonl")
    lines = bad.read_text().splitlines()
    lines[2] = json.dumps(json.loads(lines[2]) | {"output": ""})
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"synthetic\.jsonl:3: field 'output' is empty"):
        finetune.main(SMALL + [f"data.path={bad}", f"run.output_dir={tmp_path}"])
    lines[2] = json.dumps(json.loads(lines[2]) | {"output": "fine", "round": "one"})
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"synthetic\.jsonl:3: field 'round' must be a non-negative integer"):
        finetune.main(SMALL + [f"data.path={bad}", f"run.output_dir={tmp_path}"])
    assert not (tmp_path / "round0").exists()


def test_bad_config_and_init_are_refused(tmp_path, synthetic):
    with pytest.raises(KsgConfigError, match="export=adapter needs mode=lora"):
        finetune.main(["mode=full", "export=adapter"])
    with pytest.raises(KsgConfigError, match="train.epochs must be a whole number"):
        finetune.main(["train.epochs=1.5"])
    with pytest.raises(ValueError, match="not a fine-tuned model folder"):
        finetune.main(SMALL + [f"data.path={synthetic}", f"init.from={tmp_path}"])


def test_a_run_refuses_to_resume_under_other_settings(tmp_path):
    check_run_identity(tmp_path, {"train": {"lr": 1e-3}, "data_fingerprint": "a"})
    check_run_identity(tmp_path, {"train": {"lr": 1e-3}, "data_fingerprint": "a"})  # same: resumes
    with pytest.raises(ValueError, match="data_fingerprint"):
        check_run_identity(tmp_path, {"train": {"lr": 1e-3}, "data_fingerprint": "b"})


@pytest.mark.e2e
def test_a_model_fine_tuned_on_the_demo_data_ends_its_greedy_answers(ray_cluster, smollm2_path, tmp_path):
    """Answers and models that finish: SmolLM2 fine-tuned (LoRA, one epoch) on the 40 demo training records ends
    its greedy answers to the 8 held-out demo questions with end-of-turn inside 128 tokens (the demo answers are
    53-89 tokens) in >= 50% of answers, and at least as often as the base model. (Examples keep their end of
    turn, so the model learns to stop.) Measured: tuned 7 of 8, base 2 of 8 (2 of 8 at 256 tokens too). A second
    epoch changed nothing: dev ROUGE-L chose the first epoch's model."""
    records = load_records("demo:medical")
    train, held_out = records[:-8], records[-8:]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "round": 0, "instruction": r.instruction, "input": r.input,
                                        "output": r.output}) + "\n" for i, r in enumerate(train)))
    finetune.main(["model.name=smollm2-135m", f"data.path={path}", "data.max_seq_len=160", "dev.limit=4",
                   "dev.max_new_tokens=8", "train.epochs=1", "train.lr=1e-3", "train.expected_batch_size=8",
                   "train.physical_batch_size=8", "scaling.num_workers=0",
                   f"run.output_dir={tmp_path / 'ft'}", "run.name=demo", "export=adapter"])
    prompts = [build_messages(r)[:-1] for r in held_out]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=128)
    tuned = build_engine("transformers", *engine_paths(tmp_path / "ft" / "demo" / "model"), batch_size=8)
    base = build_engine("transformers", smollm2_path, batch_size=8)
    finished = {name: sum(g[0].finished for g in engine.generate(prompts, greedy))
                for name, engine in (("tuned", tuned), ("base", base))}
    assert finished["tuned"] >= 4 and finished["tuned"] >= finished["base"], finished


def test_dev_answers_come_back_in_prompt_order_though_generated_longest_first(tiny_model_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    save_varied_model(tiny_model_path, tmp_path)  # greedy answers that differ from prompt to prompt
    model, tok = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    prompts = [[{"role": "user", "content": c}] for c in ("hi", "Tell me about fevers. " * 10, "2+2?")]
    alone = [greedy_answers(model, tok, [p], 6)[0] for p in prompts]
    assert len(set(alone)) == 3
    score, answers = dev_rouge_l(model, tok, prompts, alone, batch_size=2, max_new_tokens=6)
    assert answers == alone and score == pytest.approx(1.0)
