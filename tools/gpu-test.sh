#!/usr/bin/env bash
# Builds everything a GPU machine needs to run the test suite, `mvar info` and the benchmarks,
# without a Rust toolchain there: the release test binaries of the workspace, the bench binary and
# the `mvar` binary, stripped and packed (xz) into gpu-bundle/payload.tar.xz, the fixture set
# (which lives beside the repository and would not travel with it) into
# gpu-bundle/fixtures.tar.xz, and a run-all.sh that unpacks both there; gpu-bundle/ is ignored by
# git and is what a GPU machine is sent besides the repository (checked to stay under 60 MB with
# the tracked files, as such machines take 64 MiB in all).
#
# Usage (from anywhere in the repository):  tools/gpu-test.sh
# Then, on the GPU machine, from the repository root:  bash gpu-bundle/run-all.sh [phases]
#
# The binaries load the CUDA driver, NVRTC and cuBLAS at run time (cudarc's dynamic loading), so
# nothing here needs CUDA; run-all.sh finds the GPU machine's own libraries when it starts.
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE=gpu-bundle
LIMIT_MB=60

for tool in cargo python3 strip tar xz git; do
  command -v "$tool" >/dev/null || { echo "gpu-test.sh: $tool not found" >&2; exit 1; }
done

# Executables of one kind of target from cargo's JSON messages on stdin: "test" takes every
# artifact built with the test harness profile (unit tests of each crate and the integration
# test targets), "bench" the bench targets.
executables() {
  python3 -c '
import json, sys
want = sys.argv[1]
seen = set()
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    kinds = msg["target"]["kind"]
    if want == "bench" and "bench" not in kinds:
        continue
    if want == "test" and (not msg["profile"]["test"] or "bench" in kinds):
        continue
    if msg["executable"] not in seen:
        seen.add(msg["executable"])
        print(msg["executable"])
' "$1"
}

JSON="$(mktemp)"
trap 'rm -f "$JSON"' EXIT
echo "== building the release test binaries (cargo test --release --workspace --no-run)"
cargo test --release --workspace --no-run --message-format=json > "$JSON"
mapfile -t TESTS < <(executables test < "$JSON")
echo "== building the bench binary (cargo bench --no-run)"
cargo bench --no-run --message-format=json > "$JSON"
mapfile -t BENCHES < <(executables bench < "$JSON")
echo "== building mvar (cargo build --release -p mvar-tools)"
cargo build --release -p mvar-tools
MVAR_BIN=target/release/mvar

[ "${#TESTS[@]}" -gt 0 ] || { echo "gpu-test.sh: cargo reported no test binaries" >&2; exit 1; }
[ "${#BENCHES[@]}" -gt 0 ] || { echo "gpu-test.sh: cargo reported no bench binary" >&2; exit 1; }

STAGE=target/gpu-bundle-stage
rm -rf "$STAGE"
mkdir -p "$STAGE/tests" "$STAGE/benches" "$BUNDLE"
for exe in "${TESTS[@]}"; do
  strip -o "$STAGE/tests/$(basename "$exe")" "$exe"
done
for exe in "${BENCHES[@]}"; do
  strip -o "$STAGE/benches/$(basename "$exe")" "$exe"
done
strip -o "$STAGE/mvar" "$MVAR_BIN"
# Whatever an older layout left (unpacked binaries) goes; the fixture archive is kept while it is
# newer than the fixture set's manifest, since packing it takes a while.
find "$BUNDLE" -mindepth 1 -maxdepth 1 ! -name fixtures.tar.xz -exec rm -rf {} +
echo "== packing the binaries ($(du -sm "$STAGE" | cut -f1) MB) into $BUNDLE/payload.tar.xz"
tar -C "$STAGE" -cf - . | xz -T0 -6 > "$BUNDLE/payload.tar.xz"

FIXTURES="${MVAR_FIXTURES_DIR:-}"
if [ -z "$FIXTURES" ]; then
  for f in ../shared/fixtures shared/fixtures; do
    [ -f "$f/manifest.json" ] && { FIXTURES="$f"; break; }
  done
