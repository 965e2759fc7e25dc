"""Paired comparisons of two models on the same test users: the 95% interval of the mean difference (a paired
bootstrap over users, with a fixed seed), a paired test (Wilcoxon signed-rank or paired t, from SciPy), and Holm's
correction over the rows of a table. RecBole reports one mean per metric; one run on a few hundred users moves by more
than many of the differences people read into it (Elliot runs such tests between models; RecBole does not)."""

from dataclasses import dataclass

import numpy as np
from scipy import stats

from recbole_llm.errors import RecBoleLLMError

TESTS = ("wilcoxon", "ttest")


@dataclass
class PairedDifference:
    """model - reference on the same users: the mean difference, its interval, the test's p-value (before and after
    Holm's correction over a table's rows) and the number of users."""

    mean: float
    low: float
    high: float
    p_value: float
    users: int
    p_holm: float = None

    def significant(self, alpha):
        return self.p_holm is not None and self.p_holm < alpha

    def text(self, alpha):
        """`+0.0051 [-0.0012, +0.0113] *`: the mark where significant after Holm's correction."""
        mark = " *" if self.significant(alpha) else ""
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}]{mark}"


def paired_difference(values, reference, resamples=2000, level=0.95, test="wilcoxon", seed=0):
    """values and reference: one number per user, the same users in the same order."""
    values, reference = np.asarray(values, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if values.shape != reference.shape or values.ndim != 1 or len(values) < 2:
        raise RecBoleLLMError(f"a paired comparison needs the same users on both sides, got {values.shape} and "
                              f"{reference.shape}")
    differences = values - reference
    low, high = bootstrap_interval(differences, resamples, level, seed)
    return PairedDifference(float(differences.mean()), low, high, paired_p_value(differences, test), len(differences))


def bootstrap_interval(differences, resamples, level, seed):
    """The percentile interval of the mean of `differences` over `resamples` resamples of the users."""
    if np.all(differences == differences[0]):  # no spread: every resample has the same mean
        return float(differences[0]), float(differences[0])
    interval = stats.bootstrap(
        (differences,), np.mean, n_resamples=resamples, confidence_level=level, method="percentile",
        random_state=np.random.default_rng(seed), vectorized=True,  # the name every SciPy since 1.7 reads
    ).confidence_interval
    return float(interval.low), float(interval.high)


def paired_p_value(differences, test):
    """Two-sided p-value of the paired test that the differences are centred on 0."""
    if test not in TESTS:
        raise RecBoleLLMError(f"significance_test is {test!r}: use one of {', '.join(TESTS)}")
    if not np.any(differences):
        return 1.0  # identical on every user
    if test == "wilcoxon":
        return float(stats.wilcoxon(differences).pvalue)  # users with no difference are left out (zero_method wilcox)
    if np.all(differences == differences[0]):
        return 0.0  # the same non-zero gain for every user
    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def holm(p_values):
    """Holm's step-down adjustment of a family of p-values (family-wise error rate), in the given order."""
    p_values = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p_values, kind="stable")
    scaled = p_values[order] * (len(p_values) - np.arange(len(p_values)))
    adjusted = np.minimum(np.maximum.accumulate(scaled), 1.0)
    result = np.empty_like(adjusted)
    result[order] = adjusted
    return result


def with_holm(differences):
    """Sets p_holm on each PairedDifference of a family (None entries, e.g. the reference's own row, are skipped)."""
    present = [difference for difference in differences if difference is not None]
    for difference, adjusted in zip(present, holm([d.p_value for d in present])):
        difference.p_holm = float(adjusted)
    return differences
