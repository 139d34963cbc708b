"""A run never destroys or adopts what it did not write: a used --output-dir needs --resume or --overwrite,
--overwrite deletes only what a run writes, merge never deletes its --output; and the original's results
ship in the repository, so nothing reads a folder outside it."""

import json
import re
import shutil

import pytest
import torch

from engine.outputs.folder import check_new, claim, prepare, prepare_for_run
from engine.runtime import Runtime
from errors import UsageError
from harness import ROOT, SEED_RESULTS, assert_one_sentence, run_cli, snapshot, spawn

CHEAP = ["--limit-exhibits", "2", "--batch-size", "2", "--skip-eval", "--eval-every", "1", "--device", "cpu"]


# ---- the rule, on folders alone ---------------------------------------------------------------

def _run_folder(out, *extra: str):
    """A folder as a run leaves it, without training: what --overwrite may delete, and `extra` files."""
    (out / "checkpoints" / "step-000003").mkdir(parents=True)
    (out / "checkpoints" / "step-000003" / "meta.json").write_text("{}")
    (out / "final").mkdir()
    (out / ".tmp-final").mkdir()
    for name in ("config.json", "summary.json", *extra):
        (out / name).write_text("{}")
    return out


def test_an_empty_or_missing_folder_takes_any_run(tmp_path):
    for resume, overwrite in ((False, False), (True, False), (False, True)):
        prepare(tmp_path / "missing", resume, overwrite)
        prepare(tmp_path, resume, overwrite)
    assert not (tmp_path / "missing").exists() and not any(tmp_path.iterdir())


@pytest.mark.parametrize("resume, overwrite, extra, message", [
    (True, True, (), "give one of them"),
    (False, False, (), "already holds a run; continue it with --resume, replace it with --overwrite"),
    (False, True, ("notes.txt",), "notes.txt was not written by a run"),
])
def test_a_used_run_folder_is_left_as_it_is(resume, overwrite, extra, message, tmp_path):
    out = _run_folder(tmp_path, *extra)
    before = snapshot(out)
    with pytest.raises(UsageError, match=re.escape(message)):
        prepare(out, resume, overwrite)
    assert snapshot(out) == before and (out / ".tmp-final").is_dir()


@pytest.mark.parametrize("resume, overwrite, message", [
    (False, False, "is not empty and holds no museft run"),
    (True, False, "--resume: {out} holds no museft run"),
    (False, True, "--overwrite: {out} holds no museft run"),
])
def test_a_folder_without_a_run_is_never_adopted_or_emptied(resume, overwrite, message, tmp_path):
    (tmp_path / "checkpoints").mkdir()  # even one with a run's names in it
    (tmp_path / "thesis.pdf").write_text("years of work")
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match=re.escape(message.format(out=tmp_path))):
        prepare(tmp_path, resume, overwrite)
    assert snapshot(tmp_path) == before


def test_overwrite_deletes_what_a_run_writes_and_resume_keeps_it(tmp_path):
    out = _run_folder(tmp_path)
    before = snapshot(out)
    prepare(out, resume=True, overwrite=False)
    assert snapshot(out) == before
    prepare(out, resume=False, overwrite=True)
    assert not any(out.iterdir())


def test_a_run_claims_its_folder_first_so_what_a_failed_one_leaves_can_be_overwritten(tmp_path):
    out = tmp_path / "run"
    claim(out, '{"seed": 1}')
    (out / "base").mkdir()  # and then it failed, say on a --train-modules that matches nothing
    with pytest.raises(UsageError, match="already holds a run"):
        prepare(out, resume=False, overwrite=False)
    claim(out, '{"seed": 2}')  # a resumed run keeps its config.json until it has started
    assert json.loads((out / "config.json").read_text()) == {"seed": 1}
    prepare(out, resume=False, overwrite=True)
    assert not any(out.iterdir())


def test_overwrite_refuses_a_link_even_under_a_runs_name(tmp_path):
    out = _run_folder(tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("mine")
    (out / "eval").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="eval was not written by a run"):
        prepare(out, resume=False, overwrite=True)
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "mine" and (out / "config.json").exists()


def _prepare_on_rank(rank: int, world: int, folder) -> str:
    try:
        prepare_for_run(folder, False, False, Runtime(torch.device("cpu"), rank, world))
    except UsageError as error:
        return str(error)
    return ""


def test_every_rank_gets_the_main_ranks_refusal(tmp_path):
    out = _run_folder(tmp_path / "run")
    messages = spawn(2, _prepare_on_rank, tmp_path, folder=out)
    assert messages[0] == messages[1] and "already holds a run" in messages[0]


