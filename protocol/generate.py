"""Regenerate the Python modules for every protocol/v1/*.proto.

    python protocol/generate.py            # in place: protocol/v1/*_pb2.py, *_pb2_grpc.py, *_pb2.pyi
    python protocol/generate.py --out DIR  # somewhere else (the drift test compares the two)

The generated modules are committed, so this runs only when a .proto changes. They must
import each other as `from pollinate.protocol.v1 import common_pb2`, but the sources live
in protocol/v1/ (the folder is installed as pollinate.protocol.v1 by package-dir). protoc
derives import paths from the include root, so the protos are staged into a temporary
tree pollinate/protocol/v1/ and compiled from there; inside the .proto files imports are
written the same way (`import "pollinate/protocol/v1/common.proto";`).

The output depends on the grpcio-tools version (its protoc stamps the protobuf gencode
version into every _pb2.py); regenerate with the version the project pins.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

PROTO_DIR = Path(__file__).resolve().parent / "v1"
# Where the protos sit inside the staged include root; this fixes the generated imports.
PACKAGE_PATH = Path("pollinate", "protocol", "v1")
# Suffixes of everything this script writes; only such files are ever deleted as stale.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def generate(out_dir: Path, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Compile every *.proto in proto_dir into out_dir; returns the files written."""
    # Imported here, not at module level: grpc_tools is a development dependency and
    # importing this module (e.g. to read PROTO_DIR) must not require it.
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(proto_dir.glob("*.proto"))
    if not protos:
        raise FileNotFoundError(f"no .proto files in {proto_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    # google/protobuf/*.proto (well-known types) ship inside grpc_tools.
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"

    with tempfile.TemporaryDirectory(prefix="pollinate-proto-") as tmp:
        src_root = Path(tmp, "src")
        gen_root = Path(tmp, "gen")
        staged = src_root / PACKAGE_PATH
        staged.mkdir(parents=True)
        gen_root.mkdir()
        for proto in protos:
            shutil.copyfile(proto, staged / proto.name)
        args = [
            "grpc_tools.protoc",
            f"-I{src_root}",
            f"-I{well_known}",
            f"--python_out={gen_root}",
            f"--pyi_out={gen_root}",
            f"--grpc_python_out={gen_root}",
            # Relative to the include root, so the recorded file names are
            # "pollinate/protocol/v1/x.proto" and never a temporary path.
            *(str(PACKAGE_PATH / proto.name) for proto in protos),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit code {rc} (args: {args})")

        produced = sorted(p for p in (gen_root / PACKAGE_PATH).iterdir() if p.name.endswith(GENERATED_SUFFIXES))
        expected_names = {p.name for p in produced}
        # A removed .proto must not leave its old modules behind.
        for old in out_dir.iterdir():
            if old.name.endswith(GENERATED_SUFFIXES) and old.name not in expected_names:
                logger.info("removing stale %s", old)
                old.unlink()
        written = []
        for path in produced:
            target = out_dir / path.name
            shutil.copyfile(path, target)
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=PROTO_DIR, help="output directory (default: protocol/v1, in place)"
    )
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR, help="where the .proto sources are")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in generate(args.out, args.proto_dir):
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
