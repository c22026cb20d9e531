#!/usr/bin/env bash
# Runs a command against mvar's CUDA emulator (cuda/emu): a libcuda, libnvrtc and libcublas that
# execute the project's CUDA kernels on the CPU, so the whole GPU path (launch code, kernels, cuBLAS
# calls, the caching allocator) can be tested on a machine without a GPU. It checks what the
# kernels compute, never how fast; figures taken under it mean nothing.
#
#   tools/cuda-emu.sh cargo test --test parity        # the CUDA parity tests, on the emulator
#   tools/cuda-emu.sh --build-only                    # just build the libraries
#   tools/cuda-emu.sh --self-test                     # check the emulator's adversarial modes
#
# Adversarial modes (cuda/emu/device.h, `Modes`): MVAR_EMU_SCHEDULE=reverse runs a block's threads
# last-to-first between barriers, MVAR_EMU_CP_ASYNC=deferred lands each cp.async only at the
# wait_group that forces it. A missing barrier or wait then reads stale or NaN shared memory in one
# of the two schedules, so CI runs the parity tests in both.
#
# Checks on by default (MVAR_EMU_SANITIZE=0 turns the compiled ones off): kernels are compiled
# with g++'s trapping sanitizers for misaligned accesses (a float4 or uint4 access at an address
# that is not 16-byte aligned faults on the GPU, not on x86), indexes past fixed-size shared or
# local arrays and other undefined operations; the emulated cp.async and ldmatrix check their
# alignment and that they stay inside the dynamic shared memory. A failed check ends the process
# with a message naming the kernel. A block with more threads than the kernel's
# __launch_bounds__, or more than 256 without them, is refused as a GPU may refuse it, and so is
# static plus dynamic shared memory past what a GPU block may have. Device
# buffers start NaN-filled and end at a guard page (MVAR_EMU_GUARD=front: start after one).
#
# MVAR_EMU_FMA=1 (or auto: where the CPU can) builds the kernels with FMA contraction, as NVRTC
# does (see below).
#
# MVAR_EMU_KERNELS=skip is the host-cost mode: launches and GEMMs are checked and counted but not
# run (device copies and memsets neither), device memory starts zeroed, so a program's host side
# runs alone on meaningless finite data. The wall time of, say, `mvar bench --what train` is then
# what the engine's host code costs per step on this CPU (not the real driver's cost per launch);
# at exit the emulator prints the launches, GEMM calls, synchronisations and copies it saw
# (MVAR_EMU_STATS=1 prints them in the normal mode too):
#
#   MVAR_EMU_KERNELS=skip tools/cuda-emu.sh target/release/mvar bench --model mvar-d16 --what train
#
# Needs g++ (C++20). Libraries go to target/cuda-emu/lib, built modules to target/cuda-emu/modules.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
EMU_SRC="$ROOT/cuda/emu"
OUT="${CARGO_TARGET_DIR:-$ROOT/target}/cuda-emu"
CXX="${MVAR_EMU_CXX:-g++}"
if ! command -v "$CXX" >/dev/null; then
  echo "cuda-emu: $CXX not found; the CUDA emulator needs a C++20 compiler" >&2
  exit 2
fi
mkdir -p "$OUT/lib" "$OUT/modules" "$OUT/kernels"
FLAGS=(-std=c++20 -O2 -g -shared -fPIC -fvisibility=hidden -pthread -I"$EMU_SRC"
       "-DMVAR_EMU_DEVICE_H=\"$EMU_SRC/device.h\"")
build() {  # name source: rebuilt when any emulator source is newer than the library
  local lib="$OUT/lib/$1"
  if [ ! -e "$lib" ] || [ -n "$(find "$EMU_SRC" -newer "$lib" -print -quit)" ]; then
    "$CXX" "${FLAGS[@]}" -o "$lib.tmp" "$EMU_SRC/$2" -ldl && mv "$lib.tmp" "$lib"
  fi
}
build libcuda.so driver.cpp
build libnvrtc.so nvrtc.cpp
build libcublas.so cublas.cpp
[ "${1:-}" = "--build-only" ] && { echo "cuda-emu: libraries in $OUT/lib"; exit 0; }
if [ "${1:-}" = "--self-test" ]; then
  "$CXX" -std=c++20 -O1 -g -pthread -DMVAR_CUDA_EMU -I"$EMU_SRC" "-DMVAR_EMU_DEVICE_H=\"$EMU_SRC/device.h\"" \
    -o "$OUT/selftest" "$EMU_SRC/selftest.cpp"
  for schedule in forward reverse; do
    for copies in eager deferred; do
      MVAR_EMU_SCHEDULE=$schedule MVAR_EMU_CP_ASYNC=$copies "$OUT/selftest" "$OUT/lib/libcuda.so"
    done
  done
  exit 0
fi
export LD_LIBRARY_PATH="$OUT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MVAR_EMU_CACHE="$OUT/modules"
export MVAR_KERNEL_CACHE="$OUT/kernels"
export MVAR_EMU_CXX="$CXX"
export MVAR_EMU_SANITIZE="${MVAR_EMU_SANITIZE:-1}"
# MVAR_EMU_FMA=1: kernels are built with FMA contraction (a * b + c as one fused operation), as
# NVRTC builds them for the GPU by default; a result that holds only when every product is rounded
# on its own (a cancellation that fusing turns into a rounding error) then fails here too.
# MVAR_EMU_FMA=auto does so where the CPU has FMA instructions and says so where it has not.
case "${MVAR_EMU_FMA:-0}" in
  0) fma=0 ;;
  1|auto)
    if grep -qw fma /proc/cpuinfo 2>/dev/null; then
      fma=1
    elif [ "$MVAR_EMU_FMA" = auto ]; then
      echo "cuda-emu: this CPU has no FMA instructions: kernels built without contraction" >&2
      fma=0
    else
      echo "cuda-emu: MVAR_EMU_FMA=1 needs a CPU with FMA instructions" >&2
      exit 2
    fi
    ;;
  *) echo "cuda-emu: MVAR_EMU_FMA takes 0, 1 or auto (got '$MVAR_EMU_FMA')" >&2; exit 2 ;;
esac
[ "$fma" = 0 ] || export MVAR_EMU_OPT="${MVAR_EMU_OPT:--O2} -mfma -ffp-contract=fast"
export MVAR_CUDA_EMU=1
unset MVAR_CUDA_INCLUDE
exec "$@"
