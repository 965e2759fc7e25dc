"""A benchmark's settings: its profile, a YAML file under benchmarks/profiles/ that says on which data, with which
settings and which runs it measures, and its command line.

A profile holds ``dataset``; ``config``, the settings of every run (on top of properties/; ``--key=value`` on the
command line goes on top of it); ``quality``, model -> its own settings (the quality and curves benchmarks run
these, once per seed of ``seeds`` when set, each row compared with ``references``: by default Pop); for the cost benchmark ``cost``, row label -> its own settings (``model:`` names the model when the label
is not a model name), and ``cost_steps``, how much it measures per row; for the cold-start benchmark ``cold``, row
label -> its own settings, as ``cost``; for the ablation benchmark ``ablations``, its seeds and, per model, setting
label -> settings.
"""

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks.report import RESULTS_DIR, Stamp, command_line
from recbole_llm.errors import RecBoleLLMError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
COST_STEPS = ("train", "profiled", "eval")
PROFILE_KEYS = ("dataset", "config", "quality", "cost", "cost_steps", "cold", "seeds", "references")


@dataclass
class Profile:
    name: str
    text: str  # the file as written, for the stamp
    dataset: str
    config: dict
    quality: dict  # model -> settings
    cost: dict  # row label -> settings, `model` among them
    cost_steps: dict  # train, profiled, eval -> count
    cold: dict = field(default_factory=dict)  # row label -> settings, `model` among them
    extra: dict = field(default_factory=dict)  # the file's other sections (e.g. `ablations`), as written
    seeds: list = None  # quality and curves run every model once per seed (None: the config's seed)
    references: list = None  # the rows every other is compared with (None: Pop where it runs, else the first)

    def comparison_references(self):
        return self.references or (["Pop"] if "Pop" in self.quality else list(self.quality)[:1])

    def run_config(self, settings):
        """The config dict of one run: the profile's config, then the run's own settings."""
        return {**self.config, **{key: value for key, value in settings.items() if key != "model"}}


def load_profile(name_or_path, overrides=None):
    """The profile called `name_or_path` (a file in benchmarks/profiles/, or a path), with `overrides` ({key: value}
    from the command line) added to its config."""
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
        raise RecBoleLLMError(f"profile '{name_or_path}' not found: use one of {known}, or the path of a YAML file")
    text = path.read_text()
    content = yaml.safe_load(text) or {}
    missing = [key for key in ("dataset", "config", "quality") if key not in content]
    missing += [key for key in ("cost", "cost_steps") if content.get("cost") and key not in content]
    if missing:
        raise RecBoleLLMError(f"profile {path} has no {', '.join(missing)}: see benchmarks/profiles/cpu.yaml")
    cost, cold = (labelled_runs(content.get(key)) for key in ("cost", "cold"))
    steps = {key: (content.get("cost_steps") or {}).get(key) for key in COST_STEPS}
    wrong = [key for key, count in steps.items() if cost and (not isinstance(count, int) or count < (key != "profiled"))]
    if wrong:
        raise RecBoleLLMError(
            f"profile {path}: cost_steps {', '.join(wrong)} must be whole numbers (train and eval at least 1)"
        )
    return Profile(
        name=path.stem,
        text=text,
        dataset=content["dataset"],
        config={**content["config"], **(overrides or {})},
        quality={model: settings or {} for model, settings in content["quality"].items()},
        cost=cost,
        cost_steps=steps,
        cold=cold,
        extra={key: value for key, value in content.items() if key not in PROFILE_KEYS},
        seeds=content.get("seeds"),
        references=content.get("references"),
    )


def labelled_runs(runs):
    """row label -> settings, with `model` (the label unless the settings name one)."""
    return {label: {"model": label, **(settings or {})} for label, settings in (runs or {}).items()}


def split_arguments(argv, own_keys=("profile", "out")):
    """The script's own `--name=value` arguments (own_keys, as text) and the rest as config overrides {key: value},
    each value read as YAML (as RecBole reads `--key=value`: numbers, booleans, lists)."""
    own, overrides = {}, {}
    for argument in argv:
        key, equals, value = argument.removeprefix("--").partition("=")
        if not argument.startswith("--") or not equals:
            raise RecBoleLLMError(f"argument '{argument}' is not --key=value: e.g. --profile=cpu --epochs=2")
        if key in own_keys:
            own[key] = value
        else:
            overrides[key] = yaml.safe_load(value)
    return own, overrides


def benchmark_settings(script, argv):
    """A benchmark's command line -> its profile (with the --key=value overrides), output folder and stamp."""
    own, overrides = split_arguments(argv)
    profile = load_profile(own.get("profile", "cpu"), overrides)
    return profile, Path(own.get("out", RESULTS_DIR)), Stamp(profile, command_line(script, argv))
