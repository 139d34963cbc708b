"""`run.py report`'s HTML page: index.html and images/ in one folder, which opens offline, with no server.

The page holds the charts of eval/charts.py as inline SVG; every evaluated row, matched across runs
(eval/report.py `matched_rows`), with a thumbnail of its exhibit's picture, its question and reference, and each
run's answer and score; and the runs' config.json side by side. The layout is eval/report_page.html,
whose script sorts the rows worst first on load. Every text that comes from a run is escaped.
"""

import json
from html import escape
from pathlib import Path
from string import Template

from engine.config import TrainConfig
from engine.data.sources import load_splits, row_images
from engine.tensorboard import Scalars
from errors import UsageError
from eval.charts import Score, loss_chart, score_chart, score_of, svg, throughput_chart
from eval.report import ORIGINAL, Run, answers_rows, matched_rows
from eval.results_csv import SCORE

PAGE = Template(Path(__file__).with_name("report_page.html").read_text(encoding="utf-8"))
THUMBNAIL = 160  # pixels, the longer side
PICTURES = "images"  # the thumbnails' folder, beside index.html


def write_page(runs: list[Run], output: Path, scalars: Scalars) -> Path:
    """Write `output`/index.html and its thumbnails; the same charts go to `scalars` (TensorBoard)."""
    scores = [score_of(run.name, run.scores) for run in runs if run.scores]
    notes = []
    if all(run.config["dataset"] == "musequest" for run in runs):  # the original's numbers are on MuseQuest's test set
        scores += [Score(f"original: {approach}, {hardware}", before, after, "self")
                   for approach, hardware, before, after in ORIGINAL]
    scorers = sorted({score.scorer for score in scores})
    if len(scorers) > 1:
        notes.append(f"The score chart holds bars of {len(scorers)} scorers ({', '.join(scorers)}), each bar labelled "
                     f"with its own: compare bars of one scorer only.")
    notes += [f"{run.name} {run.stopped}: it did not finish." for run in runs if run.stopped]
    charts = {"score": score_chart(scores),
              "loss": loss_chart({run.name: run.summary["history"] for run in runs}),
              "throughput": throughput_chart({run.name: run.summary for run in runs})}
    drawn = {name: svg(figure) for name, figure in charts.items()}
    for name, figure in charts.items():
        scalars.figure(0, f"report/{name}", figure)
    rows = matched_rows([run.rows for run in runs])
    pictures, missing = thumbnails(rows, [data_of(run.config) for run in runs], output / PICTURES)
    page = output / "index.html"
    page.write_text(PAGE.substitute(
        title=escape("museft report: " + ", ".join(run.name for run in runs)),
        runs="Runs: " + ", ".join(f"<b>{escape(run.name)}</b> ({escape(str(run.folder))})" for run in runs),
        notes="".join(f'<p class="note">{escape(note)}</p>' for note in notes + missing),
        score_chart=drawn["score"], loss_chart=drawn["loss"], throughput_chart=drawn["throughput"],
        answers=answers_table(runs), rows=row_table(runs, rows, pictures), configs=config_table(runs)),
        encoding="utf-8")
    return page


def data_of(config: dict) -> dict:
    """`load_splits`' arguments for the data a run's config.json names: its test split as the run cut it."""
    return dict(source=config["dataset"], limit_exhibits=config.get("limit_exhibits"), split_by=config.get("split_by"),
                held_out=(config.get("validation_fraction", TrainConfig.validation_fraction),
                          config.get("test_fraction", TrainConfig.test_fraction)))


