"""Command line: parse flags into a TrainConfig and hand over to the engine.

    python run.py --approach lora                 # tiny model on CPU, Idefics2-8B on a GPU
    python run.py --approach full --model ./dir --dataset ./musequest_imagefolder
    python run.py merge --adapter runs/lora/final --output merged/
    python run.py eval --model runs/full/final            # answer and score the test split
    python run.py ask --adapter runs/lora/final --image photo.jpg "Can you describe this exhibit?"
    python run.py score --csv results.csv --model ID --output rescored.csv
    python run.py report runs/lora runs/full              # a markdown table and an HTML page comparing runs
    python run.py compare runs/lora runs/qlora            # each metric's gap, with its 95% interval: real or noise?
"""

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
import traceback
import typing
import warnings
from pathlib import Path

from engine.config import APPROACHES, HUB_ID, TrainConfig, check_scorer, flag, from_approach, out_of_range
from errors import Terminated, UsageError, debug, explain

if typing.TYPE_CHECKING:  # imported by the commands that need it: --help stays fast
    from PIL import Image


def approach_help() -> str:
    return "approaches:\n" + "\n".join(f"  {name:<10} {line}" for name, (*_, line) in APPROACHES.items())


def show_default(value: object) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_option(parser: argparse.ArgumentParser, field: dataclasses.Field, kind: type) -> None:
    """One TrainConfig field as a flag whose default is None: only what the user gives overrides the approach."""
    meta, default = field.metadata, field.default
    shown = meta["default_help"] or ("" if default is None or kind is bool else show_default(default))
    spec = dict(dest=field.name, default=None, help=meta["help"] + (f" (default: {shown})" if shown else ""))
    if kind is bool:
        spec["action"] = "store_false" if default else "store_true"
    elif kind == bool | None:  # --flag and --no-flag, neither: the default decides by device
        spec["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is tuple:
        spec.update(nargs="+", type=typing.get_args(kind)[0])
    else:  # int, float, str, or one of them | None
        spec["type"] = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
    if meta["choices"]:  # shown like argparse's choices but checked by validate(): one sentence, as from Python
        spec["metavar"] = "{" + ",".join(meta["choices"]) + "}"
    parser.add_argument(flag(field), **spec)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py", description="Fine-tune Idefics2/Idefics3 on image question/answer data.",
        epilog=approach_help() + "\n\nsubcommands (each with --help):\n  plan       memory per GPU and disk, before "
               "anything loads\n  data       what the model will be taught: tokens, loss, image tokens\n"
               "  merge      fold an adapter into its base\n"
               "  eval       answer and score the test split\n  ask        answer one question about one photo\n"
               "  score      re-score a results CSV\n"
               "  report     compare runs: a markdown table and an HTML page\n"
               "  compare    is run B better than run A? each metric's B - A with its 95% interval",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_training_flags(parser)
    return add_debug(parser)


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    kinds = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.metadata["cli"]:
            add_option(parser, field, kinds[field.name])


def add_number(parser: argparse.ArgumentParser, name: str, kind: type, help: str, default: float | None = None,
               **bounds: float | bool) -> None:
    """A numeric flag of a subcommand with its range, in engine/config.py `option`'s keywords (minimum, above,
    maximum, below, finite), which `check_numbers` enforces as validate() does a training flag's."""
    action = parser.add_argument(name, type=kind, default=default, help=help)
    action.bounds = dict(minimum=None, above=None, maximum=None, below=None, finite=False) | bounds


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for action in parser._actions:  # argparse keeps no public list of a parser's flags
        value = getattr(args, action.dest, None)
        limits = out_of_range(value, action.bounds) if hasattr(action, "bounds") and value is not None else ""
        if limits:
            raise UsageError(f"{action.option_strings[0]} must be {limits}, not {value:g}.")


def add_debug(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--debug", action="store_true", help="on a failure, show the traceback before the "
                                                             "one-sentence error (as MUSEFT_DEBUG=1 does)")
    return parser


def merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py merge", description="Fold a LoRA/QLoRA adapter into its base "
                                     "and write a standalone Hugging Face model folder.")
    parser.add_argument("--adapter", required=True, type=Path, help="adapter folder (e.g. runs/lora/final)")
    parser.add_argument("--output", required=True, type=Path, help="where the merged model goes")
    parser.add_argument("--model", help="the base (default: base_model_name_or_path of adapter_config.json)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    return parser


def merge(args: argparse.Namespace) -> str:
    from engine.outputs.merge import merge_adapter

    return f"merged model written to {merge_adapter(args.adapter, args.output, args.model, args.device)}"


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that name the model `eval` and `ask` answer with, and how long its answers may be."""
    parser.add_argument("--model", help="a Hugging Face folder or id; with --adapter, the base (default: the "
                                        "adapter's own base)")
    parser.add_argument("--adapter", type=Path, help="a LoRA/QLoRA adapter folder, folded into its base "
                                                     "(default: none)")
    add_number(parser, "--max-new-tokens", int, "answer length cap (default: 512, as the original)", 512, minimum=1)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")


def check_model_flags(args: argparse.Namespace, command: str) -> None:
    """Refuses, before anything loads, flags that name no model: neither flag, an adapter that is not a
    folder, or a --model that is no path and not shaped like a Hugging Face id either."""
    if not args.model and not args.adapter:
        raise UsageError(f"run.py {command} needs --model, --adapter or both.")
    if args.adapter and not args.adapter.is_dir():
        raise UsageError(f"--adapter {args.adapter} is not a folder.")
    if args.model and not Path(args.model).exists() and not HUB_ID.fullmatch(args.model):
        raise UsageError(f"--model {args.model} is neither a folder nor a Hugging Face id.")


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py eval", description="Answer the test split with a model and "
                                     "score the answers against the references (1 - cosine; 0 is best).")
    add_model_flags(parser)
    parser.add_argument("--dataset", help="as for training (default: the run's own, when --adapter or --model is "
                                          "a run's OUT/final; else musequest)")
    add_number(parser, "--limit-exhibits", int, "keep only the first K exhibits (default: the run's own, as for "
                                                "--dataset; else all)", minimum=1)
    parser.add_argument("--split-by", help="as for training (default: the run's own, as for --dataset)")
    parser.add_argument("--scorer", default="base", help="self (the evaluated model, the original's way), base "
                                                         "(--base: one judge for every approach; default, so that "
                                                         "runs compare) or a model folder")
    parser.add_argument("--base", help="the judge of --scorer base (default: the adapter's base, else --model)")
    add_number(parser, "--batch-size", int, "rows generated at once (default: 4)", 4, minimum=1)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/eval"), help="where results.csv/.json go "
                                                                                "(default: runs/eval)")
    return parser


def evaluate(args: argparse.Namespace) -> str:
    from engine.runtime import pick_device
    from eval.evaluate import RESULTS_CSV, RESULTS_JSON, evaluate_test_split, evaluated_base, trained_on

    check_model_flags(args, "eval")
    check_scorer(args.scorer)
    device = pick_device(args.device, 1)
    base = args.base or evaluated_base(args.model, args.adapter)
    run_data = trained_on(args.model, args.adapter)  # a run's OUT/final is evaluated on that run's test split
    dataset = args.dataset or run_data.get("dataset", TrainConfig.dataset)
    limit = args.limit_exhibits if args.limit_exhibits is not None else run_data.get("limit_exhibits")
    split_by = args.split_by if args.split_by is not None else run_data.get("split_by")
    taken = [f"{flag} {value}" for flag, value, given in (("--dataset", dataset, args.dataset),
                                                          ("--limit-exhibits", limit, args.limit_exhibits),
                                                          ("--split-by", split_by, args.split_by))
             if run_data and given is None and value is not None]
    if taken:
        print(f"data: the run's own {' '.join(taken)} (a flag given overrides it)")
    # The run's held-out fractions go with its --split-by: the same data and settings cut the same test split.
    held_out = tuple(run_data.get(key, getattr(TrainConfig, key)) for key in ("validation_fraction", "test_fraction"))
    data = dict(source=dataset, limit_exhibits=limit, split_by=split_by, held_out=held_out)
    evaluate_test_split(args.model, args.adapter, data, args.scorer, base, args.output_dir, device,
                        args.batch_size, args.max_new_tokens)  # shows every row and the score
    return f"every answer and score in {args.output_dir / RESULTS_CSV} and {RESULTS_JSON}"


def ask_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py ask", description="One answer from a model to a question about "
                                     "one or more photos, prompted and decoded (greedy) as the evaluation does.")
    add_model_flags(parser)
    parser.add_argument("--image", required=True, type=Path, action="append",
                        help="a photo (any format Pillow reads); repeat it for several, shown in that order")
    parser.add_argument("question", help='e.g. "Can you describe this exhibit?"')
    return parser


def read_photo(path: Path) -> "Image.Image":
    """An --image, decoded now, so that a damaged file is refused before the model loads."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UsageError(f"--image {path} is not a file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # past Pillow's limit: refused, not read
            image = Image.open(path)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UsageError(f"--image {path} has more pixels than the {Image.MAX_IMAGE_PIXELS / 1e6:.1f} "
                         f"megapixels Pillow reads safely; scale it down first.") from error
    except (UnidentifiedImageError, OSError) as error:
        raise UsageError(f"--image {path} is not a picture Pillow can read ({error}).") from error
    return image


def ask(args: argparse.Namespace) -> str:
    images = [read_photo(path) for path in args.image]
    check_model_flags(args, "ask")
    from engine.data.checks import special_token_in
    from engine.runtime import pick_device
    from eval.evaluate import evaluated_base
    from models.load import config_and_processor

    token = special_token_in(args.question, config_and_processor(evaluated_base(args.model, args.adapter))[1])
    if token:
        raise UsageError(f"the question holds {token!r}, which the tokenizer reads as one of the model's special "
                         f"tokens; remove or reword it.")
    from engine.greedy import answer_rows
    from eval.evaluate import load_evaluated
    from eval.generate import question_row

    device = pick_device(args.device, 1)
    model, processor = load_evaluated(args.model, args.adapter, device)
    [answer] = answer_rows(model, processor, [question_row(images, args.question)], args.max_new_tokens, device)
    return answer


def score_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py score", description="Re-score a results CSV that has the "
                                     "original's columns model_generated_answer and ground_truth_answer.")
    parser.add_argument("--csv", required=True, type=Path, help="the results file to score")
    parser.add_argument("--model", required=True, help="the model whose embeddings score (folder or id)")
    parser.add_argument("--scorer", default="self", help="self (--model itself, the original's way; default, "
                                                         "unlike eval's base: the original scored its published files "
                                                         "so, and re-scoring one reproduces them), base (the same, "
                                                         "batched and padding-masked) or a folder")
    parser.add_argument("--output", required=True, type=Path, help="the scored CSV, in the original's layout")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    return parser