def test_merge_output_must_be_new_or_empty_and_publishing_there_deletes_nothing(tmp_path):
    from engine.outputs.export import _publish  # here: the ranks spawned above import this module, and this is slow

    check_new(tmp_path / "new", "--output")
    check_new(tmp_path, "--output")  # empty
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights.bin").write_text("mine")
    with pytest.raises(UsageError, match="already exists and is not empty"):
        check_new(tmp_path / "model", "--output")
    (tmp_path / ".tmp-merged").mkdir()
    with pytest.raises(UsageError, match="is in the way"):
        check_new(tmp_path / "merged", "--output")
    with pytest.raises(OSError):  # filled after the check: fails rather than deletes
        _publish(tmp_path / "model", lambda tmp: (tmp / "config.json").write_text("{}"), replace=False)
    assert (tmp_path / "model" / "weights.bin").read_text() == "mine" and not (tmp_path / ".tmp-model").exists()
    (tmp_path / "empty").mkdir()
    _publish(tmp_path / "empty", lambda tmp: (tmp / "config.json").write_text("{}"), replace=False)
    assert (tmp_path / "empty" / "config.json").is_file()


# ---- nothing outside the repository -----------------------------------------------------------

def test_the_originals_results_ship_in_the_repository_and_nothing_reads_shared():
    assert SEED_RESULTS.is_relative_to(ROOT) and len(list(SEED_RESULTS.glob("*.csv"))) == 21
    assert 'eval = ["seed_results/*.csv",' in (ROOT / "pyproject.toml").read_text()
    sources = [path for path in ROOT.rglob("*.py") if ".venv" not in path.parts and "build" not in path.parts]
    readers = [str(path) for path in sources if re.search(r"\.\./shared|[\"']shared[\"']", path.read_text())]
    assert not readers


# ---- through the command line -----------------------------------------------------------------

@pytest.fixture(scope="module")
def used(tmp_path_factory):
    """A finished 3-step LoRA run (seed 0, one checkpoint: step 3); each test works on its own copy."""
    out = tmp_path_factory.mktemp("used") / "run"
    result = run_cli(*CHEAP, "--max-steps", "3", "--output-dir", str(out), cwd=out.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


@pytest.fixture
def run_copy(used, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(used, out, symlinks=True)
    return out


@pytest.mark.slow
def test_a_second_run_into_a_used_folder_is_refused_and_changes_nothing(run_copy):
    before = snapshot(run_copy)
    result = run_cli(*CHEAP, "--max-steps", "2", "--seed", "1", "--output-dir", str(run_copy), cwd=run_copy.parent)
    assert_one_sentence(result, f"--output-dir {run_copy} already holds a run; continue it with --resume, "
                                "replace it with --overwrite")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_overwrite_replaces_the_run_and_refuses_with_a_users_file_inside(run_copy):
    (run_copy / "notes.txt").write_text("what I tried")
    before = snapshot(run_copy)
    args = [*CHEAP, "--max-steps", "2", "--seed", "1", "--overwrite", "--output-dir", str(run_copy)]
    assert_one_sentence(run_cli(*args, cwd=run_copy.parent), f"--overwrite: {run_copy / 'notes.txt'} was not "
                                                             "written by a run")
    assert snapshot(run_copy) == before
    (run_copy / "notes.txt").unlink()
    result = run_cli(*args, cwd=run_copy.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run_copy / "config.json").read_text())["seed"] == 1
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["step-000002"]  # step 3 was the old run's
    after = snapshot(run_copy)
    assert after["base/model.safetensors"] != before["base/model.safetensors"]  # seed 1's base, not seed 0's
    assert json.loads((run_copy / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_resume_on_a_folder_that_is_no_run_is_refused(tmp_path):
    (tmp_path / "thesis.pdf").write_text("years of work")
    before = snapshot(tmp_path)
    result = run_cli(*CHEAP, "--max-steps", "2", "--resume", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert_one_sentence(result, f"--resume: {tmp_path} holds no museft run (it has no config.json)")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_merge_into_an_existing_run_folder_is_refused_and_the_folder_is_untouched(run_copy):
    before = snapshot(run_copy)
    result = run_cli("merge", "--adapter", str(run_copy / "final"), "--output", str(run_copy), "--device", "cpu",
                     cwd=run_copy.parent)
    assert_one_sentence(result, f"--output {run_copy} already exists and is not empty")
    assert snapshot(run_copy) == before and not (run_copy.parent / ".tmp-run").exists()
