"""The client→server transfer bundle: the only thing that leaves the client.

Fixed layout: per component (`generator/`, `reward/`) LoRA weights in safetensors and two small JSON files;
at the top a privacy report and a manifest of sha256 hashes. `verify_bundle` rejects everything else (extra
files, pickles, symlinks, hidden or nested entries, unknown safetensors header fields or metadata, integer
tensors, NaN payloads, JSON over `MAX_JSON_BYTES`), so records cannot ride along unnoticed: what is left is
the weights, which DP bounds, and a few KiB of JSON a reviewer can read.
A bundle is built in a hidden sibling `.{name}.tmp-XXXX`, manifest last, verified there and renamed into
place: a crash never leaves a directory at `out_dir` that looks finished.
JSON has no Infinity, so a non-finite float dict value in privacy.json (ε=inf of a run without DP) is written
as the string "inf"/"-inf"/"nan" by `dump_privacy` and read back as a float by `load_privacy`/`read_privacy`.

Examples:
    >>> write_bundle(Path("runs/bundle"), {"generator": Path("runs/x/generator_component")}, report)
    >>> add_component(Path("runs/bundle"), "reward", Path("runs/x/reward_component"), privacy=composed_report)
    $ ksg bundle verify runs/bundle
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ksg_ray.common.errors import KsgError

__all__ = ["BundleError", "add_bundle_args", "add_component", "component_sha256", "dump_privacy", "load_privacy",
           "publish_component", "read_model_ref", "read_privacy", "run_bundle", "verify_bundle", "write_bundle"]

logger = logging.getLogger(__name__)

FORMAT = "ksg-bundle/1"
TOP_FILES = ("manifest.json", "privacy.json")
COMPONENTS = ("generator", "reward")
COMPONENT_FILES = ("adapter_model.safetensors", "adapter_config.json", "model_ref.json",
                   "score_head.safetensors")
REQUIRED_FILES = COMPONENT_FILES[:3]
PRIVACY_KEYS = ("epsilon", "delta", "not_dp", "mechanisms", "adapters")  # adapters: written by write_bundle
MAX_JSON_BYTES = 64 * 1024  # configs and reports are a few KiB; the cap keeps free text from carrying records
_NAME_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}|\d{1,6}")  # tensor names are module paths
_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}
# Every JSON value in a bundle is one of these shapes, so no file can carry free text (a record, a secret).
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")  # a hub id or an embedded model name
_IDENT = re.compile(r"[A-Za-z0-9_.:/-]{0,128}")  # identifiers in a peft config (class paths, versions, enums)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RUN_ID = re.compile(r"(generator|reward)(:[0-9a-f]{12})?")
COMPOSITION = "PRV accountant over the concatenated (σ, q, steps) history of all mechanisms"
# What may be named as a non-DP use of the data (set by client code, never free text).
NOT_DP_REASONS = ("reward candidates from a non-DP proxy model trained on the private records",)
MODEL_KINDS = ("causal-lm-lora", "reward-lora-seq-cls")


class BundleError(KsgError, ValueError):
    """A bundle is invalid or cannot be written; `problems` lists every problem, each naming its file."""

    def __init__(self, where: str | Path, problems: list[str]):
        self.where, self.problems = str(where), list(problems)
        super().__init__(f"invalid bundle {where}: {self.problems[0]}" if len(self.problems) == 1
                         else f"invalid bundle {where}:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _walk(x: Any, leaf) -> Any:
    """Apply `leaf` to every scalar dict value at any depth; scalar list items (`not_dp` texts) are kept."""
    if isinstance(x, dict):
        return {k: _walk(v, leaf) if isinstance(v, dict | list) else leaf(v) for k, v in x.items()}
    return [_walk(v, leaf) if isinstance(v, dict | list) else v for v in x] if isinstance(x, list) else x


def _decode(v: Any) -> Any:
    return float(v) if v in ("inf", "-inf", "nan") else v


def dump_privacy(privacy: dict) -> str:
    """privacy.json text: standard JSON, non-finite float dict values written as "inf"/"-inf"/"nan"."""
    enc = _walk(privacy, lambda v: str(v) if isinstance(v, float) and not math.isfinite(v) else v)
    return json.dumps(enc, indent=2, allow_nan=False) + "\n"


def load_privacy(text: str) -> dict:
    """Inverse of `dump_privacy`: dict values "inf"/"-inf"/"nan" become floats again."""
    return _walk(json.loads(text), _decode)


def read_privacy(bundle_dir: str | Path) -> dict:
    """The bundle's privacy report, ε a float (inf included). Does not verify: call `verify_bundle` first."""
    return load_privacy((Path(bundle_dir) / "privacy.json").read_text())