def score(args: argparse.Namespace) -> str:
    from engine.runtime import pick_device
    from eval.answers_table import metrics_line
    from eval.evaluate import rescore_csv

    if not args.csv.is_file():
        raise UsageError(f"--csv {args.csv} is not a file.")
    check_scorer(args.scorer)
    results = rescore_csv(args.csv, args.model, args.scorer, args.output, pick_device(args.device, 1))
    return (f"score {results['score']} ({results['scorer']} scorer, {results['rows']} rows) written to {args.output}"
            f"\n{metrics_line(results)}")


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py report", description="Compare runs: a markdown table (score, train "
                                     "time, ranks, memory, trainable parameters; the original's numbers beside them), "
                                     "printed, and an HTML page with charts, every answer and the configurations.")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with summary.json)")
    parser.add_argument("--output", type=Path, default=Path("runs/report"),
                        help="folder for report.md, index.html, its images/ and tensorboard/ (default: runs/report)")
    return parser


def report(args: argparse.Namespace) -> str:
    from engine.outputs.publish import publish_folder
    from engine.tensorboard import Scalars
    from eval.report import read_runs, start_report_folder
    from eval.report import report as table

    runs = read_runs(args.runs)  # each file checked whole before anything is written
    markdown = table(runs)
    tmp = start_report_folder(args.output, args.runs)  # written whole, then swapped in for an earlier report
    (tmp / "report.md").write_text(markdown)
    print(markdown)  # before the page, which needs the report extra: without it, the table is still shown
    scalars = Scalars(tmp / "tensorboard")  # the same view in TensorBoard
    scalars.text(0, "report", markdown)
    missing_extra = None
    try:
        from eval.html_report import write_page

        write_page(runs, tmp, scalars)
    except UsageError as error:  # the page needs the report extra: the table is whole, and kept
        missing_extra = error
    scalars.close()
    publish_folder(tmp, args.output)
    if missing_extra is not None:
        raise missing_extra
    return f"written to {args.output / 'report.md'} and {args.output / 'index.html'} (open it in a browser)"


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py compare", description="Compare two runs over the test rows both "
                                     "answered: each metric's mean with its 95% bootstrap interval, B - A with the "
                                     "interval of the paired difference, and whether it shows a difference.")
    parser.add_argument("a", type=Path, help="run A: a run folder (its eval/results.csv) or a results CSV")
    parser.add_argument("b", type=Path, help="run B: a run folder or a results CSV")
    parser.add_argument("--metric", nargs="+", help="the metrics to compare: score (1 - cosine) or per-row metrics "
                                                    "of eval/metrics.py, such as token_f1 or item_named (default: "
                                                    "every one both have; text metrics a file lacks are computed from "
                                                    "its answers)")
    add_number(parser, "--resamples", int, "bootstrap resamples (default: 10000)", 10_000, minimum=1000)
    return parser


