"""`run.py compare A B` (eval/compare.py) on small results files written here, whose answers make every number
worth checking known by hand; its refusals; and docs/evaluation.md's table of the original's claims."""

import csv
from pathlib import Path

import pytest

from eval.report import ORIGINAL
from harness import ROOT, run_cli

QUESTION = "Can you describe this exhibit?"
# (data_id, item_name, reference): five test rows; the first four both runs answered.
ROWS = [("1", "wright-flyer", "The Wright Flyer flew at Kitty Hawk."),
        ("2", "syracuse-dekadrachm", "The Syracuse dekadrachm is a silver coin."),
        ("3", "corinthian-helmet", "A Corinthian helmet of bronze."),
        ("4", "steam-engine", "A steam engine that pumped water."),
        ("5", "silk-kimono", "A silk kimono with cranes.")]


COLUMNS = ["data_id", "item_name", "image_name", "user_question", "model_generated_answer", "ground_truth_answer",
           "semantic_similarity_score"]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]) if rows else COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def results(rows: list[tuple[str, str, str]], answer: str | None, scores: list[float | str],
            **columns: list[float]) -> list[dict]:
    """Records in the original's layout: `answer` for every row, or the reference itself where None."""
    return [{"data_id": data_id, "item_name": item, "image_name": f"{item}-1.jpg", "user_question": QUESTION,
             "model_generated_answer": reference if answer is None else answer, "ground_truth_answer": reference,
             "semantic_similarity_score": score, **{name: values[i] for name, values in columns.items()}}
            for i, ((data_id, item, reference), score) in enumerate(zip(rows, scores, strict=True))]


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[Path, Path]:
    """A: a run folder whose answers are the references, with a token_f1 column of 0.5 that is not what its
    answers give (so its column is read, not recomputed); rows 1-4, and row 5 only it has. B: a CSV whose every
    answer shares no word with its reference nor names its item, each score 0.125 below A's; rows 1-4, and a
    row 6 only it has."""
    (tmp_path / "a" / "eval").mkdir(parents=True)
    a = results(ROWS, None, [0.5, 0.375, 0.25, 0.125, 0.0], token_f1=[0.5] * 5)
    write_csv(tmp_path / "a" / "eval" / "results.csv", a)
    b = results([*ROWS[:4], ("6", "teapot", "A teapot.")], "Nothing to say.", [0.375, 0.25, 0.125, 0.0, 1.0])
    return tmp_path / "a", write_csv(tmp_path / "b.csv", b)