def write_bundle(out_dir: Path, components: dict[str, Path], privacy: dict, *,
                 overwrite: bool = False) -> Path:
    """Write a verified bundle from component source directories and a privacy report.

    Only bundle files are copied from a source (a peft `save_pretrained` dir also holds a README; it stays
    behind and is logged). The new bundle is verified before it replaces anything at `out_dir`.

    Args:
        out_dir (Path): bundle directory to create; its parent is created if needed.
        components (dict[str, Path]): component name (`generator`, `reward`) → directory holding its files.
        privacy (dict): privacy report with at least `epsilon`, `delta`, `not_dp`, `mechanisms`.
        overwrite (bool): replace an existing bundle (old one renamed aside, new one in, old one deleted).

    Returns:
        Path: `out_dir`.

    Raises:
        BundleError: if a component name is unknown or a source lacks a required file.
        BundleError: if `out_dir` exists and `overwrite` is False, or it exists and is not a bundle.
        BundleError: if the new bundle fails `verify_bundle`; `out_dir` is then left as it was.
    """
    out_dir, srcs = Path(out_dir), {n: Path(s) for n, s in components.items()}
    problems = [f"{n}/: unknown component (allowed: generator, reward)" for n in srcs if n not in COMPONENTS]
    problems += [f"{n}/{f}: missing from source {s}" for n, s in srcs.items() for f in REQUIRED_FILES
                 if not (s / f).is_file()] + ["no components given (generator, reward)"] * (not srcs)
    is_bundle = out_dir.is_dir() and ((out_dir / "manifest.json").is_file() or not any(out_dir.iterdir()))
    if (out_dir.exists() or out_dir.is_symlink()) and not overwrite:
        problems.append(f"{out_dir}: already exists; pass overwrite=True to replace it")
    elif out_dir.exists() and not is_bundle:
        problems.append(f"{out_dir}: exists and is not a bundle (no manifest.json); refusing to replace it")
    if problems:
        raise BundleError(out_dir, problems)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for name, src in srcs.items():
            (tmp / name).mkdir()
            for f in (f for f in COMPONENT_FILES if (src / f).is_file()):
                shutil.copyfile(src / f, tmp / name / f)
            left = sorted(p.name for p in src.iterdir() if not (p.name in COMPONENT_FILES and p.is_file()))
            if left:
                logger.info("bundle: left out of %s (not bundle files): %s", name, ", ".join(left))
        # the report names the adapters it accounts for: a privacy.json copied from another bundle fails verify
        adapters = {name: _digest(tmp / name / "adapter_model.safetensors")["sha256"] for name in srcs}
        (tmp / "privacy.json").write_text(dump_privacy(privacy | {"adapters": adapters}))
        _write_manifest(tmp)  # last: a directory without it never verifies
        try:
            verify_bundle(tmp)
        except BundleError as e:
            raise BundleError(out_dir, e.problems) from None
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-", 1))
        if out_dir.exists():
            os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            if old.exists():
                os.rename(old, out_dir)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("bundle: wrote %s (components: %s)", out_dir, ", ".join(sorted(srcs)))
    return out_dir


