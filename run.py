"""Command line: parse flags into a TrainConfig and hand over to the engine.

    python run.py --approach lora                 # tiny model on CPU, Idefics2-8B on a GPU
    python run.py --approach full --model ./dir --dataset ./musequest_imagefolder
    python run.py merge --adapter runs/lora/final --output merged/
    python run.py eval --model runs/full/final            # answer and score the test split
    python run.py score --csv results.csv --model ID --output rescored.csv
    python run.py report runs/lora runs/full              # a markdown table comparing runs
"""

import argparse
import json
import os
import sys
from pathlib import Path

from engine.config import APPROACHES, TrainConfig, check_scorer, from_approach
from engine.errors import UsageError

DEFAULTS = TrainConfig()


def approach_help() -> str:
    return "approaches:\n" + "\n".join(f"  {name:<10} {line}" for name, (*_, line) in APPROACHES.items())


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py", description="Fine-tune Idefics2/Idefics3 on image question/answer data.",
        epilog=approach_help() + "\n\nsubcommands (each with --help):\n  merge      fold an adapter into its base\n"
               "  eval       answer and score the test split\n  score      re-score a results CSV\n"
               "  report     compare runs in one markdown table",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--approach", default=DEFAULTS.approach, help="one of the approaches listed below (default: %(default)s)")
    add("--model", help="'tiny', a local folder or a Hugging Face id (default: tiny on CPU, "
                        "HuggingFaceM4/idefics2-8b on CUDA)")
    add("--dataset", help="'musequest' (built in), a Hugging Face id, a save_to_disk folder or an imagefolder "
                          "(default: %(default)s)", default=DEFAULTS.dataset)
    add("--limit-exhibits", type=int, help="keep only the first K exhibits (small demos and tests)")
    add("--adapter", choices=("none", "lora"), help="override the approach's adapter (hybrids)")
    add("--quant", choices=("none", "nf4"), help="override the approach's base-weight format")
    add("--parallel", choices=("none", "ddp", "fsdp", "pipeline", "pipeline+fsdp"), help="override the approach's parallelism")
    add("--output-dir", help="where checkpoints, logs and the final model go (default: runs/<approach>)")
    add("--epochs", type=int, help=f"passes over the train split (default: {DEFAULTS.epochs})")
    add("--max-steps", type=int, help="total optimizer steps; overrides --epochs and sets the lr schedule")
    add("--stop-after-steps", type=int, help="stop (with a checkpoint) after this many steps of this invocation; "
                                             "continue later with --resume")
    add("--batch-size", type=int, help=f"rows per micro-batch per device (default: {DEFAULTS.batch_size})")
    add("--grad-accum", type=int, help=f"micro-batches per optimizer step (default: {DEFAULTS.grad_accum})")
    add("--lr", type=float, help=f"peak learning rate (default: {DEFAULTS.lr})")
    add("--lr-scaling", choices=("none", "sqrt", "linear"),
        help="scale --lr by the square root of (or linearly in) global batch / --lr-reference-batch, as some of "
             "the original's multi-GPU runs did (default: none)")
    add("--lr-reference-batch", type=int, help="the global batch --lr was tuned for "
                                               f"(default: {DEFAULTS.lr_reference_batch}, the original's one-GPU batch)")
    add("--weight-decay", type=float, help=f"AdamW weight decay (default: {DEFAULTS.weight_decay})")
    add("--warmup-ratio", type=float, help=f"fraction of steps of linear warm-up (default: {DEFAULTS.warmup_ratio})")
    add("--max-grad-norm", type=float, help=f"gradient clipping norm (default: {DEFAULTS.max_grad_norm})")
    add("--train-modules", nargs="+", help="what full fine-tuning trains: 'all', presets (projections, text, "
                                           "connector, vision, all-linear) or regexes over module paths "
                                           "(default: projections)")
    add("--lora-target", nargs="+", help="modules that get LoRA: presets (projections, text, connector, vision, "
                                         "all-linear) or regexes over module paths (default: projections)")
    add("--lora-r", type=int, help=f"LoRA rank (default: {DEFAULTS.lora_r})")
    add("--lora-alpha", type=float, help=f"LoRA alpha (default: {DEFAULTS.lora_alpha:g})")
    add("--lora-dropout", type=float, help=f"dropout on the LoRA input (default: {DEFAULTS.lora_dropout})")
    add("--no-rslora", dest="lora_rslora", action="store_false", default=None,
        help="scale LoRA by alpha/r instead of rsLoRA's alpha/sqrt(r)")
    add("--lora-init", choices=("gaussian", "kaiming"), help="init of LoRA's A matrix (default: gaussian)")
    add("--quant-keep-vision", action="store_true", default=None,
        help="qlora: keep the vision encoder in bf16 (default: NF4, as the original)")
    add("--activation-checkpointing", action="store_true", default=None,
        help="recompute decoder-layer activations in backward to save memory")
    add("--max-length", type=int, help="truncate each answer so the sequence fits this many tokens")
    add("--image-splitting", action="store_true", default=None, help="split images into crops (more memory)")
    add("--image-shortest-edge", type=int, help="processor resize: shortest image edge in pixels")
    add("--image-longest-edge", type=int, help="processor resize: longest image edge in pixels")
    add("--seed", type=int, help=f"seed for the tiny model, data order and dropout (default: {DEFAULTS.seed})")
    add("--device", help="auto (CUDA if present), cpu or cuda (default: auto)")
    add("--micro-batches", type=int, help="full_mp: micro-batches each batch is cut into so the stages work "
                                          f"at once (default: {DEFAULTS.micro_batches}; 1 is the original's naive split)")
    add("--schedule", choices=("gpipe", "1f1b"), help="full_mp: all forwards then all backwards (gpipe, default), "
                                                      "or one forward one backward, fewer activations alive (1f1b)")
    add("--split", type=int, nargs="+", help="full_mp: first decoder layer of every stage after the first "
                                             "(default: balanced by parameters; the original's 4-GPU split is 5 14 23)")
    add("--gpus", type=int, help="number of ranks (default: what torchrun started, else 1); on a machine "
                                 "without CUDA the ranks are CPU processes on gloo")
    add("--attn-implementation", help="sdpa (default), eager or flash_attention_2")
    add("--eval-every", type=float, help="validation + checkpoint every this fraction of steps (default: 0.05)")
    add("--skip-eval", action="store_true", default=None, help="do not answer and score the test split after training")
    add("--scorer", help="whose embeddings score the answers: self (the trained model, the original's way), base "
                         "(the base model: one judge for every approach; default) or a model folder")
    add("--max-new-tokens", type=int, help=f"answer length cap in evaluation (default: {DEFAULTS.max_new_tokens})")
    add("--keep-last", type=int, help="checkpoints kept besides the best one (default: 2)")
    add("--final", choices=("best", "last"), help="which weights go to OUT/final (default: best)")
    add("--resume", action="store_true", default=None, help="continue from the last complete checkpoint")
    add("--tensorboard", action="store_true", default=None, help="serve TensorBoard for this run")
    add("--tensorboard-port", type=int, help="port for --tensorboard (default: 6006)")
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
    from engine.merge import merge_adapter

    return f"merged model written to {merge_adapter(args.adapter, args.output, args.model, args.device)}"


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py eval", description="Answer the test split with a model and "
                                     "score the answers against the references (1 - cosine; 0 is best).")
    parser.add_argument("--model", help="a Hugging Face folder or id; with --adapter, the base (default: the "
                                        "adapter's own base)")
    parser.add_argument("--adapter", type=Path, help="a LoRA/QLoRA adapter folder, folded into its base")
    parser.add_argument("--dataset", default="musequest", help="as for training (default: musequest)")
    parser.add_argument("--limit-exhibits", type=int, help="keep only the first K exhibits")
    parser.add_argument("--scorer", default="base", help="self (the evaluated model, the original's way), base "
                                                         "(--base: one judge for every approach; default) "
                                                         "or a model folder")
    parser.add_argument("--base", help="the judge of --scorer base (default: the adapter's base, else --model)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="default: 512, as the original")
    parser.add_argument("--batch-size", type=int, default=4, help="rows generated at once (default: 4)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/eval"), help="where results.csv/.json go")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    return parser


