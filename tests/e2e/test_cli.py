"""Bad input: one clear sentence on stderr and exit status 2, before any work is done."""

import argparse
import dataclasses
import itertools
import json

import pytest
import torch

from engine.config import TrainConfig, from_approach
from engine.runtime import pick_device
from errors import UsageError
from harness import ROOT, run_cli


@pytest.mark.parametrize("args,message", [
    (["--approach", "bogus"], "unknown approach 'bogus'"),
    (["--approach", "full", "--gpus", "2"], "runs on one device; --gpus 2 needs a parallel approach"),
    (["--approach", "full", "--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--approach", "full", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--optimizer", "adamw8bit", "--optimizer-offload", "cpu"], "--optimizer-offload cpu keeps fp32 moments in host"),
    (["--precision", "bf8"], "--precision must be auto, fp32, bf16-mixed or bf16, not 'bf8'"),
    (["--approach", "lora_ddp", "--gpus", "2", "--fsdp-reduce-dtype", "bf16"],
     "--fsdp-reduce-dtype is for runs sharded by FSDP (--parallel fsdp or pipeline+fsdp); this run has --parallel ddp"),
    (["--approach", "full", "--dataset", "no/such-dataset-here"], "cannot load dataset"),
    (["--approach", "full", "--train-modules", "nothing_matches_this", "--max-steps", "1"], "matches no linear layer"),
    (["--approach", "lora", "--lora-target", "nothing_matches_this", "--max-steps", "1"], "matches no linear layer"),
    (["--approach", "full_mp", "--gpus", "2", "--split", "9"], "--split needs 1 increasing layer indices between 1 "
                                                               "and 3 for 2 stages, not [9]"),
])
def test_bad_flags_fail_with_one_sentence_and_leave_the_folder_as_it_was(args, message, tmp_path):
    """A --split the model cannot take is refused from its config before any rank starts; refusals that come only
    as the model is built (what a --lora-target matches) take back what the run wrote: the corrected command
    needs no --overwrite (an empty folder given stays, empty: tests/unit/engine/test_output_folder.py)."""
    result = run_cli(*args, "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_help_lists_all_six_approaches(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for name in ("lora", "qlora", "lora_ddp", "full", "full_mp", "full_fsdp"):
        assert f"  {name} " in result.stdout


def test_unbuilt_approaches_are_refused_not_substituted():
    with pytest.raises(UsageError, match=r"--parallel must be none, ddp, fsdp, pipeline or pipeline\+fsdp, not 'tp'\."):
        from_approach("full_mp", gpus=2, parallel="tp")
    with pytest.raises(UsageError, match=r"--parallel pipeline\+fsdp needs --stages S"):
        from_approach("full_mp", gpus=4, parallel="pipeline+fsdp")
    with pytest.raises(UsageError, match=r"--stages is for --parallel pipeline\+fsdp"):
        from_approach("full_mp", gpus=4, stages=2)
    with pytest.raises(UsageError, match="--gpus 6 cannot form --stages 4 of equal size"):
        from_approach("full_mp", gpus=6, parallel="pipeline+fsdp", stages=4)
    with pytest.raises(UsageError, match="--micro-batches 3 must divide --batch-size 4"):
        from_approach("full_mp", gpus=2, micro_batches=3)
    with pytest.raises(UsageError, match="an NF4 base cannot be fully fine-tuned"):
        from_approach("full_fsdp", gpus=2, quant="nf4")


def test_every_combination_of_the_three_flags_is_in_the_docs_and_built_or_refused():
    """The table of docs/approaches.md names every --adapter x --quant x --parallel combination (`any` standing
    for all parallelisms); each is accepted with exactly its three choices, or refused in one sentence where the
    table says refused. That each accepted one equals one process is in the test file the row names."""
    rows = [[cell.strip(" `") for cell in line.strip("|").split("|")] for line in
            (ROOT / "docs" / "approaches.md").read_text().splitlines() if line.startswith(("| none |", "| lora |"))]
    parallels = TrainConfig.__dataclass_fields__["parallel"].metadata["choices"]
    listed = {(adapter, quant, parallel): what for adapter, quant, where, what, _ in rows
              for parallel in (parallels if where == "any" else [where])}
    assert set(listed) == set(itertools.product(("none", "lora"), ("none", "nf4"), parallels))
    for (adapter, quant, parallel), what in listed.items():
        flags = dict(adapter=adapter, quant=quant, parallel=parallel, gpus=None if parallel == "none" else 4,
                     stages=2 if parallel == "pipeline+fsdp" else None)
        if what.startswith("refused"):
            with pytest.raises(UsageError, match=r"^[^\n]+\.$"):
                from_approach("full", **flags)
        else:
            config = from_approach("full", **flags)
            assert (config.adapter, config.quant, config.parallel) == (adapter, quant, parallel)


def test_more_gpus_than_present_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match="--gpus 4 asks for more GPUs than the 2 present"):
        pick_device("auto", 4)
    assert pick_device("cpu", 4) == torch.device("cpu")


def test_cuda_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU is visible"):
        pick_device("cuda", 1)


# The arguments a subcommand needs besides the flag under test, none of which loads anything.
NEEDED = {"plan": [], "data": [], "eval": ["--model", "tiny"],
          "ask": ["--model", "tiny", "--image", "x.jpg", "What is it?"],
          "score": ["--csv", "x.csv", "--model", "tiny", "--output", "y.csv"], "merge": ["--adapter", "a", "--output",
          "b"], "report": ["run"], "compare": ["a.csv", "b.csv"]}
UNBOUNDED_ABOVE = {"max_grad_norm"}  # inf is a declared value: no clipping


def numeric_flags() -> list[tuple[str, str, type, dict]]:
    """(command, flag, type, range) of every numeric flag of every command: a training flag's range is its
    TrainConfig option's, a subcommand's the one run.py's add_number declared."""
    from run import SUBCOMMANDS, train_parser

    fields = {field.name: field.metadata for field in dataclasses.fields(TrainConfig)}
    flags = []
    for command, parser in [("train", train_parser()), *((name, make()) for name, (make, _) in SUBCOMMANDS.items())]:
        for action in parser._actions:
            if action.type in (int, float):
                bounds = getattr(action, "bounds", None) or fields[action.dest]
                flags.append((command, action.option_strings[0], action.type, bounds))
    return flags


def outside(kind: type, bounds: dict) -> list[str]:
    """Values each range refuses: just past each bound, and nan and inf where a float must be finite."""
    values = []
    if bounds["minimum"] is not None:
        values.append(str(kind(bounds["minimum"]) - 1))
    if bounds["above"] is not None:
        values.append(str(kind(bounds["above"])))
    if bounds["maximum"] is not None:
        values.append(str(kind(bounds["maximum"]) + 1))
    if bounds["below"] is not None:
        values.append(str(kind(bounds["below"])))
    return values + (["nan", "inf", "-inf"] if kind is float and bounds["finite"] else ["nan"] if kind is float else [])


def test_every_numeric_flag_of_every_command_has_a_range_that_refuses_in_one_sentence(tmp_path, monkeypatch, capsys):
    from run import main

    monkeypatch.chdir(tmp_path)
    flags = numeric_flags()
    assert {command for command, *_ in flags} == {"train", "plan", "data", "eval", "ask", "compare"}
    for command, flag, kind, bounds in flags:
        assert any(bounds[key] is not None for key in ("minimum", "above", "maximum", "below")), flag
        if kind is float and flag.removeprefix("--").replace("-", "_") not in UNBOUNDED_ABOVE:
            assert bounds["finite"] or bounds["maximum"] is not None or bounds["below"] is not None, flag
        for value in outside(kind, bounds):
            given = f"{flag}={value}"  # one word: argparse would take a separate -1 or -inf for a flag
            argv = [given, "--output-dir", "out"] if command == "train" else [command, *NEEDED[command], given]
            assert main(argv) == 2, (flag, value)
            error = capsys.readouterr().err
            assert error.startswith(f"error: {flag} must be ") and error.count("\n") == 1, error
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_plan_refuses_a_sequence_past_the_context_and_a_gpus_memory_on_a_cpu(tmp_path, monkeypatch, capsys):
    from run import main

    monkeypatch.chdir(tmp_path)
    for flags, words in ((["--sequence-length", "2049"], "--sequence-length 2049 is past the model's context of 2048"),
                         (["--device", "cpu", "--gpu-memory", "24"], "--gpu-memory is a GPU's")):
        assert main(["plan", "--model", "tiny", *flags]) == 2
        error = capsys.readouterr().err
        assert words in error and error.count("\n") == 1, error


def test_image_edges_must_be_in_order():
    with pytest.raises(UsageError, match="--image-shortest-edge 500 is longer than --image-longest-edge 400"):
        from_approach("lora", image_shortest_edge=500, image_longest_edge=400)


def test_the_resolved_configuration_that_config_json_holds_has_no_auto_and_no_empty_setting():
    for gpu in (False, True):
        settings = json.loads(from_approach("lora").resolved(gpu).to_json())
        assert [name for name, value in settings.items() if value in ("auto", "")] == [], gpu
        assert settings["device"] == ("cuda" if gpu else "cpu") and settings["output_dir"] == "runs/lora"


def test_every_optional_flag_of_every_command_shows_its_default():
    from run import SUBCOMMANDS, add_debug, train_parser

    switches = (argparse._HelpAction, argparse._StoreTrueAction, argparse._StoreFalseAction)
    for command, parser in [("train", train_parser()), *((name, add_debug(make())) for name, (make, _)
                                                         in SUBCOMMANDS.items())]:
        for action in parser._actions:
            if action.option_strings and not action.required and not isinstance(action, switches):
                assert "default" in action.help, (command, action.option_strings[0])