def compare(args: argparse.Namespace) -> str:
    from eval.compare import compare_results

    return compare_results(args.a, args.b, args.metric, args.resamples)


def plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py plan", description="Each rank's memory for a run (parameters, gradients, optimizer state, "
        "activations, peak) and each phase's peak (training, writing OUT/final, generating the evaluation's answers, "
        "judging them), whether every phase fits, the largest batch that does, and the disk it writes; for GPUs "
        "unless --device cpu. It takes the training flags; no weights are loaded: seconds on a CPU.")
    add_training_flags(parser)
    add_number(parser, "--gpu-memory", float, "GiB of each GPU, as torch reports it (default: the visible GPU's); "
                                               "8%% is kept free", above=0, finite=True)
    add_number(parser, "--sequence-length", int, "tokens a row, at most the model's context (default: the widest "
                                                 "batch of the data set)", minimum=1)
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return parser


def plan(args: argparse.Namespace) -> str:
    from engine.plan.fit import describe

    config, result = planned(args)
    return json.dumps(result) if args.json else describe(config, result)


def planned(args: argparse.Namespace, search: bool = True) -> tuple[TrainConfig, dict]:
    """The config `run.py plan`'s flags give, and its plan (bench/original_runs.py runs it too)."""
    from engine.plan.fit import budget_for, plan_run

    settings = {name: tuple(value) if isinstance(value, list) else value for name, value in vars(args).items()
                if name not in ("gpu_memory", "sequence_length", "json", "debug", "approach")}
    config = from_approach(args.approach or TrainConfig.approach, **settings)
    gpu = config.device != "cpu"
    if args.gpu_memory is not None and not gpu:
        raise UsageError("--gpu-memory is a GPU's; a plan for --device cpu is judged against --memory-budget GiB.")
    budget = budget_for(gpu, config.memory_budget, args.gpu_memory)
    return config, plan_run(config, gpu, budget, args.sequence_length, search)