def thumbnails(rows: list[list[dict | None]], data: list[dict], folder: Path) -> tuple[list[str | None], list[str]]:
    """Each row's picture as a small JPEG in `folder` (its path from the page; None for a row without one), from
    the test split (`data`: load_splits' arguments per run) of the first run that evaluated the row; and a note
    per data set that could not be loaded (a hub data set, offline), whose rows go without pictures."""
    folder.mkdir(exist_ok=True)
    splits, notes = {}, []
    keys = [json.dumps(settings, sort_keys=True) for settings in data]
    for key, settings in dict(zip(keys, data, strict=True)).items():
        try:
            test = load_splits(**settings)["test"]
        except UsageError as error:
            notes.append(f"No pictures from the data set {settings['source']}: {error}")
            continue
        splits[key] = test, {str(data_id): index for index, data_id in enumerate(test["data_id"])}
    paths = []
    for number, row in enumerate(rows):
        run, record = next((run, record) for run, record in enumerate(row) if record is not None)
        test, indices = splits.get(keys[run], (None, {}))
        index = indices.get(record["data_id"])
        images = [] if index is None else row_images(test[index])
        image = images[0] if images else None
        if image is None:
            paths.append(None)
            continue
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        image.save(folder / f"row-{number}.jpg", quality=85)
        paths.append(f"{folder.name}/row-{number}.jpg")
    return paths, notes


def row_table(runs: list[Run], rows: list[list[dict | None]], pictures: list[str | None]) -> str:
    """The answers table: picture, exhibit and question, reference, then each run's answer and score."""
    header = "".join(f'<th>{escape(run.name)}: answer</th><th class="sortable">{escape(run.name)}: score</th>'
                     for run in runs)
    largest = max((float(record[SCORE]) for row in rows for record in row if record), default=1.0) or 1.0
    lines = [f"<thead><tr><th>picture</th><th>exhibit and question</th><th>reference answer</th>{header}</tr></thead>",
             "<tbody>"]
    for row, picture in zip(rows, pictures, strict=True):
        first = next(record for record in row if record is not None)
        image = f'<img src="{escape(picture)}" alt="{escape(first["image_name"])}">' if picture else "no picture"
        cells = [f"<td>{image}</td>",
                 f'<td class="text"><b>{escape(first["item_name"])}</b> (data_id {escape(first["data_id"])})\n'
                 f'{escape(first["user_question"])}</td>',
                 f'<td class="text"><div>{escape(first["ground_truth_answer"])}</div></td>']
        for record in row:
            if record is None:  # a run that did not evaluate this row: sorted after every score
                cells.append('<td></td><td class="score" data-value="-1">—</td>')
                continue
            score = float(record[SCORE])
            cells.append(f'<td class="text"><div>{escape(record["model_generated_answer"])}</div></td>'
                         f'<td class="score" data-value="{score}" style="--heat: {0.6 * score / largest:.2f}">'
                         f"{score:.3f}</td>")
        lines.append('<tr class="row">' + "".join(cells) + "</tr>")
    return "\n".join(lines + ["</tbody>"])


def answers_table(runs: list[Run]) -> str:
    """The runs' answer metrics, as report.md's second table."""
    header, *rows = answers_rows(runs) or [[]]
    lines = ["<thead><tr>" + "".join(f"<th>{escape(cell)}</th>" for cell in header) + "</tr></thead>", "<tbody>"]
    lines += ["<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows]
    return "\n".join(lines + ["</tbody>"])


def config_table(runs: list[Run]) -> str:
    """One line per setting of any run's config.json; the ones whose values differ first, highlighted."""
    keys = sorted(set().union(*(run.config for run in runs)))
    values = {key: [_setting(run.config, key) for run in runs] for key in keys}
    differing = [key for key in keys if len(set(values[key])) > 1]
    lines = ["<thead><tr><th>setting</th>" + "".join(f"<th>{escape(run.name)}</th>" for run in runs) + "</tr></thead>",
             "<tbody>"]
    for key in differing + [key for key in keys if key not in differing]:
        shown = "".join(f"<td>{escape(value)}</td>" for value in values[key])
        lines.append(f'<tr{" class=differs" if key in differing else ""}><td>{escape(key)}</td>{shown}</tr>')
    return "\n".join(lines + ["</tbody>"])


def _setting(config: dict, key: str) -> str:
    if key not in config:
        return "—"
    value = config[key]
    return value if isinstance(value, str) else json.dumps(value)