fi
if [ -n "$FIXTURES" ] && [ -f "$FIXTURES/manifest.json" ]; then
  if [ ! -f "$BUNDLE/fixtures.tar.xz" ] || [ "$FIXTURES/manifest.json" -nt "$BUNDLE/fixtures.tar.xz" ]; then
    echo "== packing the fixture set $FIXTURES ($(du -sm "$FIXTURES" | cut -f1) MB) into $BUNDLE/fixtures.tar.xz"
    tar -C "$FIXTURES" -cf - . | xz -T0 -6 > "$BUNDLE/fixtures.tar.xz"
  fi
else
  rm -f "$BUNDLE/fixtures.tar.xz"
  echo "gpu-test.sh: no fixture set found (MVAR_FIXTURES_DIR, ../shared/fixtures, shared/fixtures);" \
    "the fixture tests will fail on the GPU machine unless it has one there" >&2
fi

cat > "$BUNDLE/run-all.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundle built by tools/gpu-test.sh on a GPU machine, from the repository root, in
# phases (all of them when none is named, in this order):
#   tests   every test binary, with MVAR_REQUIRE_GPU=1 (parity and fixture tests fail instead of
#           skipping without a GPU), then `mvar info`
#   gpu-tests  only the test binaries that use the GPU (parity, fixtures, the CUDA crate's unit
#           tests, the kernel compile check, the command-line tests on the GPU with the
#           out-of-memory one),
#           then `mvar info`: the rest are CPU tests that CI runs anyway
#   kernel-tests  parity, fixtures and the CUDA crate's unit tests, then `mvar info`: the
#           kernels' results on the GPU, first in a short device lease (CI compiles every kernel
#           with NVRTC 13.0 already; the compile check's register reports take minutes here)
#   cli     the command-line tests alone, on the GPU
#   benches the CUDA cases of the criterion benchmarks (ids with "cuda/"), short measurement times;
#           MVAR_BENCH_FILTER (a regular expression on group/id, default cuda/) narrows them, and
#           the torch phase's cases likewise, e.g. MVAR_BENCH_FILTER='cuda/(sum|silu)'
#   torch   benches/torch_reference.py: PyTorch's figures for the same cases, when torch imports;
#           with the benches phase's log, benches/compare.py puts both in logs/comparison.md
#   model   `mvar bench`: VAR-d16 and MVAR-d16 training step and batch-32 sampling, time and peak
#           memory, and their ratios (the MVAR paper's Table 2); MVAR-d16's training step again
#           with MVAR_NA_STAGING=ring; both models' training step with
#           --recompute-activations; both models' sampling with the whole batch decoded in one
#           pass (--decode-batch 32, the official sampler's way); the released tokenizer's
#           training step (--what tokenizer, batch 8); then a short run of the same under MVAR_PROFILE=trace,
#           whose timeline (host ops, GPU kernels) lands in logs/
#   ncu     Nsight Compute on the kernels of a few bench cases (not in the default set: name it):
#           per case, the sections that say where a kernel's time goes (throughputs, occupancy,
#           scheduler, warp stalls, memory, the SASS lines with the most stall samples) as text
#           in logs/ncu-N.txt and as raw metrics in logs/ncu-N.csv, all cases summed up by
#           tools/ncu_summary.py in logs/ncu-summary.md. MVAR_NCU_CASES replaces the cases: one
#           per line, "bench filter|kernel name regex|launches skipped|launches profiled" (the
#           defaults below: issue 6's neighbourhood attention at batch 64, at 16x16 also with the
#           ring-staged kernels; VAR's block-causal attention, the KV-cache decode). A machine
#           whose ncu cannot read the counters (seen on gVisor) ends the phase after the first
#           case, with ncu's error in the log.
# e.g. `bash gpu-bundle/run-all.sh tests model`, then `bash gpu-bundle/run-all.sh benches torch`
# (benches and torch in one call, for the comparison),
# to keep each call of a time-limited machine short. Each phase prints its duration.
#
# Time limits, so that a call always ends inside the machine's limit with its logs saved:
#   MVAR_RUN_SECONDS   the whole call's budget (default 0: none). A step (one test binary, one
#                      bench binary, the PyTorch script, `mvar bench`) is cut at what is left of
#                      it less 20 s, and one that would start with under 40 s left is not run.
#   MVAR_TEST_TIMEOUT  seconds for one test binary (default 300): a kernel that hangs on the GPU
#                      costs that binary, not the call.
#   MVAR_STEP_TIMEOUT  seconds for one step of the other phases (default 480).
# A cut step's output so far is kept (the bench and PyTorch figures print as they come).
# The tests run the binaries that use the GPU first (parity, fixtures, the CUDA crate's own),
# then the rest, which CI also runs on its CPU.
# Exit status: 1 if any test binary or phase failed, timed out or was not run for lack of time.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
RUN_SECONDS="${MVAR_RUN_SECONDS:-0}"
TEST_TIMEOUT="${MVAR_TEST_TIMEOUT:-300}"
BENCH_FILTER="${MVAR_BENCH_FILTER:-cuda/}"
STEP_TIMEOUT="${MVAR_STEP_TIMEOUT:-480}"
for v in "$RUN_SECONDS" "$TEST_TIMEOUT" "$STEP_TIMEOUT"; do
  case "$v" in
    ''|*[!0-9]*) echo "run-all.sh: MVAR_RUN_SECONDS, MVAR_TEST_TIMEOUT and MVAR_STEP_TIMEOUT take whole seconds (got '$v')" >&2; exit 2 ;;
  esac
