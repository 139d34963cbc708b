"""A run never destroys or adopts what it did not write: a used --output-dir needs --resume or --overwrite,
--overwrite deletes only what a run writes, merge never deletes its --output; and the original's results
ship in the repository, so nothing reads a folder outside it."""

import json
import re
import shutil

import pytest
import torch

from engine.outputs.folder import check_new, claimed, prepare, prepare_for_run
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


def test_a_run_claims_its_folder_first_and_takes_back_what_a_failed_setup_wrote(tmp_path):
    main = Runtime(torch.device("cpu"))
    out = tmp_path / "run"
    with pytest.raises(UsageError, match="matches nothing"), claimed(out, '{"seed": 1}', main, resume=False):
        (out / "base").mkdir()  # OUT/base, and then the setup failed, say on a --lora-target that matches nothing
        raise UsageError("--lora-target matches nothing")
    assert not out.exists()  # as it was: the corrected command needs no --overwrite
    out.mkdir()
    with pytest.raises(UsageError, match="matches nothing"), claimed(out, '{"seed": 1}', main, resume=False):
        raise UsageError("--lora-target matches nothing")
    assert out.is_dir() and not any(out.iterdir())  # a folder the user made stays, empty
    out.rmdir()
    with claimed(out, '{"seed": 1}', main, resume=False):
        (out / "base").mkdir()
    # A run that fails after its setup (mid-training) leaves a run folder, which --overwrite may clear.
    with pytest.raises(UsageError, match="already holds a run"):
        prepare(out, resume=False, overwrite=False)
    with claimed(out, '{"seed": 2}', main, resume=True):  # a resumed run keeps its config.json until it has started
        pass
    assert json.loads((out / "config.json").read_text()) == {"seed": 1}
    prepare(out, resume=False, overwrite=True)
    assert not any(out.iterdir())


def test_of_two_runs_started_at_once_into_one_folder_the_second_is_refused_and_the_first_untouched(tmp_path):
    out = tmp_path / "run"
    prepare(out, resume=False, overwrite=False)  # the first finds the folder empty
    prepare(out, resume=False, overwrite=False)  # and so does the second, started at the same time
    with claimed(out, '{"seed": 1}', Runtime(torch.device("cpu")), resume=False):
        with pytest.raises(UsageError, match="was claimed by another run that started at the same time"):
            with claimed(out, '{"seed": 2}', Runtime(torch.device("cpu")), resume=False):
                pass
        (out / "base").mkdir()
    assert json.loads((out / "config.json").read_text()) == {"seed": 1} and (out / "base").is_dir()


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


def test_every_file_a_run_publishes_has_the_mode_the_umask_gives(tmp_path, monkeypatch):
    """safetensors creates its files 0600 whatever the umask; a published folder's files and folders, and a
    file written whole, get the umask's mode (0640 and 0750 under 027, 0644 and 0755 under 022)."""
    from safetensors.torch import save_file

    from engine.outputs import publish

    for umask in (0o022, 0o027):
        monkeypatch.setattr(publish, "UMASK", umask)
        tmp = tmp_path / f".tmp-final-{umask:o}"
        (tmp / "shards").mkdir(parents=True)
        save_file({"w": torch.ones(2)}, tmp / "shards" / "model.safetensors")
        assert (tmp / "shards" / "model.safetensors").stat().st_mode & 0o777 == 0o600  # as safetensors made it
        final = publish.publish_folder(tmp, tmp_path / f"final-{umask:o}")
        publish.write_file(tmp_path / f"w-{umask:o}.safetensors", lambda path: save_file({"w": torch.ones(2)}, path))
        for path in (final, final / "shards"):
            assert path.stat().st_mode & 0o777 == 0o777 & ~umask, path
        for path in (final / "shards" / "model.safetensors", tmp_path / f"w-{umask:o}.safetensors"):
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path


def test_overwrite_with_data_the_run_refuses_leaves_the_old_run_as_it_was(tmp_path):
    """The data is checked before --overwrite empties anything: a refused data set costs the old run nothing."""
    out = _run_folder(tmp_path / "run")
    data = tmp_path / "dialogs.jsonl"
    data.write_text('{"question": "What is it?", "answer": "A vase."}\nnot json\n')
    before = snapshot(tmp_path)
    result = run_cli("--approach", "lora", "--model", "tiny", *CHEAP, "--dataset", str(data), "--split-by", "row",
                     "--overwrite", "--output-dir", str(out), cwd=tmp_path)
    assert result.returncode == 2 and "line 2" in result.stderr, result.stderr[-2000:]
    assert snapshot(tmp_path) == before