def add_component(bundle_dir: Path, name: str, source_dir: Path, *, privacy: dict | None = None) -> Path:
    """Add or replace one component of a bundle (the reward model is trained after the generator).

    The bundle is verified first, so re-hashing never blesses a file slipped in after it was written; then a
    new bundle is built from its other components plus `source_dir` and swapped in as by `write_bundle`.

    Args:
        bundle_dir (Path): an existing, valid bundle.
        name (str): `generator` or `reward`.
        source_dir (Path): directory holding the component's files.
        privacy (dict | None): new privacy report (ε composed over both trainings); None keeps the old one.

    Returns:
        Path: `bundle_dir`.

    Raises:
        BundleError: if the existing bundle does not verify, or the new one cannot be written.
    """
    bundle_dir = Path(bundle_dir)
    comps = {c: bundle_dir / c for c in verify_bundle(bundle_dir)["components"] if c != name}
    if name == "generator" and "reward" in comps:  # a reward model trained against the old generator is stale
        new_sha = hashlib.sha256((Path(source_dir) / "adapter_model.safetensors").read_bytes()).hexdigest()
        if read_model_ref(bundle_dir, "reward").get("generator_sha256", new_sha) != new_sha:
            logger.warning("%s: the generator changed, so the reward model trained against the old one is removed; "
                           "run `ksg dp-reward` again", bundle_dir)
            del comps["reward"]
    privacy = read_privacy(bundle_dir) if privacy is None else privacy
    return write_bundle(bundle_dir, comps | {name: Path(source_dir)}, privacy, overwrite=True)


def publish_component(bundle_dir: Path, name: str, adapter_dir: Path, model_ref: dict, privacy: dict,
                      staging: Path) -> Path:
    """Stage a trained adapter with its `model_ref.json` (public base-model references only) and put it in the
    bundle: added to an existing bundle (its other components kept), or a new bundle written."""
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(adapter_dir, staging)
    (staging / "model_ref.json").write_text(json.dumps(model_ref, indent=2))
    config = json.loads((staging / "adapter_config.json").read_text())  # peft writes the client's local path here
    config["base_model_name_or_path"] = model_ref["base_model"]
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if (Path(bundle_dir) / "manifest.json").exists():
        return add_component(Path(bundle_dir), name, staging, privacy=privacy)
    return write_bundle(Path(bundle_dir), {name: staging}, privacy, overwrite=True)


def read_model_ref(bundle_dir: str | Path, component: str) -> dict:
    """A component's `model_ref.json`: the public base model (and, for the reward model, the generator it was
    trained against)."""
    return json.loads((Path(bundle_dir) / component / "model_ref.json").read_text())


def component_sha256(bundle_dir: str | Path, component: str) -> str:
    """sha256 of a component's adapter weights, as the bundle's manifest records it."""
    files = json.loads((Path(bundle_dir) / "manifest.json").read_text())["files"]
    return files[f"{component}/adapter_model.safetensors"]["sha256"]


