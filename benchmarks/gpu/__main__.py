"""python -m benchmarks.gpu pack | install | run | collect DIR | dry-run: see benchmarks/gpu/__init__.py."""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.gpu import PACK_DIR, WORK_DIR


def collect(directory, plan_name="gpu", results_dir=None, readme=None):
    """The pages a run brought back (the device tool's files_at) into benchmarks/results/, and the README's results
    rewritten (python -m benchmarks.update_readme), the kit's short quality page among them."""
    from benchmarks.gpu.remote import load_plan
    from benchmarks.report import REPO, RESULTS_DIR
    from benchmarks.update_readme import update_readme

    results_dir = Path(results_dir or RESULTS_DIR)
    plan = load_plan(plan_name)
    quality = f"quality-{plan['quality']['name']}"
    stems = [f"cost-{plan['cost']['profile']}", quality, f"curves-{plan['quality']['name']}"]
    copied = []
    for path in sorted(Path(directory).iterdir()):
        if path.is_file() and path.stem in stems and path.suffix in (".md", ".csv", ".png"):
            shutil.copy2(path, results_dir / path.name)
            copied.append(path.name)
    if not copied:
        print(f"nothing to collect in {directory}: expected {', '.join(stems)} (.md, .csv, .png)", file=sys.stderr)
        return 1
    update_readme(Path(readme or REPO / "README.md"), results_dir, optional=(quality,))
    print(f"copied into {results_dir}: {', '.join(copied)}; the README's results rewritten")
    return 0


def dry_run(directory=None):
    """pack with a stand-in GGUF and wheel, then install and run with the dry plan, all under `directory`."""
    from benchmarks.gpu.pack import pack
    from benchmarks.gpu.remote import install, run

    root = Path(directory or tempfile.mkdtemp(prefix="gpu-kit-dry-"))
    kit, work = root / "gpu_kit", root / "work"
    print(f"GPU kit dry run in {root}: a stand-in GGUF and wheel, a tiny LLM and data, on CPU", flush=True)
    pack(kit, stand_in=True)
    print("\n# install (call 1)", flush=True)
    installed = install(kit, work, "dry", root / "out-install")
    print("\n# run (call 2)", flush=True)
    ran = run(kit, work, "dry", root / "out")
    return max(installed, ran)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    pack_parser = commands.add_parser("pack", help="build gpu_kit/part1 and gpu_kit/part2 here")
    pack_parser.add_argument("--kit", default=str(PACK_DIR))
    pack_parser.add_argument("--no-llm-stack", action="store_true",
                             help="leave out the fallback transformers/peft wheels (the machine's own are used)")
    for name, help_text in (("install", "call 1, on the GPU machine"), ("run", "call 2, on the GPU machine")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--kit", default=str(PACK_DIR))
        sub.add_argument("--work", default=str(WORK_DIR))
        sub.add_argument("--plan", default="gpu")
        sub.add_argument("--out", default=os.environ.get("OUT") or None)
    commands.choices["run"].add_argument("--seconds", type=float, default=None,
                                         help="the run's seconds instead of the plan's (a lease with less time left)")
    commands.choices["run"].add_argument("--steps", default="smoke,cost,quality",
                                         help="the steps to run, in this order (e.g. cost,quality after a smoke passed)")
    collect_parser = commands.add_parser("collect", help="the pages a run brought back into benchmarks/results/")
    collect_parser.add_argument("directory")
    dry_parser = commands.add_parser("dry-run", help="pack with a stand-in, install and run on CPU")
    dry_parser.add_argument("--dir", default=None)
    args = parser.parse_args(argv)

    if args.command == "pack":
        from benchmarks.gpu.pack import PackError, pack

        try:
            pack(args.kit, llm_stack=not args.no_llm_stack)
        except PackError as error:
            print(f"benchmarks.gpu pack: error: {error}", file=sys.stderr)
            return 2
        return 0
    if args.command in ("install", "run"):
        from benchmarks.gpu import remote

        out = args.out or str(Path(args.work) / "out")
        if args.command == "run":
            return remote.run(args.kit, args.work, args.plan, out, seconds=args.seconds, steps=args.steps.split(","))
        return remote.install(args.kit, args.work, args.plan, out)
    if args.command == "collect":
        return collect(args.directory)
    return dry_run(args.dir)


if __name__ == "__main__":
    sys.exit(main())
