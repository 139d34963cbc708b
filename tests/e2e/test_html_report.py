"""run.py report's HTML page, rendered by a real headless Chromium from two small evaluated runs; its escaping,
the `report` extra it needs and the folder it writes, on hand-written run folders; a finished run's charts in
TensorBoard."""

import json
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine.data.sources import load_splits
from engine.tensorboard import Scalars
from eval.report import MARK
from eval.results_csv import read_results, write_results
from finetune import charts_to_tensorboard
from harness import hand_made_run, run_engine, snapshot
from run import main

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
RUNS = {"lr-low": 5e-3, "lr-high": 2e-2}  # two names that are not part of each other, for the text checks


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """Two 2-step LoRA runs on one exhibit that differ in learning rate, each evaluated (2 rows, 4-token answers;
    the second finds the base model's score in the cache), and their report."""
    root = tmp_path_factory.mktemp("runs")
    for name, lr in RUNS.items():
        run_engine(root / name, "lora", batch_size=2, gpus=None, limit_exhibits=1, max_steps=2, lr=lr,
                   skip_eval=False, max_new_tokens=4)
    assert main(["report", *(str(root / name) for name in RUNS), "--output", str(root / "report")]) == 0
    return root


def chromium(page: Path, *flags: str) -> str:
    result = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", *flags, page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def text(markup: str) -> str:
    """What a reader sees of some HTML: its text, tags and entities gone, white space collapsed."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", markup)).split())


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium executable (apt-get install chromium; .ci/run does)")
def test_the_rendered_page_shows_the_charts_every_row_and_its_picture_worst_first(report, tmp_path):
    page = report / "report" / "index.html"
    chromium(page, f"--screenshot={tmp_path / 'page.png'}", "--window-size=1400,3000")
    colours = Image.open(tmp_path / "page.png").convert("RGB").getcolors(maxcolors=2**24)
    assert len(colours) > 200  # charts, tinted scores and pictures; a blank page has one colour

    dom = chromium(page, "--dump-dom")  # the page after its script ran
    charts = [text(chart) for chart in re.findall(r"<svg.*?</svg>", dom, re.S)]
    assert len(charts) == 3  # score, loss, throughput and memory
    assert all(name in chart for chart in charts for name in RUNS)
    for name in RUNS:
        scores = json.loads((report / name / "eval" / "results.json").read_text())
        assert f"{scores['baseline_score']:.3f} (base)" in charts[0] and f"{scores['score']:.3f} (base)" in charts[0]
    assert "0.037 (self)" in charts[0]  # the original's LoRA run, by its own scorer

    records = {name: {row["data_id"]: row for row in read_results(report / name / "eval" / "results.csv")}
               for name in RUNS}
    rows = re.findall(r'<tr class="row">.*?</tr>', dom, re.S)
    shown = [re.search(r"\(data_id (\S+)\)", text(row))[1] for row in rows]
    assert sorted(shown) == sorted(records["lr-low"]) == sorted(records["lr-high"])  # every row, once
    for row, data_id in zip(rows, shown, strict=True):
        for name in RUNS:
            record = records[name][data_id]
            for field in ("user_question", "ground_truth_answer", "model_generated_answer"):
                assert " ".join(record[field].split()) in text(row), (name, field)
        [picture] = re.findall(r'<img src="([^"]+)"', row)
        assert (page.parent / picture).is_file()
    first_scores = [float(re.search(r'class="score" data-value="([^"]+)"', row)[1]) for row in rows]
    assert first_scores == sorted((float(r["semantic_similarity_score"]) for r in records["lr-low"].values()),
                                  reverse=True)  # sorted worst first by the page's own script
    assert 'data-order="worst"' in dom


def test_every_text_of_a_run_is_escaped_and_differing_settings_come_first(tmp_path):
    runs = [hand_made_run(tmp_path / "a", 1e-3, "<script>alert(1)</script> & more"),
            hand_made_run(tmp_path / "b", 2e-3, "x")]
    assert main(["report", *map(str, runs), "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in page
    configs = page[page.index('<table id="configs">'):]
    differing_first = r"<tbody>\s*<tr class=differs><td>lr</td><td>0.001</td><td>0.002</td></tr>\s*<tr><td>approach"
    assert re.search(differing_first, configs)
    assert Image.open(tmp_path / "report" / "images" / "row-0.jpg").size == (160, 160)  # the exhibit's picture


def test_rows_whose_data_set_cannot_be_loaded_go_without_pictures_and_the_page_says_why(tmp_path):
    run = hand_made_run(tmp_path / "a", 1e-3, "x")
    (tmp_path / "gone").mkdir()  # a folder that holds no data set
    (run / "config.json").write_text(json.dumps({"dataset": str(tmp_path / "gone")}))
    assert main(["report", str(run), "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert f"No pictures from the data set {tmp_path / 'gone'}: folder" in page
    assert "<td>no picture</td>" in page and "<img" not in page


def hide_matplotlib(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails as if not installed
    for module in ("eval.charts", "eval.html_report"):
        monkeypatch.delitem(sys.modules, module, raising=False)


def test_without_matplotlib_the_table_is_still_shown_and_one_sentence_says_how_to_install(tmp_path, monkeypatch,
                                                                                         capsys):
    hide_matplotlib(monkeypatch)
    assert main(["report", str(hand_made_run(tmp_path / "a", 1e-3, "x")), "--output", str(tmp_path / "report")]) == 2
    shown = capsys.readouterr()
    assert shown.err == "error: charts need matplotlib, the report extra: pip install -e '.[report]' (or pip install " \
                        "'matplotlib>=3.8').\n"
    assert (tmp_path / "report" / "report.md").read_text() in shown.out


def test_a_finished_run_puts_its_charts_in_tensorboard_or_says_in_one_line_why_not(tmp_path, monkeypatch, capsys):
    run = hand_made_run(tmp_path / "run", 1e-3, "x")
    summary = dict(json.loads((run / "summary.json").read_text()), steps=2,
                   eval=json.loads((run / "eval" / "results.json").read_text()))
    scalars = Scalars(run / "tensorboard")
    charts_to_tensorboard(SimpleNamespace(out=run), summary, scalars)
    scalars.close()
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["charts/loss", "charts/score"]
    assert [image.step for image in events.Images("charts/score")] == [2]

    hide_matplotlib(monkeypatch)
    charts_to_tensorboard(SimpleNamespace(out=tmp_path / "elsewhere"), summary, Scalars(tmp_path / "elsewhere",
                                                                                        enabled=False))
    assert capsys.readouterr().out == "no charts in TensorBoard: charts need matplotlib, the report extra: pip " \
                                      "install -e '.[report]' (or pip install 'matplotlib>=3.8').\n"
    assert not (tmp_path / "elsewhere").exists()


def test_a_report_never_writes_over_a_users_files_nor_into_a_run(tmp_path, capsys):
    """A folder of the user's own index.html and report.md, a run folder, a folder inside one, and a stray
    temporary sibling are each refused in one sentence and left as they were; an earlier report, and an
    interrupted one's leftover, are replaced whole (one TensorBoard event file, not two)."""
    run = hand_made_run(tmp_path / "run", 1e-3, "x")
    users = tmp_path / "mine"
    users.mkdir()
    (users / "index.html").write_text("my page")
    (users / "report.md").write_text("my notes")
    stray = tmp_path / "stray"
    (tmp_path / ".tmp-stray").mkdir()
    (tmp_path / ".tmp-stray" / "notes.txt").write_text("mine too")
    refusals = {users: "is not empty and holds no report", run: "is inside the run folder",
                run / "report": "is inside the run folder", stray: ".tmp-stray is in the way"}
    before = snapshot(tmp_path)
    for output, words in refusals.items():
        assert main(["report", str(run), "--output", str(output)]) == 2
        error = capsys.readouterr().err
        assert words in error and error.count("\n") == 1, error
    assert snapshot(tmp_path) == before and not (run / "report").exists()

    report = tmp_path / "report"
    for _ in range(2):
        assert main(["report", str(run), "--output", str(report)]) == 0
    assert len(list((report / "tensorboard").iterdir())) == 1 and (report / MARK).is_file()
    leftover = tmp_path / ".tmp-report"
    shutil.copytree(report, leftover)  # as a report killed midway leaves it
    (report / "report.md").unlink()
    assert main(["report", str(run), "--output", str(report)]) == 0
    assert (report / "report.md").is_file() and not leftover.exists()


