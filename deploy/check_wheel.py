"""Fail when a built wheel lacks a file of the package's source tree.

Used by deploy/Dockerfile right after `pip wheel`: modules are always packaged, but data files
(``coordinator_agent/routing/data/*.yaml``, ``py.typed``) only when pyproject.toml lists them under
``[tool.setuptools.package-data]``. A file missing here would otherwise surface as a
FileNotFoundError in a running container.

Usage: python check_wheel.py WHEEL PACKAGE_DIR
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

SKIPPED_DIRS = {"__pycache__"}
SKIPPED_SUFFIXES = {".pyc", ".pyo"}


def source_files(package_dir: Path) -> set[str]:
    """Paths (as in the wheel, e.g. ``pkg/data/x.yaml``) of the package's own files."""
    base = package_dir.parent
    return {
        path.relative_to(base).as_posix()
        for path in package_dir.rglob("*")
        if path.is_file()
        and not SKIPPED_DIRS.intersection(path.relative_to(base).parts)
        and path.suffix not in SKIPPED_SUFFIXES
    }


def missing_files(wheel: Path, package_dir: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        packaged = set(archive.namelist())
    return sorted(source_files(package_dir) - packaged)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: check_wheel.py WHEEL PACKAGE_DIR", file=sys.stderr)
        return 2
    wheel, package_dir = Path(argv[0]), Path(argv[1])
    if not package_dir.is_dir():
        print(f"check_wheel: {package_dir} is not a directory", file=sys.stderr)
        return 2
    missing = missing_files(wheel, package_dir)
    if missing:
        print(f"check_wheel: {wheel.name} lacks {len(missing)} file(s) of {package_dir}/:",
              file=sys.stderr)
        for name in missing:
            print(f"  {name}", file=sys.stderr)
        print("check_wheel: list them under [tool.setuptools.package-data] in pyproject.toml "
              f'(e.g. {package_dir.name} = ["py.typed", "data/*"])', file=sys.stderr)
        return 1
    print(f"check_wheel: {wheel.name} holds all {len(source_files(package_dir))} files "
          f"of {package_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
