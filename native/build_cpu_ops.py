"""Build native/cpu_ops.cpp into native/build/libduoserve_cpu_ops.so against the installed torch.

    python native/build_cpu_ops.py                  (what `make cpu-ops` runs, with the project's venv)
    python native/build_cpu_ops.py --output PATH    (the Docker image: next to the installed packages)

g++ directly, with torch's include and library paths: no ninja, no setuptools, and the command is
printed so a failure can be reproduced by hand. Exits 0 without building (and says why) when no C++
compiler is found, so the engine keeps its torch-ops fallback on machines without one.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "cpu_ops.cpp"
INPUTS = (SOURCE, HERE / "cpu_kernels.inc", Path(__file__).resolve())   # a newer one of these rebuilds
TARGET = HERE / "build" / "libduoserve_cpu_ops.so"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=TARGET, help=f"the library to write (default {TARGET})")
    target = parser.parse_args(argv).output
    import torch
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        print("warning: no C++ compiler (g++); skipping the CPU kernels: the engine uses torch ops instead")
        return 0
    newest_input = max(p.stat().st_mtime for p in (*INPUTS, Path(torch.__file__)))
    if target.is_file() and target.stat().st_mtime > newest_input:
        return 0                        # up to date with the sources and the installed torch
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fvisibility=hidden",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
           *(f"-I{p}" for p in cpp_extension.include_paths()),
           str(SOURCE), "-o", str(partial),
           *(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu",
           *(f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths())]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    partial.replace(target)             # never a half-written library where the engine looks
    return 0


if __name__ == "__main__":
    sys.exit(main())
