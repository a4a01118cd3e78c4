"""The transfer bundle: round trips, and every way of slipping data or code into it is caught and named."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ksg_ray import bundle as B
from ksg_ray.bundle import NOT_DP_REASONS, BundleError, add_component, read_privacy, verify_bundle, write_bundle

PRIVACY = {"epsilon": 8.0, "epsilon_rdp": 9.1, "delta": 1e-5, "not_dp": [],
           "mechanisms": [{"name": "generator", "noise_multiplier": 0.9, "sample_rate": 0.01, "steps": 6}]}
LORA = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"


def make_component(d: Path, *, head: bool = False) -> Path:
    """What peft `save_pretrained` writes (README included) plus the caller's model_ref.json."""
    d.mkdir(parents=True)
    save_file({LORA.format("A"): torch.randn(2, 8), LORA.format("B"): torch.randn(8, 2)},
              str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"]}))
    (d / "model_ref.json").write_text(json.dumps({"base_model": "tiny-random", "tokenizer": "tiny-random"}))
    (d / "README.md").write_text("model card")
    if head:
        save_file({"score.weight": torch.randn(1, 8), "score.bias": torch.zeros(1)},
                  str(d / "score_head.safetensors"))
    return d


def rehash(bundle: Path) -> None:
    """Fix the manifest after tampering, as a careful smuggler would: only the content checks remain."""
    m = json.loads((bundle / "manifest.json").read_text())
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    m["files"] = {f: {"sha256": hashlib.sha256((bundle / f).read_bytes()).hexdigest(),
                      "bytes": (bundle / f).stat().st_size} for f in files if f != "manifest.json"}
    (bundle / "manifest.json").write_text(json.dumps(m))


def problems_of(bundle: Path) -> str:
    with pytest.raises(BundleError) as e:
        verify_bundle(bundle)
    return "\n".join(e.value.problems)


@pytest.fixture
def bundle(tmp_path) -> Path:
    return write_bundle(tmp_path / "bundle", {"generator": make_component(tmp_path / "gen")}, PRIVACY)


def test_round_trip(bundle, tmp_path):
    manifest = verify_bundle(bundle)
    assert manifest["format"] == "ksg-bundle/1"
    comp = ["adapter_config.json", "adapter_model.safetensors", "model_ref.json"]
    assert manifest["components"] == {"generator": comp}
    assert set(manifest["files"]) == {"privacy.json"} | {f"generator/{f}" for f in comp}
    assert not (bundle / "generator" / "README.md").exists()  # only bundle files are copied
    src = load_file(str(tmp_path / "gen" / "adapter_model.safetensors"))
    out = load_file(str(bundle / "generator" / "adapter_model.safetensors"))
    assert src.keys() == out.keys() and all(torch.equal(src[k], out[k]) for k in src)
    adapters = {"generator": manifest["files"]["generator/adapter_model.safetensors"]["sha256"]}
    assert read_privacy(bundle) == PRIVACY | {"adapters": adapters}  # the report names the adapter it covers
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


@pytest.mark.parametrize("rel,needle", [
    ("data.jsonl", "data.jsonl: not allowed"), ("train.parquet", "train.parquet: not allowed"),
    ("generator/notes.txt", "generator/notes.txt: not allowed"), (".hidden", ".hidden: not allowed"),
    ("generator/.cache", "generator/.cache: not allowed"),
    ("generator/sub/model_ref.json", "generator/sub/: directory not allowed"),
    ("reward/adapter_config.json", "reward/adapter_model.safetensors: required file missing"),
])
def test_extra_file_is_rejected_by_name(bundle, rel, needle):
    (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
    (bundle / rel).write_text('{"name": "Jane Doe", "ssn": "078-05-1120"}\n')
    rehash(bundle)  # listed in the manifest or not, it must be refused
    assert needle in problems_of(bundle)


def test_pickle_is_rejected(bundle):
    torch.save({"w": torch.randn(2)}, bundle / "generator" / "adapter_model.bin")
    assert "generator/adapter_model.bin: not allowed" in problems_of(bundle)
    (bundle / "generator" / "adapter_model.bin").unlink()
    torch.save({"w": torch.randn(2)}, bundle / "generator" / "adapter_model.safetensors")
    rehash(bundle)
    assert "generator/adapter_model.safetensors: not a valid safetensors file" in problems_of(bundle)


def _with_header(path: Path, edit) -> None:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n:])


