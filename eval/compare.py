"""`python run.py compare A B`: is run B better than run A, or is the gap between their means noise?

Both runs answered a test split; the rows both answered are paired (eval/report.py `matched_rows`: the same id,
picture, question and reference), and each metric is compared over those rows only: each side's mean with its
95% bootstrap interval, and B - A with the interval of the paired difference (eval/bootstrap.py), read as a
verdict in the metric's better direction. A side is a run folder (its eval/results.csv) or a results CSV in the
original's layout. The metrics are the score and every per-row metric of eval/metrics.py that both sides have;
a file written before the text metrics existed (the original's) gets them computed from its answers.
"""

from dataclasses import dataclass
from pathlib import Path

from errors import UsageError
from eval.bootstrap import mean_interval, paired_difference, verdict
from eval.metrics import ROW_METRICS
from eval.report import ROW_KEY, matched_rows
from eval.results_csv import SCORE, SCORE_METRIC, metric_values, read_results

BETTER = {SCORE_METRIC: "lower", **ROW_METRICS}  # every metric compare knows, in the table's order
NEEDED = (*ROW_KEY, "model_generated_answer", SCORE)  # besides read_results' own: pairing, text metrics, score


@dataclass(frozen=True)
class Compared:
    """One metric of two runs over their paired rows: (mean, low, high) of A, of B and of B - A."""

    metric: str
    a: tuple[float, float, float]
    b: tuple[float, float, float]
    difference: tuple[float, float, float]

    @property
    def verdict(self) -> str:
        return verdict(self.difference[1], self.difference[2], BETTER[self.metric])


def compared(metric: str, values_a: list[float], values_b: list[float], pairs: list[tuple[int, int]],
             resamples: int = 10_000) -> Compared:
    """`metric` of runs A and B (each its values of all its rows) over the rows both answered (`pairs`, from
    paired_positions), with their bootstrap intervals."""
    a, b = [values_a[row_a] for row_a, _ in pairs], [values_b[row_b] for _, row_b in pairs]
    return Compared(metric, mean_interval(a, resamples=resamples), mean_interval(b, resamples=resamples),
                    paired_difference(a, b, resamples=resamples))


def compare_results(a: Path, b: Path, metrics: list[str] | None = None, resamples: int = 10_000) -> str:
    """The command: which rows pair, then the table of `metrics` (default: every one both sides have)."""
    unknown = [name for name in metrics or [] if name not in BETTER]
    if unknown:
        raise UsageError(f"--metric {unknown[0]} is none of {', '.join(BETTER)}.")
    file_a, file_b = results_file(a), results_file(b)
    rows_a, rows_b = read_side(file_a), read_side(file_b)
    pairs = paired_positions(rows_a, rows_b)
    if not pairs:
        raise UsageError(f"{file_a} and {file_b} share no test row (a row is the same row when its "
                         f"{', '.join(ROW_KEY)} are); compare runs on the same test split.")
    values_a, values_b = metric_values(rows_a, file_a), metric_values(rows_b, file_b)
    shared = [name for name in values_a if name in values_b]
    missing = [name for name in metrics or [] if name not in shared]
    if missing:
        raise UsageError(f"--metric {missing[0]} is not in both {file_a} and {file_b}, which share "
                         f"{', '.join(shared)}.")
    table = markdown([compared(name, values_a[name], values_b[name], pairs, resamples) for name in metrics or shared])
    return (f"A: {file_a}\nB: {file_b}\n{paired_line(len(pairs), len(rows_a), len(rows_b))}\n\n{table}\n"
            f"Intervals: 95%, percentile bootstrap over the paired rows ({resamples:,} resamples); B − A is paired "
            f"by row. score is 1 − cosine.")


def results_file(path: Path) -> Path:
    """A run folder's eval/results.csv, or `path` itself."""
    return path / "eval" / "results.csv" if path.is_dir() else path


def read_side(file: Path) -> list[dict[str, str]]:
    """The records of a results file with every column compare needs; a file that is missing, damaged, empty
    (read_results) or short of a column is one sentence naming it."""
    if not file.is_file():
        raise UsageError(f"{file} is neither a results CSV nor a run folder with eval/results.csv.")
    rows = read_results(file)
    missing = [column for column in NEEDED if column not in rows[0]]
    if missing:
        raise UsageError(f"{file} lacks the column(s) {missing} that run.py compare needs.")
    return rows


def paired_positions(rows_a: list[dict], rows_b: list[dict]) -> list[tuple[int, int]]:
    """Where each row both runs answered (matched_rows) stands in A's rows and in B's, in A's order; a row only
    one run has is left out. matched_rows hands back the records themselves: their identity gives the position."""
    where_a = {id(row): index for index, row in enumerate(rows_a)}
    where_b = {id(row): index for index, row in enumerate(rows_b)}
    return [(where_a[id(row_a)], where_b[id(row_b)]) for row_a, row_b in matched_rows([rows_a, rows_b])
            if row_a is not None and row_b is not None]


def paired_line(paired: int, rows_a: int, rows_b: int) -> str:
    left_out = [f"{count} row(s) only {side} has" for side, count in (("A", rows_a - paired), ("B", rows_b - paired))
                if count]
    return f"{paired} rows paired" + (f"; left out: {' and '.join(left_out)}" if left_out else " (every row of both)")


def markdown(comparisons: list[Compared]) -> str:
    """The table: one line per metric, each mean and B - A with its interval, and the verdict."""
    lines = ["| metric | better | A | B | B − A | verdict |", "|---|---|---|---|---|---|"]
    lines += [f"| {row.metric} | {BETTER[row.metric]} | {interval(row.a)} | {interval(row.b)} | "
              f"{interval(row.difference, signed=True)} | {row.verdict} |" for row in comparisons]
    return "\n".join(lines) + "\n"


def interval(estimate: tuple[float, float, float], signed: bool = False) -> str:
    """"0.037 [0.031, 0.044]"; a difference with its sign ("+0.005 [-0.002, +0.011]")."""
    shown = "{:+.3f}" if signed else "{:.3f}"
    mean, low, high = (shown.format(value) for value in estimate)
    return f"{mean} [{low}, {high}]"
