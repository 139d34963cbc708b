"""The charts of a run and of `run.py report`, drawn by matplotlib: inline SVG for the report's page, images
for TensorBoard (`SummaryWriter.add_figure` rasterises the same figure with Agg).

matplotlib is the `report` extra, not a runtime package: importing this module without it raises the
UsageError that says how to install it. Figures are built without pyplot, so no GUI backend is chosen
and no global list of open figures grows.
"""

import io
from dataclasses import dataclass

from errors import UsageError

try:
    from matplotlib import rc_context
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
except ModuleNotFoundError as error:
    raise UsageError("charts need matplotlib, the report extra: pip install -e '.[report]' "
                     "(or pip install 'matplotlib>=3.8').") from error

BEFORE, AFTER = "#b9c6d8", "#2f6db5"
WIDTH = 9  # inches: about 860 pixels on the page, 900 in TensorBoard


def plain(text: str) -> str:
    """`text` as matplotlib shows it literally: a name with two `$` is no formula to typeset."""
    return text.replace("$", r"\$")


@dataclass
class Score:
    """One pair of bars: a score before and after training (1 - cosine, 0 is best), and who scored it."""

    label: str
    before: float | None
    after: float
    scorer: str


def score_of(label: str, results: dict) -> Score:
    """The Score of a run's eval/results.json (or summary.json's "eval")."""
    return Score(label, results.get("baseline_score"), results["score"], results["scorer"])


def score_chart(scores: list[Score]) -> Figure:
    """Horizontal bars, top to bottom in the given order, each labelled with its value and scorer."""
    figure = Figure(figsize=(WIDTH, 1.2 + 0.45 * len(scores)), layout="constrained")
    axes = figure.add_subplot()
    height = 0.4  # of a bar; a pair fills 0.8 of a row
    for offset, when, color in ((-height / 2, "before", BEFORE), (height / 2, "after", AFTER)):
        shown = [(row, score) for row, score in enumerate(scores) if getattr(score, when) is not None]
        values = [getattr(score, when) for _, score in shown]
        bars = axes.barh([row + offset for row, _ in shown], values, height, color=color, label=f"{when} training")
        labels = [f" {value:.3f} ({score.scorer})" for value, (_, score) in zip(values, shown, strict=True)]
        axes.bar_label(bars, labels, fontsize=8)
    axes.set_yticks(range(len(scores)), [plain(score.label) for score in scores])
    axes.invert_yaxis()
    largest = max(max(score.after, score.before or 0) for score in scores)
    axes.set_xlim(0, 1.35 * (largest or 1.0))  # room for the labels right of the longest bar
    axes.set_xlabel("1 − cosine similarity to the reference answer (0 is identical; lower is better)")
    axes.legend(loc="lower right")
    return figure


def loss_chart(histories: dict[str, dict]) -> Figure:
    """Every run's train (solid) and validation (dashed) loss on one pair of axes, by optimizer step."""
    figure = Figure(figsize=(WIDTH, 4), layout="constrained")
    axes = figure.add_subplot()
    for number, (name, history) in enumerate(histories.items()):
        for key, style, what in (("train_loss", "-", "train"), ("val_loss", "--", "validation")):
            if history.get(key):
                steps, losses = zip(*history[key], strict=True)
                axes.plot(steps, losses, style, marker="o", markersize=3, color=f"C{number}",
                          label=plain(f"{name} {what}"))
    axes.set(xlabel="optimizer step", ylabel="loss (mean over answer tokens)")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend()
    return figure


def throughput_chart(summaries: dict[str, dict]) -> Figure:
    """Each run's samples/s and tokens/s, and the peak memory of each of its ranks."""
    figure = Figure(figsize=(WIDTH, 3.4), layout="constrained")
    samples, tokens, memory = figure.subplots(1, 3)
    names, colors = list(map(plain, summaries)), [f"C{number}" for number in range(len(summaries))]
    for axes, key, title in ((samples, "samples_per_s", "samples/s"), (tokens, "tokens_per_s", "tokens/s")):
        values = [summary[key] for summary in summaries.values()]
        axes.bar_label(axes.bar(names, values, color=colors), [f"{value:.3g}" for value in values], fontsize=8)
        axes.set_title(title)
    for number, summary in enumerate(summaries.values()):
        ranks = summary["ranks"]
        width = 0.8 / len(ranks)
        bars = memory.bar([number - 0.4 + width * (index + 0.5) for index in range(len(ranks))],
                          [rank["peak_memory_bytes"] / 2**30 for rank in ranks], width, color=colors[number])
        memory.bar_label(bars, [f"r{rank['rank']}" for rank in ranks], fontsize=7)
    memory.set_xticks(range(len(names)), names)
    memory.set_title("peak memory per rank (GiB)")
    return figure


def run_charts(name: str, summary: dict) -> dict[str, Figure]:
    """A finished, evaluated run's own charts (its summary.json with "eval"), by TensorBoard tag."""
    return {"charts/score": score_chart([score_of(name, summary["eval"])]),
            "charts/loss": loss_chart({name: summary["history"]})}


def svg(figure: Figure) -> str:
    """The figure as an <svg> element for an HTML page: its text kept as text (searchable, and the page's test
    reads it), no XML prolog, no date."""
    buffer = io.StringIO()
    with rc_context({"svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]