def evaluated_run(folder: Path, rows: list[tuple[str, str, str]], dataset: str = "musequest", **summary) -> Path:
    """A hand-written run whose test rows are (data_id, question, reference), each answered "an answer"."""
    hand_made_run(folder, 1e-3, "an answer")
    records = [{"data_id": data_id, "item_name": "vase", "image_name": "vase.jpg", "user_question": question,
                "model_generated_answer": "an answer", "ground_truth_answer": reference}
               for data_id, question, reference in rows]
    write_results(folder / "eval" / "results.csv", records, [0.5] * len(records))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, dataset=dataset)))
    (folder / "summary.json").write_text(json.dumps(dict(json.loads((folder / "summary.json").read_text()),
                                                         **summary)))
    return folder


def test_rows_are_matched_by_question_and_reference_and_every_row_and_run_is_kept(tmp_path, capsys):
    """Two runs on different test sets share no row; a test split whose data_ids repeat shows every row; two
    runs in folders of one name keep their own columns and curves; a run that stopped is marked; the original's
    rows are shown only for MuseQuest; a `$...$` name is shown as written."""
    ours = evaluated_run(tmp_path / "a" / "$x$", [("1", "What is it?", "A vase."), ("1", "Who made it?", "Potters."),
                                                  ("1", "Who made it?", "Potters.")], dataset="my/data")
    theirs = evaluated_run(tmp_path / "b" / "$x$", [("1", "What is it?", "A helmet.")], dataset="other/data",
                           completed=False, steps=1, total_steps=3)
    assert main(["report", str(ours), str(theirs), "--output", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out
    assert "| a/$x$ |" in table and "| b/$x$ (stopped at step 1 of 3) |" in table and "original" not in table
    page = (tmp_path / "report" / "index.html").read_text()
    rows = re.findall(r'<tr class="row">.*?</tr>', page, re.S)
    assert len(rows) == 4  # 3 of one test set (2 alike, both kept), 1 of the other: none side by side
    assert sum("A helmet." in row for row in rows) == 1 and sum("Potters." in row for row in rows) == 2
    for row in rows:  # each row has one run's answer and the other's empty cell
        assert row.count("an answer") == 1 and row.count('data-value="-1"') == 1
    charts = [text(chart) for chart in re.findall(r"<svg.*?</svg>", page, re.S)]
    assert all("a/$x$" in chart and "b/$x$" in chart for chart in charts[1:])  # the names as written, each
    assert "original" not in charts[0] and "b/$x$ stopped at step 1 of 3: it did not finish." in text(page)


@pytest.mark.parametrize("name", ["summary.json", "config.json", "eval/results.json", "eval/results.csv"])
@pytest.mark.parametrize("damage", ["cut", "garbage", "shape"])
def test_every_file_the_report_reads_damaged_is_one_sentence_naming_it(tmp_path, capsys, name, damage):
    run = hand_made_run(tmp_path / "run", 1e-3, "x")
    path = run / name
    whole = path.read_bytes()
    path.write_bytes({"cut": whole[: len(whole) // 2], "garbage": b"\xff\xfe\x00 not a run's file",
                      "shape": b"[1, 2]" if path.suffix == ".json" else whole.replace(b"\n3,", b"\n3,x,y,", 1)}[damage])
    assert main(["report", str(run), "--output", str(tmp_path / "report")]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and error.count("\n") == 1 and error.startswith("error: "), error
    assert not (tmp_path / "report").exists()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium executable (apt-get install chromium; .ci/run does)")
def test_an_answer_without_spaces_wraps_inside_the_window(tmp_path):
    runs = [hand_made_run(tmp_path / "a", 1e-3, ",s" * 2000), hand_made_run(tmp_path / "b", 2e-3, "x")]
    assert main(["report", *map(str, runs), "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.html").read_text()
    measured = tmp_path / "report" / "measured.html"  # the page, and a line that writes its width into the DOM
    measured.write_text(page.replace("</body>", "<script>document.body.dataset.width = "
                                                "document.documentElement.scrollWidth;</script></body>"))
    width = int(re.search(r'data-width="(\d+)"', chromium(measured, "--dump-dom", "--window-size=1400,900"))[1])
    assert width <= 1400


def test_a_run_on_a_train_only_file_shows_the_pictures_of_its_own_test_split(tmp_path):
    """A data set that is one JSONL file, cut by --split-by item_name: the page finds each test row's picture in
    the test split as the run cut it (the file alone has no test split to read)."""
    colours = {"vase": (200, 40, 40), "helmet": (40, 200, 40), "kimono": (40, 40, 200), "engine": (200, 200, 40)}
    lines = []
    for item, colour in colours.items():
        for photo in range(2):
            Image.new("RGB", (40, 30), colour).save(tmp_path / f"{item}-{photo}.jpg")
            lines.append(json.dumps({"file_name": f"{item}-{photo}.jpg", "question": "What is this?",
                                     "answer": f"A {item}.", "item_name": item}))
    data = tmp_path / "museum.jsonl"
    data.write_text("\n".join(lines) + "\n")
    settings = dict(split_by="item_name", validation_fraction=0.25, test_fraction=0.25)
    test = load_splits(str(data), split_by="item_name", held_out=(0.25, 0.25))["test"]
    run = evaluated_run(tmp_path / "run", [(str(data_id), "What is this?", "A thing.") for data_id in test["data_id"]],
                        dataset=str(data))
    (run / "config.json").write_text(json.dumps(dict(json.loads((run / "config.json").read_text()), **settings)))
    assert main(["report", str(run), "--output", str(tmp_path / "report")]) == 0
    pictures = sorted((tmp_path / "report" / "images").glob("*.jpg"))
    assert len(pictures) == len(test) == 2  # the test split: one item's two photos
    item = test[0]["item_name"]
    for picture in pictures:  # each the colour of the test item's photos
        assert Image.open(picture).convert("RGB").getpixel((5, 5)) == pytest.approx(colours[item], abs=8)
