"""From a parsed compression spec to a compressed checkpoint, and from a checkpoint back to its model.

Pruning changes the weights (a pruned checkpoint records its per-block sizes as model options);
token reduction changes only how the forward runs, so a checkpoint records it as the spec text in
``model["token_reduction"]`` and `install_token_reduction` re-installs it whenever the model is built
from the checkpoint (eval, robustness, calibrate, predict all see the compressed model).
Fine-tuning after pruning is a plain `trustseg train` run of the checkpoint's own recipe, from the
pruned weights, at a tenth of its learning rate, distilled from the unpruned model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from trustseg.compress.spec import Step, parse_spec, spec_name
from trustseg.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from trustseg.errors import UserError

FINETUNE_LR_FACTOR = 0.1
# token-reduction ladders of --sweep: fractions of the patch tokens removed by the last block
TOKEN_FRACTIONS = (0.25, 0.5, 0.7, 0.85)
FLOP_LADDER = (0.85, 0.7, 0.55, 0.4)
ALGM_TAUS = (0.95, 0.9, 0.85, 0.8)


def token_step(checkpoint: Checkpoint) -> Step | None:
    """The token-reduction step a checkpoint records, if any."""
    text = checkpoint.model.get("token_reduction")
    if text is None:
        return None
    steps = parse_spec(text)
    if len(steps) != 1 or steps[0].kind != "tokens":
        raise UserError(f"{checkpoint.source}: model.token_reduction {text!r} is not one token-reduction step")
    return steps[0]


def install_token_reduction(model: nn.Module, step: Step, image_size: tuple[int, int] | None = None, *,
                            policy_state: dict[str, Any] | None = None, source: str = "checkpoint") -> nn.Module:
    """Install the reducers of `step` (ToMe, ALGM, or CTS with the policy weights `policy_state`) on the
    ViT of `model`; returns `model`."""
    from trustseg.compress.algm import install_algm
    from trustseg.compress.cts import install_cts
    from trustseg.compress.policy import policy_from_state
    from trustseg.compress.tome import install_tome

    options = step.options
    if step.method == "tome":
        r = (options["r"], options["inflect"]) if "inflect" in options else options["r"]
        install_tome(model, r=r, proportional_attention=options.get("prop_attn", True), image_size=image_size)
    elif step.method == "algm":
        install_algm(model, **{k: v for k, v in (("tau", options.get("tau")), ("local_block", options.get("local")),
                                                  ("global_block", options.get("global"))) if v is not None})
    elif step.method == "cts":
        if policy_state is None:
            raise UserError(f"{source}: cts:k={options['k']} but no CTS policy weights (token_policy) are recorded")
        install_cts(model, policy_from_state(policy_state, source=f"the CTS policy of {source}"), options["k"])
    else:
        raise UserError(f"{step.method} is not a token-reduction method")
    return model


def needs_training_data(steps: tuple[Step, ...]) -> bool:
    """Taylor importance scores on training images; a CTS policy is trained on them."""
    return any((s.method == "prune" and s.options.get("importance", "taylor") == "taylor") or s.method == "cts"
               for s in steps)


def compress_checkpoint(checkpoint: Checkpoint, steps: tuple[Step, ...], *, train_data: Any, image_size: tuple[int, int],
                        importance_batches: int, seed: int, device: Any, policy_steps: int = 500,
                        finetune: dict[str, Any] | None = None
                        ) -> tuple[Checkpoint, dict[str, Any]]:
    """The compressed checkpoint of `steps` and a record of what was done (pruning report, fine-tuning).

    `finetune` (None: no fine-tuning): ``{"steps", "data", "out", "teacher", "progress"}`` for a pruned model.
    """
    from trustseg.compress.cts import cts_checkpoint
    from trustseg.compress.prune import prune_checkpoint

    record: dict[str, Any] = {"spec": spec_name(steps)}
    for step in steps:
        if step.method == "prune":
            checkpoint, report = prune_checkpoint(
                checkpoint, step.options["flops"], importance=step.options.get("importance", "taylor"),
                dataset=train_data, num_samples=importance_batches, image_size=image_size, device=device, seed=seed)
            record["prune"] = {k: v for k, v in report.items() if not isinstance(v, nn.Module)}
            if finetune is not None and finetune["steps"] > 0:
                checkpoint, record["finetune"] = finetune_checkpoint(checkpoint, **finetune)
        elif step.method == "cts":
            checkpoint, record["cts"] = cts_checkpoint(checkpoint, step.options["k"], dataset=train_data,
                                                       steps=policy_steps, seed=seed, device=device)
        else:
            if checkpoint.model.get("token_reduction") is not None:
                raise UserError(f"{checkpoint.source} already reduces tokens ({checkpoint.model['token_reduction']}); "
                                "compress its uncompressed checkpoint instead")
            checkpoint = dataclasses.replace(checkpoint, model={**checkpoint.model, "token_reduction": str(step)})
    return checkpoint, record


def finetune_checkpoint(checkpoint: Checkpoint, *, steps: int, data: str, out: str, teacher: str | None,
                        progress: bool) -> tuple[Checkpoint, dict[str, Any]]:
    """Fine-tune a pruned checkpoint with the recipe it was trained with (lr x 0.1), distilled from `teacher`."""
    from trustseg.training.config import config_from_dict
    from trustseg.training.loop import train

    if not checkpoint.train_config:
        raise UserError(f"{checkpoint.source}: no training recipe recorded; fine-tuning needs a checkpoint written "
                        "by trustseg train (or pass --finetune-steps 0)")
    start = Path(out) / "pruned.pt"
    save_checkpoint(checkpoint, start)
    recipe = config_from_dict(checkpoint.train_config)
    config = dataclasses.replace(
        recipe, out=str(Path(out) / "run"), steps=steps, epochs=None, time_budget_min=None, val_every=0,
        data=dataclasses.replace(recipe.data, train=data, val=None),
        model=dataclasses.replace(recipe.model, name=checkpoint.model["name"], options=checkpoint.model["options"],
                                  weights=None, init_from=str(start)),
        optim=dataclasses.replace(recipe.optim, lr=recipe.optim.lr * FINETUNE_LR_FACTOR),
        schedule=dataclasses.replace(recipe.schedule, warmup_steps=min(recipe.schedule.warmup_steps, steps // 10)),
        distill=dataclasses.replace(recipe.distill, teacher=teacher),
    )
    result = train(config, progress=progress)
    tuned = load_checkpoint(result.run_dir / "last.pt")
    tuned = dataclasses.replace(tuned, training_state={})
    return tuned, {"steps": result.step, "lr": config.optim.lr, "teacher": teacher, "val_mIoU": result.metrics.get("mIoU")}


def tome_r(fraction: float, num_patches: int, depth: int) -> int:
    """ToMe's r (the same in every block) that merges away `fraction` of the patch tokens by the last block."""
    return max(1, round(fraction * num_patches / depth))


