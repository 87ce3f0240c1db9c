"""Count the instructions that say which path a kernel is on, per kernel, in a SASS dump.

    cuobjdump --dump-sass fmkernels/_cuda*.so | python bench/sass_summary.py

HGMMA: Hopper warpgroup matrix multiply (wgmma); HMMA: warp-level tensor-core mma;
LDSM: ldmatrix; LDGSTS: cp.async global->shared copies; UTMALDG: bulk tensor (TMA) loads;
LDG.128 / STG.128: 16-byte global loads / stores; LDL / STL: local memory (spills or
arrays indexed at run time, which the hot loops should not have).
"""

import collections
import re
import shutil
import subprocess
import sys

PATTERNS = {
    "HGMMA": r"\bHGMMA\b",
    "HMMA": r"\bHMMA\b",
    "LDSM": r"\bLDSM\b",
    "LDGSTS": r"\bLDGSTS\b",
    "UTMALDG": r"\bUTMALDG\b",
    "LDG.128": r"\bLDG\.E\.128\b|\bLDG\.E\.128\.",
    "STG.128": r"\bSTG\.E\.128\b",
    "LDL": r"\bLDL\b",
    "STL": r"\bSTL\b",
    "SHFL": r"\bSHFL\b",
}


def without_parameters(name: str) -> str:
    """``void f<T, (E)3>(int, float)`` -> ``f<T, (E)3>``: drops the parameter list at the end,
    which template arguments before it may also hold parentheses."""
    name = name.removeprefix("void ")
    if not name.endswith(")"):
        return name
    depth = 0
    for index in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[index], 0)
        if depth == 0:
            return name[:index]
    return name


def demangle(names):
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None or not names:
        return names
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = result.stdout.splitlines()
    return lines if len(lines) == len(names) else names


def main() -> int:
    counts = collections.OrderedDict()
    architecture = {}
    function = None
    arch = None
    for line in sys.stdin:
        match = re.search(r"arch = (sm_\w+)", line)
        if match:
            arch = match.group(1)
        match = re.search(r"Function : (\S+)", line)
        if match:
            function = match.group(1)
            counts[function] = collections.Counter()
            architecture[function] = arch
            continue
        if function is None:
            continue
        for name, pattern in PATTERNS.items():
            if re.search(pattern, line):
                counts[function][name] += 1
    if not counts:
        print("no kernels found in the SASS dump")
        return 1
    names = demangle(list(counts))
    print("arch     " + " ".join(f"{name:>8}" for name in PATTERNS) + "  kernel")
    for (mangled, counter), name in zip(counts.items(), names):
        short = re.sub(r"\(anonymous namespace\)::|fmkernels::cuda::", "", without_parameters(name))[:110]
        print(f"{architecture[mangled] or '?':8} " + " ".join(f"{counter[n]:8d}" for n in PATTERNS) + f"  {short}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