def data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py data", description="What the model will be taught, before any GPU time: rows, images, tokens "
        "per row, the tokens that carry loss and the image tokens, through the training collator itself. It takes "
        "the training flags (--dataset, --split-by, --model, --image-*, --max-length, ...); no weights are loaded.")
    add_training_flags(parser)
    parser.add_argument("--show", metavar="[SPLIT:]DATA_ID", help="print this row as the model reads it, the tokens "
                                                                  "that carry loss marked (default: none, the report "
                                                                  "on the whole data set)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return parser


def data(args: argparse.Namespace) -> str:
    import torch

    from engine.build import configure_processor
    from engine.data.audit import audit, describe, shown_row
    from engine.data.checks import check_data
    from engine.data.sources import data_settings, load_splits
    from models.load import config_and_processor

    settings = {name: tuple(value) if isinstance(value, list) else value for name, value in vars(args).items()
                if name not in ("show", "json", "debug", "approach")}
    config = from_approach(args.approach or TrainConfig.approach, **settings)
    gpu = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    config = config.resolved(gpu)  # the model a run would take here: its processor counts the tokens
    splits = load_splits(**data_settings(config))
    check_data(splits, config, config.model)  # what a run refuses, refused here in its own words
    processor = config_and_processor(config.model)[1]
    configure_processor(processor, config)
    if args.show is None:
        report = audit(splits, processor, config.max_length)
        return json.dumps(report) if args.json else describe(report, f"{config.dataset} (model {config.model})")
    wanted, data_id = args.show.split(":", 1) if args.show.split(":", 1)[0] in splits else (None, args.show)
    found = [(name, i) for name, split in splits.items() if wanted in (None, name)
             for i, row_id in enumerate(split["data_id"]) if str(row_id) == data_id]
    if not found:
        raise UsageError(f"--show {args.show}: no row of the data set has that data_id.")
    if len(found) > 1:
        named = ", ".join(sorted({name for name, _ in found}))
        raise UsageError(f"--show {args.show}: rows of the {named} splits have that data_id; name the split, as in "
                         f"--show {found[0][0]}:{data_id}.")
    [(name, index)] = found
    terminal = sys.stdout.isatty() and not args.json
    shown = shown_row(splits[name][index], processor, colour=terminal)
    if args.json:
        return json.dumps({"split": name, "row": index, "data_id": data_id, "rendered": shown})
    marked = "in green" if terminal else "between [[ and ]]"
    return f"row {index} (data_id={data_id}) of the {name!r} split; the tokens that carry loss are {marked}:\n{shown}"


SUBCOMMANDS = {"plan": (plan_parser, plan), "data": (data_parser, data), "merge": (merge_parser, merge),
               "eval": (eval_parser, evaluate),
               "ask": (ask_parser, ask), "score": (score_parser, score), "report": (report_parser, report),
               "compare": (compare_parser, compare)}


def subcommand(name: str, argv: list[str]) -> int:
    make_parser, run = SUBCOMMANDS[name]
    parser = add_debug(make_parser())
    args = parser.parse_args(argv)
    if args.debug:
        os.environ["MUSEFT_DEBUG"] = "1"
    try:
        check_numbers(parser, args)
        message = run(args)
    except BaseException as error:
        return stop(error, getattr(args, "output", None) or getattr(args, "output_dir", None))
    print(message)
    return 0


def train_command(argv: list[str]) -> int:
    args = vars(train_parser().parse_args(argv))
    if args.pop("debug"):
        os.environ["MUSEFT_DEBUG"] = "1"  # for the ranks this process starts, too
    approach = args.pop("approach") or TrainConfig.approach
    args = {name: tuple(value) if isinstance(value, list) else value for name, value in args.items()}  # nargs="+"
    out = None
    try:
        config = from_approach(approach, **args)
        out = config.out
        from engine.launch import launch, placement  # heavy imports only once the flags are known to be good
        from engine.plan.fit import refuse_if_unfit_before_loading
        from engine.strategies import STRATEGIES
        from finetune import finetune

        ranks, device = placement(config)
        STRATEGIES[config.parallel].refuse_before_start(config.resolved(gpu=device.type == "cuda"), ranks)
        if device.type == "cuda" or config.memory_budget is not None:  # planned before any rank loads a weight
            refuse_if_unfit_before_loading(config, ranks, gpu=device.type == "cuda")
        summary = launch(config, finetune)
    except BaseException as error:
        return stop(error, out, resumable=out is not None)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns here
        print(done_line(summary, config.out))
    return 0


def done_line(summary: dict, out: Path) -> str:
    """The last line of a run; a resumed run whose checkpoint was its last step trained no step of its own."""
    train, val = summary["final_train_loss"], summary["final_val_loss"]
    losses = "no step was left to train after the checkpoint it resumed from" if train is None else \
        f"train loss {train:.4f}" + (f", validation loss {val:.4f}" if val is not None else "")
    return f"done: {summary['steps']} steps, {losses}, outputs in {out}"


def stop(error: BaseException, where: Path | None = None, resumable: bool = False) -> int:
    """`error: <one sentence>` on stderr for a failure errors.explain words, and its exit status (see errors.py);
    a bug is raised on, with its traceback. With --debug (MUSEFT_DEBUG=1) the traceback comes first."""
    explained = explain(error, where, resumable)
    if explained is None:
        raise error
    if debug():
        traceback.print_exception(error)
    else:
        tell_torchrun(explained[1])
    print(f"error: {explained[1]}", file=sys.stderr)
    return explained[0]


def tell_torchrun(sentence: str) -> None:
    """Under torchrun, its report of a failed rank shows the rank's error file, where torch's `record` wrote the
    traceback: the sentence goes there instead, in torch's own layout, so the report repeats it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        entry = {"message": sentence, "extraInfo": {"py_callstack": sentence, "timestamp": str(int(time.time()))}}
        with contextlib.suppress(OSError):  # the report is torchrun's; failing to write it must not hide the sentence
            Path(path).write_text(json.dumps({"message": entry}))


def terminate(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str]) -> int:
    previous = signal.signal(signal.SIGTERM, terminate)  # SIGTERM unwinds like Ctrl-C: one sentence, exit 143
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one progress bar, the trainer's
        return subcommand(argv[0], argv[1:]) if argv[:1] and argv[0] in SUBCOMMANDS else train_command(argv)
    except (KeyboardInterrupt, Terminated) as error:  # before a command's own handler is in place
        return stop(error)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
