"""Static instruction budget of the CUDA core: SASS instructions per pixel of the fused
kernel, for fp32 / bf16 / fp16 logits x {max_logit; 4 methods (max_logit, msp, energy,
entropy); 6 methods} at C = 19. Needs nvcc and cuobjdump (+ nvdisasm, which cuobjdump
calls; the pip packages nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm provide both), no GPU.

    python bench/sass_budget.py                 # the working tree, default build (-fmad=false)
    python bench/sass_budget.py --fast          # the opt-in fast mode (ANOMFAST_CUDA_FAST)
    python bench/sass_budget.py --rev 4c5f76f   # csrc/ of a commit (e.g. before a change)

How it estimates. One thread handles one pixel per turn of the grid-stride loop (since
the pixel groups, PX = 2 neighbouring pixels, 4 for max_logit alone and for fp16 / bf16
with the 4-method sets, for contiguous
logits with W a multiple of PX and C = 19: the measured case), so the instructions one
thread issues per turn divided by its pixels are the instructions per pixel (a warp
issues them once for 32 turns). For each case the script:
  1. copies csrc/ and compiles fused_cuda.cu for sm_90 (nvcc -cubin -O3, -fmad=false or,
     with --fast, the fast mode's flags) with a *probe*: the kernel's parameter struct is
     overwritten at kernel entry with the case's launch-uniform run-time values (method
     codes and count, histogram on, no coordinate maps, uint8 labels, tie signatures of
     the exact methods, warp aggregation mode 1, T = 1, the 32-bit pixel index of the
     4c5f76f kernel), so that branches on them fold away as they would in a fully
     specialized kernel; the class count C stays what the kernel itself knows (a
     run-time value unless the kernel is specialized for C = 19);
  2. takes the kernel instantiation the host dispatch picks for that dtype / C / method
     set and contiguous logits (pick_kernel below), disassembles it (cuobjdump -sass) and
     counts the instructions between the head of the grid-stride loop and its back-edge (the
     widest backward branch), NOPs excluded.
So data-dependent branches (pixel in range, label class, non-finite logits, the warp's
histogram aggregation) count both sides, inner loops count once (the tie-signature OR
loop runs only when lanes share a bin), and out-of-line slow paths (a division's special
cases, the exact non-finite recheck) are not counted. Launch-uniform branches that the
probe folds cost the real kernel about two instructions each (uniform compare + branch),
the label dtype's switch about six (a jump table). The "static loop" column is the same
loop counted in the unprobed kernel (every run-time mode's code included: an upper
bound); "kernel total" is the whole kernel.

The last line reads `sass fp32_4methods N1 fp32_maxlogit N2 bf16_4methods N3`.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"fp32": 0, "fp16": 1, "bf16": 2}
# method codes (csrc/common/views.h): max_logit 0, msp 1, energy 2, sml 3, entropy 4, gen 5
SETS = {"maxlogit": [0], "4methods": [0, 1, 2, 4], "6methods": [0, 1, 2, 3, 4, 5]}
EXACT = {0}  # methods whose tie signatures the library keeps (methods.EXACT_COORDINATES: max_logit)
C = 19


def find_tool(name):
    hit = shutil.which(name)
    if hit:
        return hit
    for base in [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"] + sys.path:
        for cand in glob.glob(os.path.join(base, "bin", name)) + glob.glob(os.path.join(base, "nvidia", "cu*", "bin", name)):
            if os.access(cand, os.X_OK):
                return cand
    return None


def source_tree(rev, tmp):
    """csrc/ of the working tree or of commit `rev`, copied to tmp/csrc."""
    dst = os.path.join(tmp, "csrc")
    if rev is None:
        shutil.copytree(os.path.join(ROOT, "csrc"), dst)
    else:
        tar = subprocess.run(["git", "-C", ROOT, "archive", rev, "csrc"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=tar, check=True)
    return dst


def probe_source(text, methods):
    """fused_cuda.cu with the case's launch-uniform values written over the kernel's
    parameters at entry (see the module docstring)."""
    sig = sum(1 << j for j, m in enumerate(methods) if m in EXACT)
    sets = [f"P.a.n_methods = {len(methods)};"] + [f"P.a.methods[{j}] = {m};" for j, m in enumerate(methods)]
    sets += [f"P.sig_mask = {sig};", "P.a.sig_mask = P.sig_mask;", "P.agg = 1;", "P.with_hist = true;",
             "P.a.maps_ptr = 0;", "P.a.label_dtype = 10;", "P.a.temperature = 1.0f;", "P.a.entropy_normalize = 0;", "P.lut_shared = true;"]
    if re.search(r"\bbyte_classes\b", text.split("struct FusedParams", 1)[1].split("};", 1)[0]):
        # uint8 labels: the classes of all byte values staged (fused_cuda.cu: stage_byte_classes)
        sets += ["P.byte_classes = true;", "P.lut_shared = false;"]
    if re.search(r"\bbool\b[^;]*\bidx32\b", text.split("struct FusedParams", 1)[1].split("};", 1)[0]):
        sets.append("P.idx32 = true;")
    if "slot[MAX_METHODS]" in text:  # the specialized kernels: kinds requested and each kind's output index
        sets.append(f"P.kinds = {sum(1 << m for m in methods)};")
        sets += [f"P.slot[{m}] = {j};" for j, m in enumerate(methods)]
    if "Needs nd;" in text:  # the kernel of 4c5f76f and earlier: which sums to accumulate
        s1 = any(m in (1, 2, 4, 5) for m in methods)
        sets.append(f"P.nd = Needs{{{str(s1).lower()}, false, {str(4 in methods).lower()}, {str(5 in methods).lower()}}};")
    probe = ("__device__ __forceinline__ FusedParams sass_probe(FusedParams P) {\n  " + "\n  ".join(sets) +
             "\n  return P;\n}\n")
    head = re.search(r"fused_kernel\(const FusedParams P\)\s*\{", text)
    if head is None:
        raise SystemExit("sass_budget: cannot find `fused_kernel(const FusedParams P) {` in fused_cuda.cu")
    decl = text.rfind("template", 0, head.start())
    text = (text[:decl] + probe + text[decl:head.start()] + "fused_kernel(const FusedParams P_probe) {\n"
            "  const FusedParams P = sass_probe(P_probe);" + text[head.end():])
    return text


def compile_sass(csrc, text, fast, tmp, tag, nvcc, cuobjdump):
    src = os.path.join(csrc, "cuda", f"probe_{tag}.cu")
    with open(src, "w") as f:
        f.write(text)
    cubin = os.path.join(tmp, f"{tag}.cubin")
    flags = ["-fmad=true", "-DANOMFAST_CUDA_FAST=1"] if fast else ["-fmad=false"]
    cmd = [nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", *flags, "-o", cubin, src]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"sass_budget: nvcc failed:\n{' '.join(cmd)}\n{r.stderr[-3000:]}")
    env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"sass_budget: cuobjdump failed: {r.stderr[-2000:]}")
    return parse_functions(r.stdout)


INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_functions(sass):
    """{mangled name: [(address, instruction text)]}"""
    funcs, cur = {}, None
    for line in sass.splitlines():
        if "Function :" in line:
            cur = funcs.setdefault(line.split("Function :", 1)[1].strip(), [])
            continue
        m = INSN.match(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def template_args(name):
    m = re.search(r"12fused_kernelI((?:Li-?\d+E)+)E", name)
    return tuple(int(v) for v in re.findall(r"Li(-?\d+)E", m.group(1))) if m else None


def pick_kernel(funcs, dt, methods):
    """The instantiation with_kernel_config (fused_cuda.cu) launches for this dtype, C = 19,
    method set and contiguous (B, C, H, W) logits with W a multiple of 4:
    fused_kernel<DT, CR> (4c5f76f: CR = 32 register path), fused_kernel<DT, CK, MASK>
    (CK = 19 when specialized; MASK = the set's method-kind bits when instantiated, else
    the generic ALL mask) or, since the pixel groups (specialized C only),
    fused_kernel<DT, 19, MASK, PX> with PX = 4 or 2 neighbouring pixels a turn (the
    largest the set has). Returns (template args, name, pixels per turn)."""
    kinds = sum(1 << m for m in set(methods))
    cands = {template_args(n): n for n in funcs if template_args(n) and template_args(n)[0] == dt}
    for want in ((dt, 32), (dt, C, kinds, 4), (dt, C, 63, 4), (dt, C, kinds, 2), (dt, C, 63, 2),
                 (dt, C, kinds), (dt, C, 63), (dt, 0, kinds), (dt, 0, 63)):
        if want in cands:
            return want, cands[want], (want[3] if len(want) == 4 else 1)
    raise SystemExit(f"sass_budget: no fused_kernel for dtype {dt} among {sorted(cands)}")


def loop_count(insns, dump=None):
    """Instructions (NOP excluded) between the widest backward branch's target and itself."""
    best = None
    for addr, txt in insns:
        m = re.search(r"\bBRA(?:\.\S+)?\s+(?:`\(\S+\)\s*)?0x([0-9a-f]+)", txt)
        if m and int(m.group(1), 16) < addr:
            span = (int(m.group(1), 16), addr)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    if best is None:
        raise SystemExit("sass_budget: no loop found in the kernel")
    body = [(a, t) for a, t in insns if best[0] <= a <= best[1] and "NOP" not in t.split()[:2]]
    if dump:
        with open(dump, "w") as f:
            f.write("\n".join(f"{a:06x}  {t}" for a, t in body) + "\n")
    return len(body)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rev", help="git revision whose csrc/ to measure (default: the working tree)")
    ap.add_argument("--fast", action="store_true", help="the opt-in fast mode (-DANOMFAST_CUDA_FAST=1 -fmad=true)")
    ap.add_argument("--json", help="write the table here too")
    ap.add_argument("--dump", help="write each case's counted loop (SASS) into this folder")
    ap.add_argument("--only", help="comma-separated method sets to measure (default: all)")
    args = ap.parse_args()
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        raise SystemExit(f"sass_budget: needs nvcc ({nvcc}) and cuobjdump ({cuobjdump}); "
                         "pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm provides the latter")
    rows = {}
    with tempfile.TemporaryDirectory(prefix="sass_budget_") as tmp:
        csrc = source_tree(args.rev, tmp)
        with open(os.path.join(csrc, "cuda", "fused_cuda.cu")) as f:
            text = f.read()
        plain = compile_sass(csrc, text, args.fast, tmp, "plain", nvcc, cuobjdump)
        only = args.only.split(",") if args.only else list(SETS)
        if set(only) - set(SETS):
            ap.error(f"--only: unknown method set(s) {sorted(set(only) - set(SETS))}; known: {', '.join(SETS)}")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
        for sname, methods in ((k, v) for k, v in SETS.items() if k in only):
            funcs = compile_sass(csrc, probe_source(text, methods), args.fast, tmp, sname, nvcc, cuobjdump)
            for dname, dt in DTYPES.items():
                targs, name, px = pick_kernel(funcs, dt, methods)
                _, pname, _ = pick_kernel(plain, dt, methods)
                loop = loop_count(funcs[name], args.dump and os.path.join(args.dump, f"{dname}_{sname}.sass"))
                rows[f"{dname}_{sname}"] = {"kernel": f"fused_kernel<{', '.join(map(str, targs))}>",
                                            "per_pixel": round(loop / px), "pixels_per_turn": px,
                                            "static_loop": loop_count(plain[pname]),
                                            "kernel_total": len(plain[pname])}
    what = f"rev {args.rev}" if args.rev else "working tree"
    print(f"SASS instructions per pixel, sm_90, C = {C}, {what}, {'fast mode' if args.fast else 'default build'}")
    print(f"{'case':<16} {'kernel':<27} {'px/turn':>7} {'per pixel':>9} {'static loop':>11} {'kernel total':>12}")
    for k, r in rows.items():
        print(f"{k:<16} {r['kernel']:<27} {r['pixels_per_turn']:>7} {r['per_pixel']:>9} {r['static_loop']:>11} "
              f"{r['kernel_total']:>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rev": args.rev, "fast": args.fast, "rows": rows}, f, indent=1)
    if len(rows) < 9:
        return
    print(f"sass fp32_4methods {rows['fp32_4methods']['per_pixel']} fp32_maxlogit {rows['fp32_maxlogit']['per_pixel']} "
          f"bf16_4methods {rows['bf16_4methods']['per_pixel']}")


if __name__ == "__main__":
    main()