done
# Logs: gpu-bundle/logs, or with OUT set (a machine that sends back only a few files from OUT)
# a folder kept across calls, packed into $OUT/logs.tar.gz after every test binary and phase,
# with the comparison and the model benchmark also as plain files beside it.
if [ -n "${OUT:-}" ]; then
  LOGS="${TMPDIR:-/tmp}/mvar-gpu-logs"
else
  LOGS="$HERE/logs"
fi
mkdir -p "$LOGS"
save_logs() {
  [ -n "${OUT:-}" ] || return 0
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
  for f in comparison.md mvar-bench.log mvar-bench-recompute.log mvar-bench-decode32.log ncu-summary.md; do
    [ -f "$LOGS/$f" ] && cp "$LOGS/$f" "$OUT/$f"
  done
  return 0
}

# The binaries (and the fixture set) travel packed; they are unpacked outside the repository.
WORK="${TMPDIR:-/tmp}/mvar-gpu-bundle"
unpack() {
  mkdir -p "$2"
  tar -xJf "$1" -C "$2" 2>/dev/null \
    || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"
}
rm -rf "$WORK"
unpack "$HERE/payload.tar.xz" "$WORK/bin" || { echo "run-all.sh: cannot unpack $HERE/payload.tar.xz" >&2; exit 1; }
BIN="$WORK/bin"
PHASES=("$@")
[ "${#PHASES[@]}" -gt 0 ] || PHASES=(tests benches torch model)
for p in "${PHASES[@]}"; do
  case "$p" in
    tests|gpu-tests|kernel-tests|cli|benches|torch|model|ncu) ;;
    *) echo "run-all.sh: unknown phase $p (expected tests, gpu-tests, kernel-tests, cli, benches, torch, model or ncu)" >&2; exit 2 ;;
  esac
done

