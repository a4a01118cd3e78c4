#!/usr/bin/env bash
# One GPU check of the three Ray paths, on tiny-random: Ray Train DP fine-tuning with DeepSpeed ZeRO-3 over NCCL
# (ε recomputed with dp_accounting), Ray Data synthesis with the transformers engine on CUDA, and Ray Serve
# answering the official openai client. The checks themselves are bench/gpu_check.py.
#
#   bash bench/gpu_check.sh prepare          # here: fills .gpu_carry/{a,b} (ignored); the tiny bundle is made once
#                                            # (2 min of DP training; delete .gpu_carry/b/bundle to make it again)
#   bash bench/gpu_check.sh run --dry-run    # here, with a Python 3.12 like the device's first on PATH: installs
#                                            # the carry, imports, validates the configs, stops before CUDA
#
# On the GPU machine (the `run` tool of the device): two calls back to back, the second within the 30 s the machine
# stays warm (the first call's ignored .gpu_carry/a is still there then; the ray wheel is too big for one call):
#   1. run  carry: [".gpu_carry/a"]  timeout_s: 120  command: nvidia-smi -L
#   2. run  carry: [".gpu_carry/b"]  timeout_s: 540  command: bash bench/gpu_check.sh run
# Call 2 prints PASS/FAIL per check and returns gpu_check.json and each check's log in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=.gpu_carry
LIMIT_MIB=60                       # per call, the working tree included (the tool's own limit is 64)
RAY_WHL=ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl
RAY_A_MIB=55                       # the ray wheel's first part rides alone in call 1
DEEPSPEED=deepspeed==0.19.8        # sdist only: built here into a py3-none-any wheel (DS_BUILD_OPS=0, JIT ops)
# What ray[data,train,serve], deepspeed, opacus, dp_accounting, openai and ksg_ray need that the device's image
# lacks (KINDS.md), at the versions installed here. Ray runs as a minimal install there (no dashboard extras).
# transformers stays the device's 5.17: the engine (greedy, row-seeded sampling, score), the reward model and the
# per-record DP clipped sum gave the same outputs on 5.17 and 5.19 here, and its 12 MiB would take call 2 past 60.
WHEELS=(
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2 grpcio-reflection==1.85.1
  uvicorn==0.55.0 httptools==0.9.0 watchfiles==1.3.0 websockets==17.4 tensorboardX==2.6.5
  hjson==3.1.0 opacus==1.6.0 dp-accounting==0.6.0 dm-tree==0.1.10 peft==0.21.2
  openai==3.60.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
)

die() { echo "gpu_check: $*" >&2; exit 1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }
bytes() { du -scb "$@" 2>/dev/null | tail -1 | cut -f1; }