def verify_bundle(bundle_dir: Path) -> dict:
    """Check a bundle and return its parsed manifest; run it before sending and again after receiving.

    Raises:
        BundleError: listing every problem (layout, manifest, hashes, safetensors, JSON, privacy report).
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise BundleError(root, [f"{root}: not a directory"])
    problems, files = _scan(root)
    manifest, found = _check_manifest(root, files)
    problems += found
    for c in sorted(p.name for p in root.iterdir() if p.name in COMPONENTS and p.is_dir()):
        problems += [f"{c}/{f}: required file missing" for f in REQUIRED_FILES if f"{c}/{f}" not in files]
    if not any("/" in f for f in files):
        problems.append("no component (expected generator/ and/or reward/)")
    if "privacy.json" not in files:
        problems.append("privacy.json: missing")
    for rel in (f for f in files if f != "manifest.json"):
        if rel.endswith(".safetensors"):
            problems += _check_safetensors(root / rel, rel)
            continue
        data, found = _read_json(root, rel)
        problems += found
        if rel == "privacy.json" and data is not None:
            problems += _check_privacy(_walk(data, _decode))
            listed = manifest.get("files", {})
            shas = {c: listed[f"{c}/adapter_model.safetensors"]["sha256"] for c in COMPONENTS
                    if isinstance(listed.get(f"{c}/adapter_model.safetensors"), dict)}
            if "adapters" in data and data["adapters"] != shas:
                problems.append("privacy.json: accounts for other adapters than this bundle's (copied from "
                                "another bundle, or a component changed after it was written)")
        elif rel.endswith("/model_ref.json") and data is not None:
            problems += _check_model_ref(data, rel)
        elif rel.endswith("/adapter_config.json") and data is not None:
            problems += _check_adapter_config(root, rel, data)
        if rel == "reward/model_ref.json" and data and "generator_sha256" in data:
            generator = manifest.get("files", {}).get("generator/adapter_model.safetensors", {}).get("sha256")
            if generator is not None and data["generator_sha256"] != generator:
                problems.append(f"{rel}: the reward model was trained against the generator with adapter sha256 "
                                f"{str(data['generator_sha256'])[:12]}…, but this bundle's generator is "
                                f"{generator[:12]}…: run `ksg dp-reward` again against this generator")
    if problems:
        raise BundleError(root, problems)
    return manifest


def _scan(root: Path) -> tuple[list[str], list[str]]:
    """Walk the two allowed levels; return (problems, relative paths of the allowed regular files)."""
    problems, files = [], []
    for entry in sorted(root.iterdir()):
        is_comp = entry.name in COMPONENTS and entry.is_dir() and not entry.is_symlink()
        for p in sorted(entry.iterdir()) if is_comp else [entry]:
            rel, allowed = p.relative_to(root).as_posix(), COMPONENT_FILES if is_comp else TOP_FILES
            if p.is_symlink():
                problems.append(f"{rel}: symlinks are not allowed")
            elif p.is_dir():
                problems.append(f"{rel}/: directory not allowed (only generator/, reward/; nothing nested)")
            elif p.name not in allowed or not p.is_file():
                problems.append(f"{rel}: not allowed in a bundle (allowed here: {', '.join(allowed)})")
            else:
                files.append(rel)
    return problems, files


def _digest(path: Path) -> dict:
    with path.open("rb") as fh:
        return {"sha256": hashlib.file_digest(fh, "sha256").hexdigest(), "bytes": path.stat().st_size}


def _components(files: list[str]) -> dict[str, list[str]]:
    parts = sorted(f.split("/") for f in files if "/" in f)
    return {c: [f for c2, f in parts if c2 == c] for c, _ in parts}


def _write_manifest(root: Path) -> None:
    files = sorted(f for f in _scan(root)[1] if f != "manifest.json")
    manifest = {"format": FORMAT, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "files": {f: _digest(root / f) for f in files}, "components": _components(files)}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def _read_json(root: Path, rel: str) -> tuple[dict | None, list[str]]:
    """Parse a bundle JSON file, which must be an object of at most MAX_JSON_BYTES."""
    if (size := (root / rel).stat().st_size) > MAX_JSON_BYTES:
        return None, [f"{rel}: {size} bytes, over the {MAX_JSON_BYTES} allowed for a bundle JSON file"]
    try:
        data = json.loads((root / rel).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        return None, [f"{rel}: not valid JSON ({e})"]
    return (data, []) if isinstance(data, dict) else (None, [f"{rel}: must be a JSON object"])


def _check_manifest(root: Path, files: list[str]) -> tuple[dict, list[str]]:
    if "manifest.json" not in files:
        return {}, ["manifest.json: missing (an unfinished or hand-made bundle)"]
    m, problems = _read_json(root, "manifest.json")
    if m is None:
        return {}, problems
    if m.get("format") != FORMAT:
        problems.append(f"manifest.json: format is {m.get('format')!r}, expected {FORMAT!r}")
    if set(m) != {"format", "created", "files", "components"}:
        problems.append(f"manifest.json: keys must be format, created, files, components; got {sorted(m)}")
    try:
        datetime.fromisoformat(m.get("created"))
    except (TypeError, ValueError):
        problems.append(f"manifest.json: 'created' is not an ISO time: {str(m.get('created'))[:40]!r}")
    listed = m.get("files") if isinstance(m.get("files"), dict) else {}
    on_disk = [f for f in files if f != "manifest.json"]
    problems += [f"{f}: on disk but not listed in manifest.json" for f in on_disk if f not in listed]
    problems += [f"{f[:80]}: in manifest.json but absent or not allowed" for f in listed if f not in on_disk]
    for f in (f for f in on_disk if f in listed):
        if not isinstance(listed[f], dict) or set(listed[f]) != {"sha256", "bytes"}:
            problems.append(f"{f}: manifest entry must be exactly {{sha256, bytes}}")
        elif listed[f] != (actual := _digest(root / f)):
            problems.append(f"{f}: sha256/size differ from manifest.json ({actual['bytes']} bytes on disk, "
                            f"{listed[f]['bytes']} listed): modified after the bundle was written")
    if m.get("components") != _components(on_disk):
        problems.append(f"manifest.json: components {str(m.get('components'))[:80]} do not match the files")
    return m, problems


def _check_safetensors(path: Path, rel: str) -> list[str]:
    """safe_open (never unpickles), plus what it lets through: extra header fields, metadata, ints, NaN."""
    from safetensors import safe_open

    problems = []
    try:
        with safe_open(str(path), framework="pt") as f, path.open("rb") as fh:
            raw = fh.read(int.from_bytes(fh.read(8), "little"))  # header length already checked by safe_open
            header = json.loads(raw)
            for key in f.keys():
                if not (t := f.get_tensor(key)).is_floating_point():
                    problems.append(f"{rel}: tensor {key[:80]!r} is {t.dtype}; only floats are allowed")
                elif not bool(t.float().isfinite().all()):
                    problems.append(f"{rel}: tensor {key[:80]!r} holds NaN or inf")
    except Exception as e:  # SafetensorError derives from Exception only
        return [f"{rel}: not a valid safetensors file ({type(e).__name__}: {e}); pickles are not allowed"]
    if len(raw) > len(json.dumps(header, separators=(",", ":"))) + 8:
        problems.append(f"{rel}: header is {len(raw)} bytes, more than its content needs (padding?)")
    if (meta := header.pop("__metadata__", {})) not in ({}, {"format": "pt"}):
        problems.append(f"{rel}: header metadata other than {{'format': 'pt'}} not allowed: {str(meta)[:80]}")
    for key, info in header.items():
        if len(key) > 256 or not all(_NAME_PART.fullmatch(s) for s in key.split(".")):
            problems.append(f"{rel}: tensor name {key[:80]!r} is not a module path")
        if not isinstance(info, dict) or set(info) != _TENSOR_FIELDS:
            problems.append(f"{rel}: tensor {key[:80]!r} has header fields beyond dtype/shape/data_offsets")
    return problems + [f"{rel}: holds no tensors"] * (not header)


def _num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and not math.isnan(x)


def _check_model_ref(data: dict, rel: str) -> list[str]:
    """Public model names, the component's kind, and the generator a reward model was trained against."""
    problems = [f"{rel}: key {k[:40]!r} not allowed (base_model, tokenizer, kind, generator_sha256)"
                for k in data if k not in ("base_model", "tokenizer", "kind", "generator_sha256")]
    if not isinstance(data.get("base_model"), str):
        problems.append(f"{rel}: needs a string 'base_model' (name or path of the public base model)")
    for key in ("base_model", "tokenizer"):
        if isinstance(data.get(key), str) and not _MODEL_NAME.fullmatch(data[key]):
            problems.append(f"{rel}: {key} {data[key][:60]!r} is not a public model name")
    if "kind" in data and data["kind"] not in MODEL_KINDS:
        problems.append(f"{rel}: kind must be one of {', '.join(MODEL_KINDS)}")
    if "generator_sha256" in data and not (isinstance(data["generator_sha256"], str)
                                           and _SHA256.fullmatch(data["generator_sha256"])):
        problems.append(f"{rel}: generator_sha256 must be a sha256 hex digest")
    return problems