def evaluate(args: argparse.Namespace) -> str:
    from engine.runtime import pick_device
    from eval.evaluate import evaluate_test_split, load_evaluated

    if not args.model and not args.adapter:
        raise UsageError("run.py eval needs --model, --adapter or both.")
    check_scorer(args.scorer)
    device = pick_device(args.device, 1)
    model, processor = load_evaluated(args.model, args.adapter, device)
    base = args.base or args.model or json.loads((args.adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    results = evaluate_test_split(model, processor, args.dataset, args.limit_exhibits, args.scorer, base,
                                  args.output_dir, device, args.batch_size, args.max_new_tokens)
    return f"score {results['score']} ({results['scorer']} scorer, {results['rows']} rows) in {args.output_dir}"


def score_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py score", description="Re-score a results CSV that has the "
                                     "original's columns model_generated_answer and ground_truth_answer.")
    parser.add_argument("--csv", required=True, type=Path, help="the results file to score")
    parser.add_argument("--model", required=True, help="the model whose embeddings score (folder or id)")
    parser.add_argument("--scorer", default="self", help="self (--model itself, the original's way; default), "
                                                         "base (the same, batched and padding-masked) or a folder")
    parser.add_argument("--output", required=True, type=Path, help="the scored CSV, in the original's layout")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: auto")
    return parser


def score(args: argparse.Namespace) -> str:
    from engine.runtime import pick_device
    from eval.evaluate import rescore_csv

    if not args.csv.is_file():
        raise UsageError(f"--csv {args.csv} is not a file.")
    check_scorer(args.scorer)
    results = rescore_csv(args.csv, args.model, args.scorer, args.output, pick_device(args.device, 1))
    return f"score {results['score']} ({results['scorer']} scorer, {results['rows']} rows) written to {args.output}"


def report_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run.py report", description="One markdown table comparing runs "
                                     "(score, train time, ranks, memory, trainable parameters) and the original's.")
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with summary.json)")
    parser.add_argument("--output", type=Path, default=Path("runs/report.md"), help="default: runs/report.md")
    return parser