@pytest.mark.parametrize("tamper,needle", [
    (lambda p: _with_header(p, lambda h: h[LORA.format("A")].update(note="Jane Doe")), "header fields"),
    (lambda p: _with_header(p, lambda h: h.update(__metadata__={"format": "pt", "x": "Jane"})), "metadata"),
    (lambda p: p.write_bytes(p.read_bytes() + b"Jane Doe"), "not a valid safetensors"),
    (lambda p: save_file({"base_model.x.weight": torch.tensor(list(b"Jane Doe"))}, str(p)), "only floats"),
    (lambda p: save_file({"base_model.x.weight": torch.tensor([math.nan])}, str(p)), "NaN"),
    (lambda p: save_file({"Jane Doe lives at 12 Elm St": torch.zeros(1)}, str(p)), "not a module path"),
])
def test_smuggling_inside_safetensors_is_rejected(bundle, tamper, needle):
    path = bundle / "generator" / "adapter_model.safetensors"
    tamper(path)
    rehash(bundle)
    problems = problems_of(bundle)
    assert "generator/adapter_model.safetensors: " in problems and needle in problems


def test_edited_byte_fails_the_hash(bundle):
    path = bundle / "generator" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # still a valid safetensors file: only the hash can tell
    path.write_bytes(bytes(data))
    assert "generator/adapter_model.safetensors: sha256/size differ" in problems_of(bundle)


def test_missing_manifest_is_rejected(bundle):
    (bundle / "manifest.json").unlink()
    assert "manifest.json: missing" in problems_of(bundle)


def test_symlink_is_rejected_even_with_matching_hash(bundle, tmp_path):
    cfg = bundle / "generator" / "adapter_config.json"
    shutil.copy(cfg, tmp_path / "cfg.json")
    cfg.unlink()
    os.symlink(tmp_path / "cfg.json", cfg)
    assert "generator/adapter_config.json: symlinks are not allowed" in problems_of(bundle)


def test_crash_mid_write_leaves_no_bundle(tmp_path, monkeypatch):
    src = make_component(tmp_path / "gen")
    real, calls = shutil.copyfile, []

    def copy_then_crash(a, b, **kw):
        calls.append(b)
        if len(calls) == 2:  # the first file is already copied
            raise OSError("disk full")
        return real(a, b, **kw)

    monkeypatch.setattr(B.shutil, "copyfile", copy_then_crash)
    with pytest.raises(OSError, match="disk full"):
        write_bundle(tmp_path / "bundle", {"generator": src}, PRIVACY)
    assert not (tmp_path / "bundle").exists()
    assert not list(tmp_path.rglob("manifest.json")) and not list(tmp_path.glob(".bundle*"))

    monkeypatch.setattr(B.shutil, "copyfile", real)
    old = write_bundle(tmp_path / "bundle", {"generator": src}, PRIVACY)
    before = verify_bundle(old)["files"]
    calls.clear()
    monkeypatch.setattr(B.shutil, "copyfile", copy_then_crash)
    with pytest.raises(OSError):
        write_bundle(old, {"generator": src}, {**PRIVACY, "epsilon": 1.0}, overwrite=True)
    assert verify_bundle(old)["files"] == before  # the old bundle is untouched


def test_existing_dir_needs_overwrite_and_must_be_a_bundle(bundle, tmp_path):
    src = make_component(tmp_path / "gen2")
    with pytest.raises(BundleError, match="overwrite=True"):
        write_bundle(bundle, {"generator": src}, PRIVACY)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "records.jsonl").write_text("{}")
    with pytest.raises(BundleError, match="not a bundle"):
        write_bundle(tmp_path / "home", {"generator": src}, PRIVACY, overwrite=True)
    assert (tmp_path / "home" / "records.jsonl").exists()
    (src / "model_ref.json").unlink()
    with pytest.raises(BundleError, match="generator/model_ref.json: missing from source"):
        write_bundle(tmp_path / "b2", {"generator": src, "critic": src}, PRIVACY)


def test_add_component_adds_reward_and_keeps_generator(bundle, tmp_path):
    gen_before = verify_bundle(bundle)["files"]["generator/adapter_model.safetensors"]
    composed = {**PRIVACY, "epsilon": 9.5}
    add_component(bundle, "reward", make_component(tmp_path / "rew", head=True), privacy=composed)
    manifest = verify_bundle(bundle)
    assert set(manifest["components"]) == {"generator", "reward"}
    assert "score_head.safetensors" in manifest["components"]["reward"]
    assert manifest["files"]["generator/adapter_model.safetensors"] == gen_before
    assert read_privacy(bundle)["epsilon"] == 9.5
    add_component(bundle, "reward", make_component(tmp_path / "rew2"))  # replace; privacy kept
    assert "score_head.safetensors" not in verify_bundle(bundle)["components"]["reward"]
    assert read_privacy(bundle)["epsilon"] == 9.5


def test_add_component_refuses_a_tampered_bundle(bundle, tmp_path):
    (bundle / "data.jsonl").write_text("{}")
    with pytest.raises(BundleError, match="data.jsonl"):
        add_component(bundle, "reward", make_component(tmp_path / "rew"))
    assert "reward" not in json.loads((bundle / "manifest.json").read_text())["components"]


def test_infinite_epsilon_round_trips(tmp_path):
    out = write_bundle(tmp_path / "b", {"generator": make_component(tmp_path / "gen")},
                       {**PRIVACY, "epsilon": math.inf, "not_dp": list(NOT_DP_REASONS)})
    assert json.loads((out / "privacy.json").read_text())["epsilon"] == "inf"  # standard JSON, no Infinity
    assert read_privacy(out)["epsilon"] == math.inf
    verify_bundle(out)