def _check_adapter_config(root: Path, rel: str, data: dict) -> list[str]:
    """peft LoraConfig fields with identifier-like values only; and the adapter's tensors must be exactly what
    this config describes (names under its target modules or modules to save, LoRA shapes of its rank)."""
    import dataclasses

    from peft import LoraConfig

    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    problems = [f"{rel}: key {k[:40]!r} is not a peft LoraConfig field" for k in data if k not in fields]

    def plain(v: Any, depth: int = 0) -> bool:
        if v is None or isinstance(v, bool | int | float):
            return True
        if isinstance(v, str):
            return bool(_IDENT.fullmatch(v))
        if isinstance(v, list):
            return depth < 2 and len(v) <= 64 and all(plain(x, depth + 1) for x in v)
        if isinstance(v, dict):
            return depth < 2 and len(v) <= 64 and all(isinstance(k, str) and _IDENT.fullmatch(k) and
                                                      plain(x, depth + 1) for k, x in v.items())
        return False

    problems += [f"{rel}: value of {k!r} is not an identifier, number or list of them" for k, v in data.items()
                 if k in fields and not plain(v)]
    if data.get("peft_type") != "LORA" or not isinstance(data.get("r"), int):
        return problems + [f"{rel}: must be a LORA config with an integer r"]
    base = data.get("base_model_name_or_path")
    ref = root / rel.rsplit("/", 1)[0] / "model_ref.json"
    if base is not None and ref.is_file():
        try:
            ref_base = json.loads(ref.read_text()).get("base_model")
        except (ValueError, AttributeError):
            ref_base = None  # reported by the model_ref.json check
        if ref_base is not None and base != ref_base:
            problems.append(f"{rel}: base_model_name_or_path {str(base)[:60]!r} is not model_ref.json's base_model "
                            "(a local path of the client's?)")
    problems += _check_tensors_match(root, rel.rsplit("/", 1)[0], data)
    return problems


