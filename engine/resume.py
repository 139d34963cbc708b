"""--resume: continue a run exactly where its newest readable checkpoint left it, or refuse, saying why.

The checkpoint's settings are compared with this run's (engine/outputs/checkpoint.py `load`, naming the first
flag that differs); the weights, optimizer, schedule and every rank's random generators are restored.
"""

import contextlib
import json
from pathlib import Path

from engine.outputs import checkpoint
from engine.strategies import Strategy
from errors import UsageError


def refuse_finished(out: Path) -> None:
    """--resume of a run that already finished says so and touches nothing (a rerun would overwrite its summary)."""
    with contextlib.suppress(OSError, ValueError):
        summary = json.loads((out / "summary.json").read_text())
        if summary.get("completed"):
            final = out / "final"
            weights = f"--model {final}" if not (final / "adapter_config.json").is_file() else \
                f"the merged model (run.py merge --adapter {final} --output MERGED, then --model MERGED)"
            raise UsageError(f"the run in {out} already finished ({summary['steps']} of {summary['total_steps']} "
                             f"steps): there is nothing to resume; to train further, start a new run from its weights "
                             f"in another --output-dir, with {weights}.")


def resume(folder: Path, strategy: Strategy, optimizer, scheduler, fingerprint: dict) -> int:
    """Restore the newest checkpoint every rank can read; returns the step to continue from (0 if none).

    A damaged checkpoint (killed mid-copy, a bad disk) is skipped, with a warning, for the one before;
    one written with other settings is refused, naming the setting.
    """
    for path in reversed(checkpoint.complete(folder)):
        try:
            state, meta, damage = *strategy.load_checkpoint(path, fingerprint), None
        except checkpoint.DamagedCheckpoint as error:
            damage = str(error)
        damage = next((found for found in strategy.runtime.gather(damage) if found), None)  # every rank agrees
        if damage is None:
            checkpoint.restore_train_state(state, optimizer, scheduler, strategy.runtime.rank,
                                           strategy.runtime.device)
            print(f"--resume: continuing from {path} (step {meta['step']}).")
            return meta["step"]
        print(f"--resume: skipping {path}, which is damaged ({damage}).")
    print(f"--resume: no readable checkpoint in {folder}; starting from step 0.")
    return 0
