"""What every benchmark writes under one file stem: a Markdown page (the stamp, then its tables), a CSV of its rows
and a PNG figure, the tables and the CSV by recbole_llm.comparison's table writer. The stamp says on what the numbers
were measured: machine, library versions, seed, config and the machine's load while they were taken (other processes
inflate wall-clock timings)."""

import importlib.metadata
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from recbole_llm.environment import cpu_model
from recbole_llm.errors import RecBoleLLMError

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
LIBRARIES = ("torch", "transformers", "peft", "recbole")
CONFIG_MARK = "<details><summary>Profile</summary>"  # where the page's summary ends (update_readme.py copies above)


def git_revision():
    """The checkout's commit, marked when the working tree has changes; None outside a git checkout. A copy of the
    tree without its git folder (the GPU kit's run) names it in RECBOLE_LLM_REVISION, which wins when set."""
    if os.environ.get("RECBOLE_LLM_REVISION"):
        return os.environ["RECBOLE_LLM_REVISION"]
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + (" with local changes" if changed else "")


class Stamp:
    """Started before a benchmark runs (date, load) and finished after it (load, the GPU the runs used)."""

    def __init__(self, profile, command):
        self.profile, self.command = profile, command
        self.started = datetime.now(timezone.utc)
        self.load_before = os.getloadavg()[0]
        self.revision = git_revision()  # before the benchmark writes its own files into the checkout
        self.seeds = profile.seeds  # the seeds its runs used (a benchmark with its own sets them)

    def seed_text(self):
        seeds = self.seeds or [self.profile.config.get("seed", 2020)]
        return f"**Seed{'s' * (len(seeds) > 1)}** {', '.join(map(str, seeds))}"

    def lines(self, gpu_name=None):
        """The stamp as Markdown lines; gpu_name is the GPU the runs used (None: CPU only)."""
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in LIBRARIES)
        elapsed_min = (datetime.now(timezone.utc) - self.started).total_seconds() / 60
        return [
            f"- **Machine**: {cpu_model()} ({os.cpu_count()} logical cores, {memory_gb:.0f} GB), "
            f"{'GPU ' + gpu_name if gpu_name else 'no GPU'}; {platform.system()} {platform.release()}",
            f"- **Date**: {self.started:%Y-%m-%d %H:%M} UTC, {elapsed_min:.1f} min; load average (1 min) "
            f"{self.load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores",
            f"- **Versions**: Python {platform.python_version()}, {versions}, recbole_llm at "
            f"{self.revision or 'an unknown commit'}",
            f"- {self.seed_text()}, dataset {self.profile.dataset}, "
            f"profile `{self.profile.name}`: `{self.command}`",
        ]


def run_script(main, script):
    """A benchmark script's command-line entry: bad input as one line on stderr and exit status 2."""
    try:
        main()
    except RecBoleLLMError as error:
        print(f"benchmarks.{script}: error: {error}", file=sys.stderr)
        sys.exit(2)


def command_line(script, argv):
    """How a benchmark was started, for its stamp: `script` is the module's name in benchmarks/ (e.g. quality)."""
    return " ".join(["python", "-m", f"benchmarks.{script}", *argv])


def write_page(stem, title, stamp, sections, gpu_name=None, figure=True):
    """`<stem>.md`: the title, the stamp, then each (heading, Markdown text) section, the figure, and the profile."""
    parts = [f"## {title}", "", *stamp.lines(gpu_name), ""]
    for heading, text in sections:
        parts += [f"**{heading}**" if heading else "", "", text, ""]
    parts += [f"![{title}]({Path(stem).name}.png)", ""] if figure else []
    parts += [CONFIG_MARK, "", "```yaml", stamp.profile.text.strip(), "```",
              "", "</details>", ""]
    Path(f"{stem}.md").write_text("\n".join(parts))


@contextmanager
def saved_figure(stem, n_panels):
    """Side-by-side axes whose figure is saved as `<stem>.png` (matplotlib: the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, n_panels, figsize=(5.5 * n_panels, 4.5), squeeze=False)
    try:
        yield axes[0]
        figure.tight_layout()
        figure.savefig(f"{stem}.png", dpi=110)
    finally:
        plt.close(figure)
