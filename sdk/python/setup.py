"""Build hook: generates the protobuf modules from Picket's .proto files.

The generated ``picket/v1/*_pb2.py`` (and ``.pyi`` stubs) are written into the
build directory only, never into the source tree, so they cannot drift from
``proto/``. From a checkout the protos are read from ``../../proto``; an sdist
carries its own copy in ``proto/``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent


def proto_root() -> Path:
    for candidate in (HERE / "proto", HERE.parent.parent / "proto"):
        if (candidate / "picket" / "v1").is_dir():
            return candidate
    raise RuntimeError(
        "picket-sdk: proto/picket/v1 not found (build from the Picket repository "
        "or from an sdist that carries proto/)"
    )


def generate(out_dir: Path) -> None:
    from importlib.resources import files

    from grpc_tools import protoc

    root = proto_root()
    protos = sorted(str(p) for p in (root / "picket" / "v1").glob("*.proto"))
    well_known = str(files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{root}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("picket-sdk: protoc failed on " + " ".join(protos))


class BuildPyWithProtos(build_py):
    """build_py that also compiles the protos into the build tree."""

    def run(self) -> None:
        super().run()
        generate(Path(self.build_lib))


class SdistWithProtos(sdist):
    """sdist that carries the protos it builds from."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        shutil.copytree(proto_root() / "picket", Path(base_dir) / "proto" / "picket")


setup(cmdclass={"build_py": BuildPyWithProtos, "sdist": SdistWithProtos})