def test_bad_privacy_report_is_rejected(tmp_path):
    with pytest.raises(BundleError) as e:
        write_bundle(tmp_path / "b", {"generator": make_component(tmp_path / "gen")},
                     {"epsilon": "eight", "delta": 2, "mechanisms": []})
    text = str(e.value)
    assert "missing key 'not_dp'" in text and "epsilon must be" in text and "delta must be" in text
    assert not (tmp_path / "b").exists()


def test_cli_verify(bundle, capsys):
    parser = argparse.ArgumentParser(prog="ksg")
    B.add_bundle_args(parser.add_subparsers(dest="command", required=True))
    assert B.run_bundle(parser.parse_args(["bundle", "verify", str(bundle)])) == 0
    assert capsys.readouterr().out.strip() == f"OK {bundle}: components=generator, epsilon=8, delta=1e-05"
    (bundle / "notes.txt").write_text("hi")
    assert B.run_bundle(parser.parse_args(["bundle", "verify", str(bundle)])) == 1
    assert "notes.txt: not allowed" in capsys.readouterr().err


def add_reward_trained_against_its_generator(bundle: Path, tmp_path: Path) -> None:
    """A reward component whose model_ref.json names the bundle's generator, as `ksg dp-reward` writes it."""
    from ksg_ray.bundle import component_sha256

    reward = make_component(tmp_path / "rew", head=True)
    ref = json.loads((reward / "model_ref.json").read_text())
    ref["generator_sha256"] = component_sha256(bundle, "generator")
    (reward / "model_ref.json").write_text(json.dumps(ref))
    add_component(bundle, "reward", reward)


def test_a_reward_model_trained_against_another_generator_is_refused(bundle, tmp_path):
    add_reward_trained_against_its_generator(bundle, tmp_path)
    verify_bundle(bundle)  # trained against this very generator: fine
    stale = make_component(tmp_path / "gen2")  # the generator retrained; the reward model was not
    shutil.rmtree(bundle / "generator")
    shutil.copytree(stale, bundle / "generator", ignore=shutil.ignore_patterns("README.md"))
    rehash(bundle)
    assert "trained against the generator with adapter sha256" in problems_of(bundle)


def test_publishing_a_new_generator_drops_the_stale_reward_model(bundle, tmp_path):
    add_reward_trained_against_its_generator(bundle, tmp_path)
    add_component(bundle, "generator", make_component(tmp_path / "gen2"))  # retrained
    assert set(verify_bundle(bundle)["components"]) == {"generator"}


def test_json_values_carrying_free_text_are_rejected(bundle):
    privacy = json.loads((bundle / "privacy.json").read_text())
    privacy["not_dp"] = ["Patient Jane Roe, 41, HIV positive"]
    privacy["note"] = "anything"
    (bundle / "privacy.json").write_text(json.dumps(privacy))
    ref = json.loads((bundle / "generator" / "model_ref.json").read_text())
    ref["base_model"] = "my knee hurts when I run, what should I do"
    (bundle / "generator" / "model_ref.json").write_text(json.dumps(ref))
    config = json.loads((bundle / "generator" / "adapter_config.json").read_text())
    config["revision"] = "the patient said: I have chest pain"
    (bundle / "generator" / "adapter_config.json").write_text(json.dumps(config))
    rehash(bundle)
    problems = problems_of(bundle)
    assert "not_dp must list known non-DP uses only" in problems and "key 'note' not allowed" in problems
    assert "is not a public model name" in problems
    assert "value of 'revision' is not an identifier" in problems


def test_a_tensor_that_does_not_match_the_adapter_config_is_rejected(bundle):
    path = bundle / "generator" / "adapter_model.safetensors"
    tensors = load_file(str(path))
    tensors[LORA.format("A").replace("q_proj", "o_proj")] = torch.randn(2, 8)  # not a target module
    tensors[LORA.format("B")] = torch.randn(8, 3)  # rank 3, the config says 2
    tensors["base_model.model.secret_bits.weight"] = torch.randn(4)  # neither LoRA nor a module to save
    save_file(tensors, str(path), metadata={"format": "pt"})
    rehash(bundle)
    problems = problems_of(bundle)
    assert "adapts 'o_proj', not a target module" in problems
    assert "not that of a rank-2 LoRA matrix" in problems
    assert "neither a LoRA matrix nor a module to save" in problems


def test_a_privacy_report_copied_from_another_bundle_is_rejected(bundle, tmp_path):
    other = write_bundle(tmp_path / "other", {"generator": make_component(tmp_path / "gen-other")}, PRIVACY)
    shutil.copyfile(other / "privacy.json", bundle / "privacy.json")
    rehash(bundle)
    assert "accounts for other adapters than this bundle's" in problems_of(bundle)