def _check_tensors_match(root: Path, component: str, cfg: dict) -> list[str]:
    from safetensors import safe_open

    rel = f"{component}/adapter_model.safetensors"
    if not (root / rel).is_file():
        return []
    targets = cfg.get("target_modules") or []
    saved = set(cfg.get("modules_to_save") or [])

    def targeted(path: str) -> bool:  # peft's rule: a regex string, or a list of names / dotted suffixes
        if isinstance(targets, str):
            return re.fullmatch(targets, path) is not None
        return any(path == t or path.endswith("." + t) for t in targets)

    rank, ranks = cfg["r"], cfg.get("rank_pattern") or {}
    problems = []
    try:
        with safe_open(str(root / rel), framework="pt") as f:
            shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # reported by _check_safetensors
        return []
    for name, shape in shapes.items():
        parts = name.split(".")
        if len(parts) >= 3 and parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight":
            module = parts[-3]
            r = next((v for k, v in ranks.items() if name.find(k) >= 0), rank)
            if not targeted(".".join(parts[:-2])):
                problems.append(f"{rel}: {name[:80]!r} adapts {module!r}, not a target module of the config")
            elif len(shape) != 2 or shape[0 if parts[-2] == "lora_A" else 1] != r:
                problems.append(f"{rel}: {name[:80]!r} has shape {shape}, not that of a rank-{r} LoRA matrix")
        elif not any(m in parts for m in saved):
            problems.append(f"{rel}: tensor {name[:80]!r} is neither a LoRA matrix nor a module to save")
    return problems