def report(args: argparse.Namespace) -> str:
    from engine.metrics import Scalars
    from eval.report import report as table

    markdown = table(args.runs)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(markdown)
    scalars = Scalars(args.output.with_suffix("") / "tensorboard", True, 0)  # the same view in TensorBoard
    scalars.text(0, "report", markdown)
    scalars.close()
    return markdown + f"\nwritten to {args.output}"


SUBCOMMANDS = {"merge": (merge_parser, merge), "eval": (eval_parser, evaluate), "score": (score_parser, score),
               "report": (report_parser, report)}


def subcommand(name: str, argv: list[str]) -> int:
    parser, run = SUBCOMMANDS[name]
    args = parser().parse_args(argv)
    try:
        message = run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(message)
    return 0


def main(argv: list[str]) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar, the trainer's
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return subcommand(argv[0], argv[1:])
    args = vars(train_parser().parse_args(argv))
    approach = args.pop("approach")
    for name in ("train_modules", "lora_target", "split"):
        if args.get(name):
            args[name] = tuple(args[name])
    try:
        config = from_approach(approach, **args)
        from engine.launch import launch
        from engine.trainer import train  # heavy imports only once the flags are known to be good

        summary = launch(config, train)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns here
        print(f"done: {summary['steps']} steps, train loss {summary['final_train_loss']:.4f}, "
              f"validation loss {summary['final_val_loss']}, outputs in {config.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
