"""Generate the Python stubs in duoserve/v1/ from protos/duoserve/v1/*.proto.

    python scripts/gen_protos.py           # rewrite the committed stubs
    python scripts/gen_protos.py --check   # exit 1, naming the files, if they differ

The stubs are committed so that `pip install duoserve` needs no protoc. They are generated
from the proto root (`-I protos`), so a proto's descriptor is named `duoserve/v1/x.proto` (what
reflection and other languages see) and its modules import each other as
`from duoserve.v1 import x_pb2`. A stub that still carries a bare `import x_pb2` (what protoc
writes when a proto is compiled from its own folder) is rewritten to that form, and an import
of a generated module from anywhere but duoserve.v1 or google.protobuf fails the run.

The output depends on the grpcio-tools version (it is written into the stubs); tests/test_protos.py
fails when the committed stubs differ from what this script produces with the installed one.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE = "duoserve.v1"
PACKAGE_DIR = Path(*PACKAGE.split("."))           # duoserve/v1, under the proto root and the repo
STUB_DIR = ROOT / PACKAGE_DIR
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")

_BARE_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)
_ANY_PB2_IMPORT = re.compile(r"^(?:from [\w.]+ )?import \w+_pb2\b.*$", re.MULTILINE)


def proto_files() -> list[Path]:
    """The protos to compile, relative to the proto root, in a stable order."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def is_stub(name: str) -> bool:
    return name.endswith(STUB_SUFFIXES)


def fix_imports(source: str) -> str:
    """Make every import of a generated module `from duoserve.v1 import x_pb2 as ...`."""
    source = _BARE_IMPORT.sub(rf"from {PACKAGE} import \1 as \2", source)
    for line in _ANY_PB2_IMPORT.findall(source):
        if not line.startswith((f"from {PACKAGE} import ", "from google.protobuf import ")):
            raise RuntimeError(f"generated stub imports a module outside {PACKAGE}: {line!r}")
    return source


def generate(out_root: Path) -> dict[str, str]:
    """Compile every proto into `out_root/duoserve/v1/`; return {file name: fixed source}."""
    protos = proto_files()
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT / PACKAGE_DIR}")
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
           f"--python_out={out_root}", f"--pyi_out={out_root}", f"--grpc_python_out={out_root}",
           *map(str, protos)]
    result = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}):\n{result.stderr}")
    stubs = {}
    for path in sorted((out_root / PACKAGE_DIR).iterdir()):
        if is_stub(path.name):
            stubs[path.name] = fix_imports(path.read_text())
            path.write_text(stubs[path.name])
    return stubs


def committed_stubs() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(STUB_DIR.iterdir()) if is_stub(p.name)}


def differences(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Names of stubs that are missing, stale or different in `actual`."""
    return sorted(name for name in expected.keys() | actual.keys()
                  if expected.get(name) != actual.get(name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed stubs instead of rewriting them")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
    if args.check:
        stale = differences(fresh, committed_stubs())
        if stale:
            print(f"stubs differ from the protos: {', '.join(stale)}; "
                  f"run python scripts/gen_protos.py", file=sys.stderr)
            return 1
        return 0
    STUB_DIR.mkdir(parents=True, exist_ok=True)
    for name in committed_stubs().keys() - fresh.keys():
        (STUB_DIR / name).unlink()                      # the proto it came from is gone
    for name, source in fresh.items():
        (STUB_DIR / name).write_text(source)
    print(f"wrote {len(fresh)} stubs to {STUB_DIR.relative_to(ROOT)}: {', '.join(fresh)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
