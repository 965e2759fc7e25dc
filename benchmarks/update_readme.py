"""Rewrite the benchmark results in README.md, between its two markers, from the pages in benchmarks/results/: the
summary (stamp and tables) and the figure of the quality and cost pages of the cpu and gpu profiles, of the cold-start,
limits, scale and ablation pages of the cpu profile, of the ablation and limits pages of a CPU with bf16 units
(cpu-bf16), of RSLLM's picks over seeds (the cpu-picks ablation page), of the learning curves of the cpu-long and
cpu-epoch profiles, of Laser at cpu-epoch's samples over seeds (its ablation page), and of the GPU
kit's short quality run (benchmarks/gpu/) once it has one.

    python -m benchmarks.update_readme
"""

import os

from benchmarks.report import CONFIG_MARK, REPO, RESULTS_DIR, run_script
from recbole_llm.errors import RecBoleLLMError

BEGIN = "<!-- benchmark results: written by `python -m benchmarks.update_readme` from benchmarks/results/ -->"
END = "<!-- end of benchmark results -->"
PROFILES = ("cpu", "cpu-bf16", "cpu-picks", "cpu-long", "cpu-epoch", "gpu")
BENCHMARKS = {"cpu": ("quality", "cost", "limits", "scale", "cold", "ablations"), "cpu-bf16": ("ablations", "limits"),
              "cpu-picks": ("ablations",), "cpu-long": ("curves",),
              "cpu-epoch": ("curves", "ablations")}  # a profile's benchmarks: quality and cost unless said
OPTIONAL_PAGES = ("quality-gpu-short",)  # pages shown only once written: the GPU kit's (python -m benchmarks.gpu)


def results_section(results_dir=RESULTS_DIR, readme_dir=REPO, profiles=PROFILES, optional=OPTIONAL_PAGES):
    """The Markdown between the markers: each benchmark page of each profile, then the `optional` pages that exist,
    each as its summary with headings one level down and its figure linked from the README; a line with the command
    for a profile's page not written yet."""
    parts = []
    pages = [(f"{benchmark}-{profile}", profile, benchmark)
             for profile in profiles for benchmark in BENCHMARKS.get(profile, ("quality", "cost"))]
    for stem, profile, benchmark in pages + [(stem, None, None) for stem in optional]:
        page = results_dir / f"{stem}.md"
        if not page.is_file():
            if profile is not None:
                parts.append(f"*{benchmark.capitalize()}, {profile} profile: not measured yet "
                             f"(`python -m benchmarks.{benchmark} --profile={profile}`).*\n")
            continue
        summary = page.read_text().split(CONFIG_MARK)[0].strip()
        figure = results_dir / f"{page.stem}.png"
        summary = summary.replace(f"]({figure.name})", f"]({os.path.relpath(figure, readme_dir)})")
        link = os.path.relpath(page, readme_dir)
        parts.append(f"#{summary}\n\nThe whole page, with the profile: [{link}]({link}).\n")
    return "\n".join(parts)


def update_readme(readme=REPO / "README.md", results_dir=RESULTS_DIR, profiles=PROFILES, optional=OPTIONAL_PAGES):
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise RecBoleLLMError(f"{readme} needs each results marker once, in its Results section: {BEGIN} ... {END}")
    before, rest = text.split(BEGIN)
    after = rest.split(END)[1]
    section = results_section(results_dir, readme.parent, profiles, optional)
    readme.write_text(f"{before}{BEGIN}\n\n{section}\n{END}{after}")


if __name__ == "__main__":
    run_script(update_readme, "update_readme")
