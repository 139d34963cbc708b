"""Error bars for a run's mean score and for the difference between two runs, by the percentile bootstrap.

Why: the original reported single means (LoRA 0.037, QLoRA 0.042, ...) over 74 test rows, and a mean of 74 rows
moves by more than some of those gaps when other rows are drawn. The bootstrap asks how far: it draws the rows
again with replacement, many times, and reads the interval off the spread of the resampled means. No
distribution is assumed, which matters for scores bunched near 0 with a long tail.

Two runs answered the same test rows, so they are compared row by row (`paired_difference`): resampling a row
takes both runs' values of it, and the row-to-row spread that both share (an easy exhibit is easy for both)
cancels out of the difference. Resampling the runs separately would count it twice and hide real gaps.
numpy only, seeded: the same values give the same interval every time.
"""

import numpy as np

# Resampled means are drawn in blocks of at most this many values (8 bytes each for the indices), so that
# 10,000 resamples of a test set of thousands of rows do not hold one array of hundreds of MB.
_BLOCK_VALUES = 4_000_000


def mean_interval(values: list[float] | np.ndarray, *, resamples: int = 10_000, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and the central `level` interval of the means of `resamples`
    resamples of them (as many values, drawn with replacement), at the percentiles linear interpolation gives."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"need a non-empty list of values, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    per_block = max(1, _BLOCK_VALUES // values.size)
    means = np.concatenate([values[rng.integers(0, values.size, size=(count, values.size))].mean(axis=1)
                            for count in _blocks(resamples, per_block)])
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(values.mean()), float(low), float(high)


def paired_difference(a: list[float] | np.ndarray, b: list[float] | np.ndarray, *, resamples: int = 10_000,
                      level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean of b - a, low, high), `a` and `b` paired by position (row i of one run against row i of the other).
    Drawing the same rows for both and taking the mean difference is drawing the per-row differences."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need one value of each side per row, got shapes {a.shape} and {b.shape}")
    return mean_interval(b - a, resamples=resamples, level=level, seed=seed)


def verdict(low: float, high: float, better: str) -> str:
    """The interval of B - A read in words: a side is better only when the interval leaves 0 out, towards it.
    `better` is the metric's direction: "higher" or "lower" values are better."""
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', not {better!r}")
    if low <= 0 <= high:
        return "no clear difference"
    b_is_higher = low > 0
    return "B better" if b_is_higher == (better == "higher") else "A better"


def _blocks(total: int, size: int) -> list[int]:
    """`total` split into counts of at most `size`."""
    if total < 1:
        raise ValueError(f"need at least one resample, got {total}")
    return [min(size, total - start) for start in range(0, total, size)]