def sweep_specs(families: tuple[str, ...], vit_depth: int, grid: tuple[int, int]) -> list[str]:
    """The ladder of specs of each family in `families` (``tome``, ``algm``, ``cts``, ``prune``, ``prune+tome``)
    for a ViT of `vit_depth` blocks on a `grid` of patches.

    ToMe's r removes a fraction of the patch tokens by the last block (r = fraction * patches / depth);
    CTS shares k windows to remove the same fractions at the input (k = fraction * patches / 3, at most
    every 2x2 window); pruning steps through FLOP ratios; prune-then-merge prunes to 0.7 and merges on
    top at each token fraction.
    """
    patches = grid[0] * grid[1]
    windows = (grid[0] // 2) * (grid[1] // 2)

    def tome(fraction: float) -> str:
        return f"tome:r={tome_r(fraction, patches, vit_depth)}"

    ladders = {
        "tome": [tome(f) for f in TOKEN_FRACTIONS],
        "algm": [f"algm:tau={tau}" for tau in ALGM_TAUS],
        "cts": list(dict.fromkeys(f"cts:k={min(windows, max(1, round(f * patches / 3)))}" for f in TOKEN_FRACTIONS)),
        "prune": [f"prune:flops={ratio}" for ratio in FLOP_LADDER],
        "prune+tome": [f"prune:flops=0.7+{tome(f)}" for f in TOKEN_FRACTIONS],
    }
    unknown = [name for name in families if name not in ladders]
    if unknown:
        raise UserError(f"--sweep: unknown family {unknown[0]!r}; expected some of {', '.join(ladders)}")
    return [spec for name in families for spec in ladders[name]]