# The machine's own CUDA libraries (driver, NVRTC, cuBLAS): the toolkit folders, and the lib
# folders of NVIDIA's pip wheels (nvidia/cu13/lib, nvidia/cublas/lib, ...) in python3's
# site-packages, probed now since they differ between machines.
dirs=()
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && dirs+=("$d")
done
if command -v python3 >/dev/null; then
  while IFS= read -r sp; do
    for d in "$sp"/nvidia/*/lib; do
      [ -d "$d" ] && dirs+=("$d")
    done
  done < <(python3 -c 'import site, sys; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)
fi
if [ "${#dirs[@]}" -gt 0 ]; then
  found="$(IFS=:; echo "${dirs[*]}")"
  export LD_LIBRARY_PATH="$found${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export MVAR_REQUIRE_GPU=1
# The command-line tests run the bundle's own mvar (their built-in path is this build machine's),
# on the GPU: CI runs them on the CPU, and on the emulator's GPU path.
export MVAR_BIN="$BIN/mvar"
export MVAR_CLI_DEVICE="${MVAR_CLI_DEVICE:-cuda}"
# NVRTC's output, cached across the phases of one machine.
export MVAR_KERNEL_CACHE="${MVAR_KERNEL_CACHE:-${TMPDIR:-/tmp}/mvar-kernel-cache}"

# The fixture tests read the shared fixture set: next to the repository or inside it where there
# is one, else the copy that travelled in fixtures.tar.xz.
for f in ../shared/fixtures shared/fixtures; do
  if [ -f "$f/manifest.json" ]; then
    export MVAR_FIXTURES_DIR="$(cd "$f" && pwd)"
    break
  fi
done
if [ -z "${MVAR_FIXTURES_DIR:-}" ] && [ -f "$HERE/fixtures.tar.xz" ]; then
  unpack "$HERE/fixtures.tar.xz" "$WORK/fixtures" && export MVAR_FIXTURES_DIR="$WORK/fixtures"
fi

# The official references the fixture tests also check (training steps, the sampler's filter,
# zero-shot edits: tests/official of the repository the bundle came with).
if [ -z "${MVAR_OFFICIAL_DIR:-}" ] && [ -d "$HERE/../tests/official" ]; then
  export MVAR_OFFICIAL_DIR="$(cd "$HERE/../tests/official" && pwd)"
fi

{
  echo "phases: ${PHASES[*]}"
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  echo "MVAR_FIXTURES_DIR=${MVAR_FIXTURES_DIR:-<not found>}"
  command -v nvidia-smi >/dev/null && nvidia-smi -L
} | tee "$LOGS/environment.txt"

failed=()
not_run=()

# The seconds a step may run: its cap, or what the call's budget has left less 20 s (for packing
# the logs); 0 when under 40 s would be left.
step_seconds() {
  local cap=$1 left
  if [ "$RUN_SECONDS" -gt 0 ]; then
    left=$((RUN_SECONDS - SECONDS - 20))
    if [ "$left" -lt 40 ]; then
      echo 0
      return
    fi
    [ "$cap" -le "$left" ] || cap=$left
  fi
  echo "$cap"
}

# run_for SECONDS CMD...: CMD, killed after SECONDS (status 124 or 137 then).
run_for() {
  local secs=$1
  shift
  if command -v timeout >/dev/null; then
    timeout -k 10 "$secs" "$@"
  else
    "$@"
  fi
}

# budget_for NAME CAP: sets STEP_SECS to the seconds step NAME may run (step_seconds); when the
# call's budget is spent, lists NAME as not run and returns 1.
budget_for() {
  STEP_SECS=$(step_seconds "$2")
  if [ "$STEP_SECS" -eq 0 ]; then
    echo "== $1: NOT RUN (the call's time budget is spent)"
    not_run+=("$1")
    return 1
  fi
}

# outcome NAME STATUS [NOTE]: the status of step NAME run for STEP_SECS under run_for (124 or
# 137: it was cut). A failed or cut step is listed and reported with NOTE; returns 1 for both.
outcome() {
  if [ "$2" -eq 124 ] || [ "$2" -eq 137 ]; then
    echo "$1: TIMED OUT after $STEP_SECS s${3:+; $3}"
    failed+=("$1 (timed out)")
    return 1
  elif [ "$2" -ne 0 ]; then
    echo "$1: FAILED (status $2)${3:+; $3}"
    failed+=("$1")
    return 1
  fi
}

# The test binaries that use the GPU, most telling first (cargo names them <target>-<hash>).
KERNEL_TESTS=('parity-*' 'fixtures-*' 'mvar_cuda-*')
GPU_TESTS=("${KERNEL_TESTS[@]}" 'kernels_compile-*' 'cli-*')

phase_gpu-tests() { run_tests gpu "${GPU_TESTS[@]}"; }
phase_kernel-tests() { run_tests gpu "${KERNEL_TESTS[@]}"; }
phase_cli() { run_tests gpu 'cli-*'; }
phase_tests() { run_tests all "${GPU_TESTS[@]}"; }

# run_tests gpu|all PATTERN...: the binaries matching the patterns, then (all) every other one.
run_tests() {
  local ordered=() t pat log which=$1
  shift
  for pat in "$@"; do
    for t in "$BIN"/tests/$pat; do
      [ -e "$t" ] && ordered+=("$t")
    done
  done
  if [ "$which" = all ]; then
    for t in "$BIN"/tests/*; do
      case " ${ordered[*]} " in
        *" $t "*) ;;
        *) ordered+=("$t") ;;
      esac
    done
  fi
  for t in "${ordered[@]}"; do
    name="$(basename "$t")"
    budget_for "$name" "$TEST_TIMEOUT" || continue
    echo "== $name"
    log="$LOGS/test-$name.log"
    run_for "$STEP_SECS" "$t" > "$log" 2>&1
    if outcome "$name" $? "log: $log"; then
      grep -E '^test result:' "$log" | tail -n 1
    else
      # A cut binary's last lines name the tests that had not finished.
      grep -E '^test .*( \.\.\. *$|has been running)' "$log" | tail -n 5
      grep -E '^(test .* FAILED|---- |thread .* panicked)' "$log" | awk '!seen[$0]++' | head -n 40
    fi
    save_logs
  done
  if budget_for "mvar info" 60; then
    echo "== mvar info"
    run_for "$STEP_SECS" "$BIN/mvar" info 2>&1 | tee "$LOGS/mvar-info.log"
  fi
}

phase_benches() {
  # Criterion's own files (reports, baselines) stay out of $OUT; its printed figures are logged.
  # MVAR_BENCH_DEVICES=cuda: the CPU cases' inputs are not even made.
  export CRITERION_HOME="${TMPDIR:-/tmp}/mvar-criterion"
  local b status
  for b in "$BIN"/benches/*; do
    name="bench $(basename "$b")"
    budget_for "$name" "$STEP_TIMEOUT" || continue
    echo "== $name (CUDA cases, at most $STEP_SECS s)"
    MVAR_BENCH_DEVICES=cuda run_for "$STEP_SECS" "$b" --bench --noplot --warm-up-time 0.2 --measurement-time 0.6 \
      --sample-size 10 "$BENCH_FILTER" > "$LOGS/bench-$(basename "$b").log" 2>&1
    status=$?
    grep -E 'time:|thrpt:|^[a-z0-9_]+/' "$LOGS/bench-$(basename "$b").log" || true
    outcome "$name" "$status" "the figures above are the cases it finished"
  done
}

phase_torch() {
  echo "== benches/torch_reference.py"
  if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "skipped: python3 cannot import torch with CUDA here"
    return
  fi
  budget_for torch_reference.py "$STEP_TIMEOUT" || return
  PYTHONUNBUFFERED=1 run_for "$STEP_SECS" python3 "$HERE/../benches/torch_reference.py" \
    --only "$BENCH_FILTER" --json "$LOGS/torch-reference.jsonl" 2>&1 | tee "$LOGS/torch-reference.log"
  outcome torch_reference.py "${PIPESTATUS[0]}" "its JSON holds the cases it finished"
  # With the benches phase's log (this call or an earlier one): both, side by side, in markdown.
  for log in "$LOGS"/bench-*.log; do
    [ -f "$log" ] || continue
    python3 "$HERE/../benches/compare.py" "$log" "$LOGS/torch-reference.jsonl" --all \
      > "$LOGS/comparison.md" && echo "wrote $LOGS/comparison.md" && cat "$LOGS/comparison.md"
  done
}

phase_model() {
  budget_for "mvar bench" "$STEP_TIMEOUT" || return
  echo "== mvar bench (VAR-d16 and MVAR-d16, batch 32; at most $STEP_SECS s)"
  run_for "$STEP_SECS" "$BIN/mvar" bench --model var-d16 --model mvar-d16 --steps 10 \
    --json "$LOGS/mvar-bench.jsonl" 2>&1 | tee "$LOGS/mvar-bench.log"
  outcome "mvar bench" "${PIPESTATUS[0]}"
  # MVAR-d16's training step again with the ring-staged neighbourhood-attention kernels
  # (MVAR_NA_STAGING=ring; the bench twins time the kernels alone).
  budget_for "mvar bench (ring)" 120 || return
  echo "== mvar bench MVAR-d16 training, MVAR_NA_STAGING=ring (at most $STEP_SECS s)"
  MVAR_NA_STAGING=ring run_for "$STEP_SECS" "$BIN/mvar" bench --model mvar-d16 --what train --steps 10 \
    --json "$LOGS/mvar-bench-ring.jsonl" 2>&1 | tee "$LOGS/mvar-bench-ring.log"
  outcome "mvar bench (ring)" "${PIPESTATUS[0]}"
  # Both models' training step with activation recomputation (--recompute-activations): the
  # memory it saves and the time it costs on the GPU, against the plain figures above.
  budget_for "mvar bench (recompute)" 150 || return
  echo "== mvar bench VAR-d16 and MVAR-d16 training, --recompute-activations (at most $STEP_SECS s)"
  run_for "$STEP_SECS" "$BIN/mvar" bench --model var-d16 --model mvar-d16 --what train --steps 5 \
    --recompute-activations --json "$LOGS/mvar-bench-recompute.jsonl" 2>&1 | tee "$LOGS/mvar-bench-recompute.log"
  outcome "mvar bench (recompute)" "${PIPESTATUS[0]}"
  # Sampling with the whole batch decoded in one pass, as the official sampler does (the run
  # above decodes in passes of a few images): what the passes save in memory and cost in time.
  budget_for "mvar bench (whole-batch decode)" 90 || return
  echo "== mvar bench VAR-d16 and MVAR-d16 sampling, --decode-batch 32 (at most $STEP_SECS s)"
  run_for "$STEP_SECS" "$BIN/mvar" bench --model var-d16 --model mvar-d16 --what sample --decode-batch 32 \
    --json "$LOGS/mvar-bench-decode32.jsonl" 2>&1 | tee "$LOGS/mvar-bench-decode32.log"
  outcome "mvar bench (whole-batch decode)" "${PIPESTATUS[0]}"
  # The released tokenizer's training step (f32, as `mvar train-tokenizer` trains), batch 8 at
  # 256 px: the convolutions' share of a GPU run, which no test times.
  budget_for "mvar bench (tokenizer)" 90 || return
  echo "== mvar bench tokenizer training step, released shape, batch 8 (at most $STEP_SECS s)"
  run_for "$STEP_SECS" "$BIN/mvar" bench --what tokenizer --batch 8 --steps 5 \
    --json "$LOGS/mvar-bench-tokenizer.jsonl" 2>&1 | tee "$LOGS/mvar-bench-tokenizer.log"
  outcome "mvar bench (tokenizer)" "${PIPESTATUS[0]}"
  # A timeline of the same models (few steps, one sampling batch) for Perfetto: the ops on the
  # host and their kernels on the GPU track (MVAR_PROFILE=trace), to see where a step's time
  # goes. Separate from the figures above: reading the GPU times adds a device sync per batch.
  budget_for "timeline" 180 || return
  echo "== timeline of a VAR-d16 and MVAR-d16 step and sampling batch (at most $STEP_SECS s)"
  MVAR_PROFILE="trace=$LOGS/timeline-d16.json" run_for "$STEP_SECS" "$BIN/mvar" bench \
    --model var-d16 --model mvar-d16 --steps 2 --sample-reps 1 > "$LOGS/timeline-d16.log" 2>&1
  outcome "timeline" "$?" "log: $LOGS/timeline-d16.log" && grep -E '^trace' "$LOGS/timeline-d16.log"
}

# Nsight Compute's command line: on the PATH, else where NVIDIA's installers put it.
find_ncu() {
  local c
  command -v ncu 2>/dev/null && return 0
  for c in /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda-*/bin/ncu; do
    [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

NCU_DEFAULT_CASES='cuda/na2d k7 fwd\+bwd \[64,16,16,16,64\] bf16$|^na2d_|3|3
cuda/na2d k7 fwd\+bwd \[64,16,16,16,64\] bf16 staged in a ring$|^na2d_|3|3
cuda/na2d k7 fwd\+bwd \[64,16,13,13,64\] bf16$|^na2d_|3|3
cuda/block-causal fwd\+bwd \[8,16,680,64\] bf16$|^attn_|4|4
cuda/decode fwd q \[64,16,256,64\] kv 680 bf16$|^attn_|2|1'

phase_ncu() {
  local ncu bench filter kernels skip count n=0 status rep
  if ! ncu="$(find_ncu)"; then
    echo "skipped: no ncu (Nsight Compute) on this machine"
    return
  fi
  bench="$(ls "$BIN"/benches/ops-* 2>/dev/null | head -n 1)"
  [ -n "$bench" ] || { echo "ncu: no bench binary in the bundle"; failed+=("ncu"); return; }
  echo "ncu: $ncu ($("$ncu" --version 2>/dev/null | tail -n 1))"
  mkdir -p "$WORK/ncu"
  rm -f "$LOGS"/ncu-*.csv "$LOGS"/ncu-*.txt "$LOGS/ncu-summary.md"
  while IFS='|' read -r filter kernels skip count; do
    [ -n "$filter" ] || continue
    n=$((n + 1))
    # A spent budget or a failed case ends the loop, not the phase: the summary of the cases
    # that ran is still written.
    budget_for "ncu case $n" 240 || break
    echo "== ncu case $n: bench '$filter', kernels /$kernels/, launches $((skip + 1))..$((skip + count)) (at most $STEP_SECS s)"
    rep="$WORK/ncu/ncu-$n"
    rm -f "$rep.ncu-rep"
    # --clock-control none: the clocks as the benches run them (the device notes ask to leave
    # them alone). --profile-time: criterion runs the case without its statistics.
    MVAR_BENCH_DEVICES=cuda run_for "$STEP_SECS" "$ncu" --clock-control none --target-processes all \
      --kernel-name "regex:$kernels" --launch-skip "$skip" --launch-count "$count" \
      --section SpeedOfLight --section LaunchStats --section Occupancy --section SchedulerStats \
      --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section SourceCounters --export "$rep" --force-overwrite \
      "$bench" --bench --noplot --profile-time 2 "$filter" > "$LOGS/ncu-$n.log" 2>&1
    status=$?
    if [ ! -f "$rep.ncu-rep" ]; then
      grep -E '==(ERROR|WARNING)==' "$LOGS/ncu-$n.log" | head -n 5
      outcome "ncu case $n" "$((status == 0 ? 1 : status))" "no report written; log: $LOGS/ncu-$n.log"
      # A profiler error (counters it cannot read) ends the phase; a case whose filter matched
      # no launch does not.
      if grep -q '==ERROR==' "$LOGS/ncu-$n.log"; then break; else continue; fi
    fi
    outcome "ncu case $n" "$status" "log: $LOGS/ncu-$n.log"
    "$ncu" --import "$rep.ncu-rep" > "$LOGS/ncu-$n.txt" 2>&1
    "$ncu" --import "$rep.ncu-rep" --page raw --csv > "$LOGS/ncu-$n.csv" 2>&1
    grep -cE '^  [A-Za-z_][A-Za-z0-9_]* \(' "$LOGS/ncu-$n.txt" | sed 's/^/kernel launches profiled: /'
    save_logs
  done <<< "${MVAR_NCU_CASES:-$NCU_DEFAULT_CASES}"
  if ls "$LOGS"/ncu-*.csv >/dev/null 2>&1; then
    python3 "$HERE/../tools/ncu_summary.py" "$LOGS"/ncu-*.csv > "$LOGS/ncu-summary.md" \
      && echo "wrote $LOGS/ncu-summary.md" && cat "$LOGS/ncu-summary.md"
  fi
}

for p in "${PHASES[@]}"; do
  start=$SECONDS
  "phase_$p"
  echo "== phase $p: $((SECONDS - start)) s"
  save_logs
done

status=0
if [ "${#failed[@]}" -gt 0 ]; then
  echo "FAILED: ${failed[*]}"
  status=1
fi
if [ "${#not_run[@]}" -gt 0 ]; then
  echo "NOT RUN (MVAR_RUN_SECONDS=$RUN_SECONDS spent): ${not_run[*]}"
  status=1
fi
[ "$status" -ne 0 ] || echo "all phases passed: ${PHASES[*]}"
echo "== $SECONDS s in all"
exit "$status"
RUN
chmod +x "$BUNDLE/run-all.sh"

# What a GPU machine is sent: the tracked files of the repository and this folder.
tree_bytes=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
bundle_bytes=$(du -sb "$BUNDLE" | cut -f1)
size_mb=$(( (tree_bytes + bundle_bytes) / 1000000 ))
echo "== $BUNDLE: ${#TESTS[@]} test binaries, ${#BENCHES[@]} bench binary and mvar (payload.tar.xz)," \
  "$( [ -f "$BUNDLE/fixtures.tar.xz" ] && echo "the fixture set (fixtures.tar.xz)," )" \
  "$((bundle_bytes / 1000000)) MB; with the repository's tracked files ${size_mb} MB"
if [ "$size_mb" -ge "$LIMIT_MB" ]; then
  echo "gpu-test.sh: ${size_mb} MB to send, over the ${LIMIT_MB} MB limit" >&2
  exit 1
fi
echo "On the GPU machine, from the repository root, run (all phases, or some of them per call):"
echo "  bash $BUNDLE/run-all.sh [tests|gpu-tests|kernel-tests|cli] [benches] [torch] [model] [ncu]"
echo "with MVAR_RUN_SECONDS=N in front to end the call, logs saved, within N seconds."