def _check_privacy(p: dict) -> list[str]:
    num = _num
    allowed = {"epsilon", "epsilon_rdp", "delta", "accountant", "composition", "mechanisms", "not_dp", "records",
               "adapters", "disjoint_data"}
    problems = [f"privacy.json: missing key {k!r}" for k in PRIVACY_KEYS if k not in p]
    problems += [f"privacy.json: key {k[:40]!r} not allowed ({', '.join(sorted(allowed))})" for k in p
                 if k not in allowed]
    if "epsilon_rdp" in p and not (num(p["epsilon_rdp"]) and p["epsilon_rdp"] >= 0):
        problems.append("privacy.json: epsilon_rdp must be a number >= 0 or \"inf\"")
    if "accountant" in p and p["accountant"] not in ("prv", "rdp"):
        problems.append("privacy.json: accountant must be prv or rdp")
    if "composition" in p and p["composition"] != COMPOSITION:
        problems.append("privacy.json: composition must be the fixed description, not free text")
    if "records" in p and not (isinstance(p["records"], int) and not isinstance(p["records"], bool)
                               and p["records"] > 0):
        problems.append("privacy.json: records must be a positive integer (N)")
    if "disjoint_data" in p and not isinstance(p["disjoint_data"], bool):
        problems.append("privacy.json: disjoint_data must be true or false")
    if "adapters" in p and not (isinstance(p["adapters"], dict) and all(
            k in COMPONENTS and isinstance(v, str) and _SHA256.fullmatch(v) for k, v in p["adapters"].items())):
        problems.append("privacy.json: adapters must map generator/reward to sha256 digests")
    for i, m in enumerate(p.get("mechanisms") if isinstance(p.get("mechanisms"), list) else []):
        keys = {"name", "noise_multiplier", "sample_rate", "steps", "run_id", "mechanism", "records"}
        if not isinstance(m, dict) or not set(m) <= keys or not {"name", "noise_multiplier", "sample_rate",
                                                                  "steps"} <= set(m):
            problems.append(f"privacy.json: mechanisms[{i}] must hold name, noise_multiplier, sample_rate, steps "
                            "(and run_id, mechanism, records) only")
            continue
        if m["name"] not in COMPONENTS or not all(num(m[k]) for k in ("noise_multiplier", "sample_rate", "steps")):
            problems.append(f"privacy.json: mechanisms[{i}]: name generator/reward and numeric σ, q, steps")
        if "run_id" in m and not (isinstance(m["run_id"], str) and _RUN_ID.fullmatch(m["run_id"])):
            problems.append(f"privacy.json: mechanisms[{i}].run_id must be <name>[:<12 hex>]")
        if "records" in m and not (isinstance(m["records"], int) and not isinstance(m["records"], bool)
                                   and m["records"] > 0):
            problems.append(f"privacy.json: mechanisms[{i}].records must be a positive integer (N)")
        if "mechanism" in m and m["mechanism"] != "poisson-subsampled-gaussian":
            problems.append(f"privacy.json: mechanisms[{i}].mechanism must be poisson-subsampled-gaussian")
    if "epsilon" in p and not (num(p["epsilon"]) and p["epsilon"] >= 0):
        problems.append(f"privacy.json: epsilon must be a number >= 0 or \"inf\", got {p['epsilon']!r}")
    if "delta" in p and not (num(p["delta"]) and 0 <= p["delta"] < 1):
        problems.append(f"privacy.json: delta must be a number in [0, 1), got {p['delta']!r}")
    if "not_dp" in p and not (isinstance(p["not_dp"], list) and all(s in NOT_DP_REASONS for s in p["not_dp"])):
        problems.append("privacy.json: not_dp must list known non-DP uses only (NOT_DP_REASONS), not free text")
    if "mechanisms" in p and not isinstance(p["mechanisms"], list):
        problems.append("privacy.json: mechanisms must be a list")
    return problems


def add_bundle_args(subparsers: argparse._SubParsersAction) -> None:
    """Register `ksg bundle verify DIR` on the `ksg` subparsers."""
    p = subparsers.add_parser("bundle", help="[client/server] check a transfer bundle before sending/loading")
    sub = p.add_subparsers(dest="bundle_command", required=True)
    v = sub.add_parser("verify", help="check layout, hashes, weights and privacy.json; exit 1 on any problem, "
                                      "2 when DIR is not a directory")
    v.add_argument("dir", type=Path, help="bundle directory")


def run_bundle(args: argparse.Namespace) -> int:
    """Run a `ksg bundle` subcommand; returns the exit status (0 valid, 1 problems printed to stderr).

    Raises:
        BundleError: there is no bundle directory to verify (`ksg` prints it as a usage error, exit 2).
    """
    try:
        manifest = verify_bundle(args.dir)
    except BundleError as e:
        if not Path(args.dir).is_dir():
            raise
        print(e, file=sys.stderr)
        return 1
    p = read_privacy(args.dir)
    print(f"OK {args.dir}: components={','.join(manifest['components'])}, "
          f"epsilon={p['epsilon']:g}, delta={p['delta']:g}")
    return 0
