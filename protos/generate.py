"""Generate Python code for protos/chat/v1 into gen/ (or --out DIR).

protobuf messages (*_pb2.py), gRPC stubs (*_pb2_grpc.py) and mypy-protobuf type
stubs (*.pyi). Generated files are committed and never edited by hand; a test
regenerates them into a temporary directory and fails when they differ.
Run it with `make proto`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "gen"
PACKAGE_DIRS = ("chat", "chat/v1")


def _plugin(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    return f"--plugin={name}={found}"


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "chat").rglob("*.proto"))
    for package in PACKAGE_DIRS:
        (out / package).mkdir(parents=True, exist_ok=True)
        (out / package / "__init__.py").write_text("")
    (out / "chat" / "py.typed").write_text("")
    well_known = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        _plugin("protoc-gen-mypy"),
        _plugin("protoc-gen-mypy_grpc"),
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