def table_row(output: str, metric: str) -> list[str]:
    [line] = [line for line in output.splitlines() if line.startswith(f"| {metric} |")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_compare_pairs_the_shared_rows_and_reads_each_metric_in_its_direction(two_runs, tmp_path):
    """Over rows 1-4: the score means are (0.5 + 0.375 + 0.25 + 0.125) / 4 = 0.3125 and 0.1875, every row 0.125
    lower in B, so B - A is -0.125 in every resample: [-0.125, -0.125], B better (lower is better). token_f1: A's
    column, 0.5; B's, computed: 0 (no shared word); -0.5 in every resample, A better. item_named: A's answers
    (the references) name each item, B's none: -1, A better. No file has retrieval_rank: no line for it."""
    result = run_cli("compare", *map(str, two_runs), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "4 rows paired; left out: 1 row(s) only A has and 1 row(s) only B has" in result.stdout
    score = table_row(result.stdout, "score")
    assert score[1] == "lower" and score[2].startswith("0.312 [") and score[3].startswith("0.188 [")
    assert score[4:] == ["-0.125 [-0.125, -0.125]", "B better"]
    assert table_row(result.stdout, "token_f1")[2:] == ["0.500 [0.500, 0.500]", "0.000 [0.000, 0.000]",
                                                        "-0.500 [-0.500, -0.500]", "A better"]
    assert table_row(result.stdout, "item_named")[4:] == ["-1.000 [-1.000, -1.000]", "A better"]
    assert "| rouge_l |" in result.stdout and "| chrf |" in result.stdout and "retrieval_rank" not in result.stdout


def test_metric_chooses_the_lines_and_no_difference_reads_as_none(two_runs, tmp_path, capsys):
    """A against itself: every difference is 0, [0, 0], which does not leave 0 out."""
    from run import main

    assert main(["compare", str(two_runs[0]), str(two_runs[0]), "--metric", "score", "--resamples", "1000"]) == 0
    output = capsys.readouterr().out
    assert "5 rows paired (every row of both)" in output
    assert table_row(output, "score")[4:] == ["+0.000 [+0.000, +0.000]", "no clear difference"]
    assert "token_f1" not in output


def bad_inputs(tmp_path: Path, a: Path, b: Path) -> dict[str, tuple[list[str], str]]:
    """Each bad input: the command's arguments and what its one sentence must say."""
    no_score = [{column: cell for column, cell in row.items() if column != "semantic_similarity_score"}
                for row in results(ROWS, None, [0.1] * 5)]
    not_a_number = results(ROWS, None, [0.1, 0.2, "n/a", 0.3, 0.4])
    elsewhere = results([("7", "vase", "A vase.")], None, [0.5])
    average = dict.fromkeys(COLUMNS, "") | {"item_name": "average_semantic_similarity_score",
                                            "semantic_similarity_score": "0.1"}
    files = {name: write_csv(tmp_path / f"{name}.csv", rows) for name, rows in
             (("no_score", no_score), ("not_a_number", not_a_number), ("elsewhere", elsewhere), ("header", []),
              ("average", [average]))}
    (tmp_path / "empty.csv").write_text("")
    return {
        "no score column": ([str(a), str(files["no_score"])], f"{files['no_score']} lacks the column(s) "
                                                              f"['semantic_similarity_score']"),
        "empty file": ([str(tmp_path / "empty.csv"), str(b)], f"{tmp_path / 'empty.csv'} lacks the column(s)"),
        "header only": ([str(a), str(files["header"])], f"{files['header']} holds no rows of answers (only its "
                                                        f"header)."),
        "average row only": ([str(a), str(files["average"])], f"{files['average']} holds no rows of answers (only "
                                                              f"its header and average row)."),
        "not a number": ([str(a), str(files["not_a_number"])], f"{files['not_a_number']}: the "
                                                               f"semantic_similarity_score of its row data_id=3 is "
                                                               f"'n/a', not a finite number."),
        "no shared row": ([str(a), str(files["elsewhere"])], f"{a / 'eval' / 'results.csv'} and {files['elsewhere']} "
                                                             f"share no test row"),
        "no such file": ([str(tmp_path / "missing"), str(b)], f"{tmp_path / 'missing'} is neither a results CSV "
                                                               f"nor a run folder"),
        "unknown metric": ([str(a), str(b), "--metric", "bleu"], "--metric bleu is none of score, token_f1"),
        "metric one side lacks": ([str(a), str(b), "--metric", "retrieval_rank"], "--metric retrieval_rank is not "
                                                                                  "in both"),
    }


def test_bad_input_is_one_sentence_and_exit_2(two_runs, tmp_path, capsys):
    from run import main

    for case, (args, words) in bad_inputs(tmp_path, *two_runs).items():
        assert main(["compare", *args]) == 2, case
        error = capsys.readouterr().err
        assert error.startswith("error: ") and words in error and error.count("\n") == 1, (case, error)


@pytest.mark.slow  # the text metrics of 814 long answers
def test_the_docs_table_of_the_originals_claims_is_what_seed_claims_prints():
    """docs/evaluation.md's section holds bench/seed_claims.py's output as printed, each run's mean score there is
    the one the original published (eval/report.py ORIGINAL, its files' average rows), and every comparison paired
    all 74 test rows of both files."""
    from bench.seed_claims import claims

    printed = claims()
    docs = (ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8")
    section = docs.split("## Which of the original's differences are real")[1].split("\n## ")[0]
    assert printed in section
    rows = [line.strip("| ").split(" | ") for line in printed.splitlines() if line.startswith("| ") and "[" in line]
    runs, comparisons = [row for row in rows if len(row) == 6], [row for row in rows if len(row) == 7]
    assert [run[1].split(" [")[0] for run in runs] == [f"{after:.3f}" for *_, after in ORIGINAL]
    assert [comparison[2] for comparison in comparisons] == ["74"] * 9
