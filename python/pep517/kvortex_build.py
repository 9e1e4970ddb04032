"""PEP 517 build backend for the kvortex Python package: CMake builds the extension, this file
packs it with the package's Python files into a wheel. It needs nothing from a package index
(cmake, a C++23 compiler, pybind11 and the Python headers come from the system), so
`pip install --no-build-isolation .` works offline.

config_settings (pip: --config-settings KEY=VALUE): cmake.args (extra CMake arguments, separated by
spaces, e.g. "-DKVORTEX_WITH_CUDA=OFF"), build.jobs (parallel build jobs, default: CPU count).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
_NAME = "kvortex"


def _version() -> str:
    for line in (_ROOT / "include" / "kvortex" / "version.hpp").read_text().splitlines():
        if "version_string" in line and '"' in line:
            return line.split('"')[1]
    raise RuntimeError("kvortex_build: no version_string in include/kvortex/version.hpp")


def _tag() -> str:
    impl = f"cp{sys.version_info.major}{sys.version_info.minor}"
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    return f"{impl}-{impl}-{plat}"


def _metadata() -> str:
    return "\n".join([
        "Metadata-Version: 2.1",
        f"Name: {_NAME}",
        f"Version: {_version()}",
        "Summary: KV-cache offloading engine for LLM inference (host RAM, disk, Redis)",
        "Requires-Python: >=3.9",
        "License: Apache-2.0",
        "",
    ])


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    dist_info = Path(metadata_directory) / f"{_NAME}-{_version()}.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(_metadata())
    return dist_info.name


def _build_extension(build_dir: Path, config_settings) -> Path:
    settings = config_settings or {}
    extra = str(settings.get("cmake.args", "")).split()
    jobs = str(settings.get("build.jobs", os.cpu_count() or 2))
    configure = ["cmake", "-S", str(_ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 "-DKVORTEX_BUILD_PYTHON=ON", "-DKVORTEX_BUILD_TESTS=OFF", "-DKVORTEX_BUILD_EXAMPLES=OFF",
                 "-DKVORTEX_BUILD_BENCHMARKS=OFF", "-DKVORTEX_INSTALL=OFF", f"-DPython3_EXECUTABLE={sys.executable}", *extra]
    subprocess.run(configure, check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", "_kvortex", "-j", jobs], check=True)
    return build_dir / "python" / _NAME


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    version = _version()
    wheel_name = f"{_NAME}-{version}-{_tag()}.whl"
    dist_info = f"{_NAME}-{version}.dist-info"
    with tempfile.TemporaryDirectory(prefix="kvortex-wheel-") as tmp:
        package = _build_extension(Path(tmp) / "build", config_settings)
        files = {}
        for f in sorted(package.rglob("*")):
            if "__pycache__" in f.parts or not f.is_file():
                continue
            if f.suffix in (".py", ".pyi", ".so") or f.name == "py.typed":
                files[f"{_NAME}/{f.relative_to(package).as_posix()}"] = f.read_bytes()
        if not any(name.endswith(".so") for name in files):
            raise RuntimeError("kvortex_build: the build produced no extension module")
        files[f"{dist_info}/METADATA"] = _metadata().encode()
        files[f"{dist_info}/WHEEL"] = "\n".join([
            "Wheel-Version: 1.0", "Generator: kvortex_build", "Root-Is-Purelib: false", f"Tag: {_tag()}", ""]).encode()
        files[f"{dist_info}/top_level.txt"] = f"{_NAME}\n".encode()
        record = [_record_line(name, data) for name, data in files.items()]
        record.append(f"{dist_info}/RECORD,,")
        files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
        out = Path(wheel_directory) / wheel_name
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for name, data in files.items():
                z.writestr(name, data)
    return wheel_name


def build_sdist(sdist_directory, config_settings=None):
    raise NotImplementedError("kvortex_build: install from a source tree (pip install --no-build-isolation .)")


__all__ = ["build_wheel", "get_requires_for_build_wheel", "prepare_metadata_for_build_wheel"]

if shutil.which("cmake") is None:  # say so at import, before pip's generic failure
    print("kvortex_build: cmake is needed to build the extension (Debian: apt-get install cmake)", file=sys.stderr)
