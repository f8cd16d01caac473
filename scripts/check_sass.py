"""Reads the built extension's machine code and checks the tensor-core attention kernels.

For each architecture asked for (default sm_80 and sm_90), every flash attention kernel
(fp16 / bf16, contiguous and paged keys, both position types) must contain
- HMMA (mma.sync on the tensor cores), LDSM (ldmatrix) and LDGSTS (cp.async), and
- no local memory: no LDL / STL instructions and a zero stack frame (no register spills).
Kernels of the 32-rows-per-warp shape (flash_m32) are reported but not required to be
spill-free (see FlashTraits in csrc/kernels/attention/params.h).

Also prints the resource usage (registers, shared memory, stack) of every attention kernel:
the report the design note quotes.

    python scripts/check_sass.py cacheblend_ext/_C*.so [--cuobjdump PATH] [--arch sm_80 --arch sm_90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

REQUIRED = ("HMMA", "LDSM", "LDGSTS")


def _cuobjdump(path: str | None) -> str:
    if path:
        return path
    import triton  # ships cuobjdump (the CUDA toolkit here is minimal)

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
        return dict(zip(names, out.splitlines()))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def _short(demangled: str) -> str:
    """'flash<bf16, int64, D=128, 16 rows/warp, PagedKeys>' from a demangled name."""
    m = re.search(r"(sparse_query_attention_\w+)<(.*)>\(", demangled)
    if not m:
        return demangled
    kind = m.group(1).replace("sparse_query_attention_", "")
    args = [a.strip() for a in m.group(2).split(",")]
    names = {"__nv_bfloat16": "bf16", "__half": "fp16", "long": "int64", "int": "int32"}
    args = [names.get(a, a.replace("cacheblend::attention::", "")) for a in args]
    return f"{kind}<{', '.join(args)}>"


def sass_by_function(cuobjdump: str, so: str, arch: str) -> dict[str, str]:
    text = subprocess.run([cuobjdump, "--dump-sass", "--gpu-architecture", arch, so], capture_output=True, text=True,
                          check=True).stdout
    functions, name, body = {}, None, []
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            if name:
                functions[name] = "\n".join(body)
            name, body = m.group(1), []
        elif name:
            body.append(line)
    if name:
        functions[name] = "\n".join(body)
    return functions


def resources(cuobjdump: str, so: str, arch: str) -> dict[str, dict[str, int]]:
    text = subprocess.run([cuobjdump, "--dump-resource-usage", "--gpu-architecture", arch, so], capture_output=True,
                          text=True, check=True).stdout
    out, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        if name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            name = None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("so", help="the built extension (cacheblend_ext/_C*.so)")
    parser.add_argument("--cuobjdump", default=None, help="cuobjdump to use (default: the one Triton ships)")
    parser.add_argument("--arch", action="append", default=None, help="sm_80, sm_90, ... (default: sm_80 and sm_90)")
    args = parser.parse_args(argv)
    tool = _cuobjdump(args.cuobjdump)
    failures = []
    for arch in args.arch or ["sm_80", "sm_90"]:
        sass = sass_by_function(tool, args.so, arch)
        usage = resources(tool, args.so, arch)
        attention = sorted(n for n in set(sass) | set(usage) if "sparse_query_attention" in n)
        if not any("flash_kernel" in n for n in attention):
            failures.append(f"{arch}: no flash attention kernel in {args.so}")
            continue
        names = _demangle(attention)
        print(f"== {arch}: attention kernels (registers, shared memory bytes, stack bytes)")
        for n in attention:
            u = usage.get(n, {})
            short = _short(names[n])
            print(f"  {short:70s} REG {u.get('REG', '?'):>3}  SHARED {u.get('SHARED', '?'):>5}  "
                  f"STACK {u.get('STACK', '?'):>3}")
            if "flash_kernel" not in n:
                continue
            body = sass.get(n, "")
            missing = [op for op in REQUIRED if not re.search(rf"\b{op}\b", body)]
            local = re.findall(r"\b(LDL|STL)\b", body)
            exempt = "ELi32E" in n  # the 32-rows-per-warp shape (flash_m32)
            if missing:
                failures.append(f"{arch} {short}: no {', '.join(missing)} in its SASS")
            if (local or u.get("STACK", 0)) and not exempt:
                failures.append(f"{arch} {short}: local memory ({len(local)} LDL/STL, stack {u.get('STACK', 0)} B)")
    for f in failures:
        print("FAIL", f)
    print("SASS check:", "failed" if failures else "ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
