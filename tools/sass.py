#!/usr/bin/env python3
"""Static look at the machine code of our kernels, without a GPU.

Compiles one file of cuda/kernels as the engine does (common.cuh in front, our headers inlined,
the same NVRTC options) to a CUBIN for an architecture, disassembles it with nvdisasm and prints,
per kernel, its instruction count, indirect branches (BRX), special-function ops (MUFU),
barriers and ptxas's register/spill line; with --body, one kernel's SASS.

    tools/sass.py elementwise.cu                     # every kernel of the file, sm_90
    tools/sass.py softmax.cu --arch sm_80 --only warp
    tools/sass.py elementwise.cu --body unary_fwd_vec_bf16
    tools/sass.py na2d.cu --only dkdv_mma_bf16_d64 --loops   # each loop's size and its HMMA

Why: without a GPU these counts are the evidence a change can have (a switch left inside a loop,
a division per element, a spill); they are counts, not times. Needs NVRTC 13 (the pip wheels
.ci/run installs under ~/.cache/mvar-ci/nvrtc-13.0) and nvdisasm (the nvidia-cuda-nvdisasm
wheel, installed next to it on first use).
"""
import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "cuda", "kernels")
CACHE = os.environ.get("MVAR_CI_CACHE", os.path.expanduser("~/.cache/mvar-ci"))
NVRTC = os.path.join(CACHE, "nvrtc-13.0", "nvidia", "cu13")
NVDISASM_DIR = os.path.join(CACHE, "nvdisasm-13")
HEADERS = ("mma.cuh", "cubic.cuh")  # the headers cuda/src/kernels.rs inlines


def full_source(name):
    parts = [open(os.path.join(KERNELS, "common.cuh")).read()]
    for line in open(os.path.join(KERNELS, name)).read().splitlines():
        m = re.match(r'\s*#include\s+"([^"]+)"', line)
        parts.append(open(os.path.join(KERNELS, m.group(1))).read() if m and m.group(1) in HEADERS else line)
    return "\n".join(parts) + "\n"


def compile_cubin(name, arch):
    lib_dir = os.path.join(NVRTC, "lib")
    if not os.path.exists(os.path.join(lib_dir, "libnvrtc.so.13")):
        sys.exit(f"sass.py: no NVRTC 13 under {lib_dir}; run .ci/run once (it installs the wheels)")
    # The builtins library is loaded by name: preload it from the same folder.
    ctypes.CDLL(os.path.join(lib_dir, "libnvrtc-builtins.so.13.0"), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(os.path.join(lib_dir, "libnvrtc.so.13"))
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), full_source(name).encode(), name.encode(), 0, None, None):
        sys.exit("sass.py: nvrtcCreateProgram failed")
    # The options of cuda/src/compile.rs.
    opts = [f"--gpu-architecture={arch}", "--std=c++17", "--ptxas-options=-v", "-lineinfo",
            f"--include-path={os.path.join(NVRTC, 'include')}"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if rc:
        sys.exit(f"sass.py: {name} did not compile for {arch}:\n{log.value.decode()}")
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetCUBIN(prog, cubin)
    return cubin.raw, log.value.decode()


def nvdisasm():
    exe = os.path.join(NVDISASM_DIR, "nvidia", "cu13", "bin", "nvdisasm")
    if not os.path.exists(exe):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--root-user-action=ignore",
                        "--target", NVDISASM_DIR, "nvidia-cuda-nvdisasm==13.*"], check=True)
    return exe


def functions(sass):
    """Per kernel, its instruction lines and {label: address of the instruction after it}."""
    funcs, labels, cur = {}, {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.text\.(\S+):", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            labels[m.group(1)] = {}
            pending = []
        elif cur is not None and re.search(r"/\*[0-9a-f]{4,}\*/", line):
            cur.append(line)
            for label in pending:
                labels[list(funcs)[-1]][label] = address(line)
            pending = []
        elif cur is not None and re.match(r"\s*\.L_x_\d+:", line):
            pending.append(line.strip().rstrip(":"))
    return funcs, labels


def address(line):
    return int(re.search(r"/\*([0-9a-f]{4,})\*/", line).group(1), 16)


def loops(body, labels):
    """The loops of a kernel: (first address, last address, instructions, HMMA, MUFU) for every
    backward branch, innermost (shortest) first. A count, not a trip count or a time."""
    out = set()
    for line in body:
        m = re.search(r"\bBRA\b.*`\((\.L_x_\d+)\)", line)
        if m and m.group(1) in labels and labels[m.group(1)] <= address(line):
            lo, hi = labels[m.group(1)], address(line)
            span = [l for l in body if lo <= address(l) <= hi]
            count = lambda p: sum(1 for l in span if re.search(p, l))
            out.add((lo, hi, len(span), count(r"\bHMMA\b"), count(r"\bMUFU\.")))
    return sorted(out, key=lambda t: t[2])


def ptxas_lines(log):
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = m.group(1)
        elif cur and ("registers" in line or "spill" in line):
            text = re.sub(r"\s+", " ", re.sub(r"^ptxas\s+(info\s+:)?\s*\.?", "", line.strip()))
            out[cur] = (out.get(cur, "") + "; " + text).strip("; ")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", help="a file of cuda/kernels, e.g. softmax.cu")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--only", default="", help="a regex the kernel names must match")
    ap.add_argument("--body", help="print this kernel's SASS")
    ap.add_argument("--loops", action="store_true", help="also list each kernel's loops (backward branches)")
    a = ap.parse_args()
    cubin, log = compile_cubin(a.file, a.arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([nvdisasm(), "-c", f.name], capture_output=True, text=True, check=True).stdout
    (funcs, labels), regs = functions(sass), ptxas_lines(log)
    if a.body:
        if a.body not in funcs:
            sys.exit(f"sass.py: no kernel {a.body} in {a.file} (kernels: {', '.join(sorted(funcs))})")
        print("\n".join(funcs[a.body]))
        return
    for name in sorted(funcs):
        if not re.search(a.only, name) or name.startswith("$"):
            continue
        body = funcs[name]
        brx, mufu, bar = (sum(1 for line in body if re.search(p, line)) for p in (r"\bBRX\b", r"\bMUFU\.", r"\bBAR\."))
        print(f"{name}: {len(body)} instructions, BRX {brx}, MUFU {mufu}, BAR {bar}; {regs.get(name, '')}")
        if a.loops:
            for lo, hi, n, hmma, mu in loops(body, labels[name]):
                print(f"    loop {lo:#06x}..{hi:#06x}: {n} instructions, HMMA {hmma}, MUFU {mu}")


if __name__ == "__main__":
    main()