prepare() {
  local py=${PREPARE_PYTHON:-python3} stage=$CARRY/stage
  mkdir -p "$stage" "$CARRY/a" "$CARRY/b/wheels" "$CARRY/b/ksg-cache"
  rm -f "$CARRY"/a/* "$CARRY"/b/wheels/* "$CARRY"/b/ray.whl.*
  if [ ! -f "$stage/$RAY_WHL" ]; then
    cp "/tmp/whl312/$RAY_WHL" "$stage/" 2>/dev/null || download "$py" "$stage" ray==2.60.0
  fi
  ls "$stage"/deepspeed-*.whl >/dev/null 2>&1 ||
    DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$stage" "$DEEPSPEED"
  cp "$stage"/deepspeed-*.whl "$CARRY/b/wheels/"
  download "$py" "$CARRY/b/wheels" "${WHEELS[@]}"
  head -c $((RAY_A_MIB << 20)) "$stage/$RAY_WHL" >"$CARRY/a/ray.whl.part1"
  tail -c +$(((RAY_A_MIB << 20) + 1)) "$stage/$RAY_WHL" >"$CARRY/b/ray.whl.part2"
  (cd "$stage" && sha256sum "$RAY_WHL") >"$CARRY/b/ray.whl.sha256"

  local model
  model=$("$py" -c "from ksg_ray.common.hub import resolve_model; print(resolve_model('tiny-random'))")
  rm -rf "$CARRY/b/ksg-cache/$(basename "$model")" && cp -r "$model" "$CARRY/b/ksg-cache/"
  [ -f "$CARRY/b/bundle/manifest.json" ] || make_bundle "$py" "$stage/client"

  local tree a b
  tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  a=$((tree + $(bytes "$CARRY/a"))) b=$((tree + $(bytes "$CARRY/b")))
  echo "working tree $(mib "$tree") MiB; call 1 (.gpu_carry/a + tree) $(mib "$a") MiB;" \
       "call 2 (.gpu_carry/b + tree) $(mib "$b") MiB: model $(mib "$(bytes "$CARRY/b/ksg-cache")"),"\
       "bundle $(mib "$(bytes "$CARRY/b/bundle")"), wheels $(mib "$(bytes "$CARRY/b/wheels" "$CARRY/b/ray.whl.part2")")"
  ((a <= LIMIT_MIB << 20 && b <= LIMIT_MIB << 20)) || die "a call would carry more than $LIMIT_MIB MiB"
}

download() {  # download PY DIR SPEC...: cp312 manylinux x86-64 wheels (or pure ones), no dependencies
  local py=$1 dir=$2
  shift 2
  "$py" -m pip download -qq --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "$@"
}

make_bundle() {  # make_bundle PY DIR: a client run on tiny-random (as tests/conftest.py's client_bundle), ~2 min
  local py=$1 t=$2
  rm -rf "$t" && mkdir -p "$t"
  local common=(model.name=tiny-random data.path=demo data.limit=20 data.max_seq_len=96 train.expected_batch_size=4
                train.max_steps=3 scaling.num_workers=1 privacy.delta=1e-3 "run.output_dir=$t/runs"
                "privacy.ledger_dir=$t/runs")
  RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 "$py" -m ksg_ray.cli dp-train configs/dp_finetune.yaml "${common[@]}" \
    "run.bundle_dir=$t/bundle"
  RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1 "$py" -m ksg_ray.cli dp-reward configs/dp_reward.yaml "${common[@]}" \
    "candidates.generator_bundle=$t/bundle" candidates.max_new_tokens=8 privacy.total_epsilon_budget=40
  rm -rf "$CARRY/b/bundle" && cp -r "$t/bundle" "$CARRY/b/bundle"
}

run() {
  local site=${GPU_CHECK_SITE:-/tmp/site} whl=/tmp/gpu-check-wheels
  export GPU_CHECK_WORK=${GPU_CHECK_WORK:-/tmp/gpu-check}
  local results=${OUT:-$GPU_CHECK_WORK}
  mkdir -p "$results" "$GPU_CHECK_WORK" "$whl"
  [ -f "$CARRY/a/ray.whl.part1" ] || die "no $CARRY/a: the call that carries it must come first (header of $0)"
  [ -f "$CARRY/b/ray.whl.part2" ] || die "no $CARRY/b: run \`bash $0 prepare\` here and carry $CARRY/b"
  cat "$CARRY/a/ray.whl.part1" "$CARRY/b/ray.whl.part2" >"$whl/$RAY_WHL"
  (cd "$whl" && sha256sum --quiet -c "$ROOT/$CARRY/b/ray.whl.sha256") || die "the ray wheel's parts do not match"

  local t0=$SECONDS
  rm -rf "$site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
    "$whl/$RAY_WHL" "$CARRY"/b/wheels/*.whl >"$results/install.log" 2>&1 ||
    { tail -20 "$results/install.log"; die "pip install failed"; }
  # ksg_ray from this tree laid out as pyproject.toml installs it: jobs/ and serve/ are ksg_ray.jobs, ksg_ray.serve
  cp -r ksg_ray "$site/" && cp -r jobs "$site/ksg_ray/jobs" && cp -r serve "$site/ksg_ray/serve"
  echo "installed ray, $(ls "$CARRY"/b/wheels | wc -l) wheels and ksg_ray into $site in $((SECONDS - t0)) s"

  export PYTHONPATH=$site:$ROOT KSG_CACHE=$ROOT/$CARRY/b/ksg-cache HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
  export TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
  local rc=0
  python3 bench/gpu_check.py preflight "$@" 2>&1 | tee "$results/preflight.log" || rc=${PIPESTATUS[0]}
  case $rc in
    0) ;;
    3) exit 0 ;;  # --dry-run: stopped before CUDA as asked
    *) exit "$rc" ;;
  esac
  for check in dp:150 synth:180 serve:120; do
    local name=${check%:*}
    t0=$SECONDS
    timeout -k 10 "${check#*:}" python3 bench/gpu_check.py "$name" >"$results/$name.log" 2>&1 || {
      echo "--- $name failed after $((SECONDS - t0)) s; the end of $results/$name.log:"
      tail -25 "$results/$name.log"
    }
    echo "$name: $((SECONDS - t0)) s"
  done
  cp "$GPU_CHECK_WORK/serve/serve.log" "$results/serve-app.log" 2>/dev/null || true
  python3 bench/gpu_check.py summary
}

case ${1:-} in
  prepare) prepare ;;
  run) shift; run "$@" ;;
  *) die "usage: bash $0 prepare | run [--dry-run]" ;;
esac
