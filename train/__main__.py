"""``python -m train``: train a flaxnets model with its paper's recipe.

With no arguments it trains the default recipe (ResNet-18 on the embedded digits, a few minutes
on a CPU). ``--model resnext50`` picks that model's paper recipe; ``--recipe NAME`` a preset
(``--list-recipes``); ``--set field=value`` overrides any recipe field.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--model", help="flaxnets model name or alias (default: the recipe's); alone, it selects its paper's recipe")
    add("--recipe", help="recipe preset (see --list-recipes); default: the embedded-digits recipe")
    add("--list-recipes", action="store_true", help="print the presets and exit")
    add("--dataset", help="tfds name or image folder (with train/ and val/); default: the recipe's")
    add("--data-dir", help="tensorflow-datasets data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    add("--download", action="store_true", help="let tfds download a data set that is not prepared (needs network)")
    add("--epochs", type=int, help="override the recipe's epochs")
    add("--batch-size", type=int, help="global batch size (override)")
    add("--lr", type=float, help="base learning rate (override)")
    add("--set", action="append", default=[], metavar="FIELD=VALUE", help="override any recipe field; repeatable")
    add("--workdir", default="workdir", help="checkpoints, metrics.jsonl, tensorboard/ and curves.png go here")
    add("--accelerator", choices=("cpu", "gpu", "tpu"), default="cpu", help="devices to train on (all of them)")
    add("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: bfloat16 compute, float32 weights")
    add("--seed", type=int, default=0, help="initialisation, data order and augmentation seed")
    add("--resume", action=argparse.BooleanOptionalAction, default=True, help="continue from the workdir's newest checkpoint")
    add("--init-from", help="start from a `python -m flaxnets.convert` directory or a trained workdir "
                            "(new head if the classes differ)")
    tune = parser.add_argument_group("fine-tuning")
    tune.add_argument("--pretrained", nargs="?", const="default", metavar="TAG",
                      help="start from the model's published weights (TAG: see flaxnets.list_pretrained(); a "
                           ".pth/.safetensors path or URL also works) with a new head for the data set, and use the "
                           "weights' preprocessing; without --recipe it picks the finetune recipe")
    tune.add_argument("--linear-probe", action="store_true",
                      help="train only the classifier: the backbone and its BatchNorm statistics stay as loaded")
    tune.add_argument("--freeze-bn", action="store_true", help="BatchNorm uses and keeps its running statistics")
    tune.add_argument("--head-lr-multiplier", type=float, help="the classifier's lr as a multiple of the schedule's")
    add("--compilation-cache", metavar="DIR",
        help="JAX's persistent compilation cache, so a rerun or a resume skips compiling "
             "(default: $FLAXNETS_HOME/jax_cache or ~/.cache/flaxnets/jax_cache; 'none' turns it off)")
    add("--max-steps", type=int, help="stop after this many steps, saving a checkpoint (resume later)")
    add("--log-every", type=int, default=10, help="steps between progress updates")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--input-order", choices=("per_host", "global"), default="per_host",
        help="per_host: each process reads only its share of the data; global: all processes read everything "
             "in one order, for batches identical on any number of processes (small data, comparisons)")
    plan = parser.add_argument_group("planning for a TPU or GPU that is not here (compiles the run for it; trains nothing)")
    plan.add_argument("--plan", metavar="TARGET",
                      help="compile this run's training step for TARGET (a TPU slice: v4:2x2x1, v5e:4x4, v5p:2x2x2, "
                           "v6e:2x2; GPUs: h100x8, a100x8) and print per-chip memory, whether it fits, FLOPs, and the "
                           "recipe's time and chip-hours; needs the [plan] extra")
    plan.add_argument("--plan-max-batch", action="store_true",
                      help="with --plan: also find the largest batch per chip that fits (a few more compiles)")
    plan.add_argument("--plan-utilization", type=float, default=0.25,
                      help="with --plan: the share of the chip's peak FLOP/s assumed for the time estimate")
    plan.add_argument("--plan-json", metavar="PATH", help="with --plan: also write the plan as JSON to PATH")
    plan.add_argument("--plan-hlo", metavar="PATH", help="with --plan: also write the compiled step's HLO text to PATH")
    multi = parser.add_argument_group("multi-host (TPU pods, multi-node GPU)")
    multi.add_argument("--distributed", action="store_true",
                       help="call jax.distributed.initialize() (auto-detects on Cloud TPU and SLURM)")
    multi.add_argument("--coordinator", help="coordinator host:port, for an explicit multi-process start")
    multi.add_argument("--num-processes", type=int, help="number of processes (with --coordinator)")
    multi.add_argument("--process-id", type=int, help="this process's index (with --coordinator)")
    return parser


def _recipe(args):
    from train.recipes import DEFAULT_RECIPE, FINETUNE_RECIPE, get_recipe, override, recipe_for_model

    if args.recipe:
        recipe = get_recipe(args.recipe)
    elif args.pretrained:
        recipe = get_recipe(FINETUNE_RECIPE)
    elif args.model and args.plan:  # a plan is for the paper's run on its data set
        recipe = recipe_for_model(args.model)
    elif args.model:
        recipe = dataclasses.replace(recipe_for_model(args.model), dataset="flaxnets_digits")
    else:
        recipe = get_recipe(DEFAULT_RECIPE)
    changes = {k: v for k, v in (("model", args.model), ("dataset", args.dataset), ("epochs", args.epochs),
                                 ("batch_size", args.batch_size), ("lr", args.lr),
                                 ("head_lr_multiplier", args.head_lr_multiplier)) if v is not None}
    if args.linear_probe:
        changes.update(freeze_backbone=True, frozen_bn=True)
    if args.freeze_bn:
        changes["frozen_bn"] = True
    if "model" in changes:
        import flaxnets

        changes["model"] = flaxnets.resolve_name(changes["model"])
    return override(dataclasses.replace(recipe, **changes), args.set)


def _check_multi_host(args) -> None:
    """The multi-process flags must come together and agree (before any process tries to connect)."""
    if not args.coordinator:
        if args.num_processes is not None or args.process_id is not None:
            raise ValueError("--num-processes and --process-id need --coordinator host:port")
        return
    if args.num_processes is None or args.process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id")
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--coordinator must be host:port; got {args.coordinator!r}")
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id must be in [0, --num-processes) and --num-processes positive; "
                         f"got {args.process_id} of {args.num_processes}")


def _start_distributed(args) -> None:
    import jax

    if args.coordinator:
        if args.accelerator == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def _enable_compilation_cache(directory: str | None) -> None:
    """Points JAX's persistent compilation cache at ``directory`` (default: the flaxnets cache).

    An explicit ``JAX_COMPILATION_CACHE_DIR`` wins over the default; ``none`` turns the cache off.
    """
    import jax

    if directory is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    if directory is not None and directory.lower() == "none":
        return
    if directory is None:
        from flaxnets.download import cache_dir

        directory = os.path.join(cache_dir(), "jax_cache")
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    # Programs that compile in under a second are cheaper to rebuild than to read.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# What `pip install flaxnets` leaves out and training needs (the [train] extra).
_TRAINING_STACK = ("optax", "orbax.checkpoint", "tensorflow", "tensorflow_datasets", "matplotlib", "sklearn", "tqdm")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 done, 1 error, 143 preempted)."""
    args = _parser().parse_args(argv)
    if argv is None and args.accelerator == "cpu":
        # From the command line: run again with huge pages for XLA's per-step buffers (~20% faster
        # ResNet-50 steps on 2 cores); nothing has started yet.
        from train.host_memory import restart_with_huge_pages

        restart_with_huge_pages()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.accelerator == "cpu":
        # Only the CPU is used: jax then skips looking for TPUs and GPUs (and logging that it found none).
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    missing = [name for name in _TRAINING_STACK if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: training needs the [train] extra ({', '.join(missing)} not installed): "
              f"pip install 'flaxnets[train]' (from a clone: pip install -e '.[train]')", file=sys.stderr)
        return 1
    from train.recipes import list_recipes

    if args.list_recipes:
        from train.recipes import get_recipe

        for name in list_recipes():
            r = get_recipe(name)
            print(f"{name:45s} {r.model:18s} {r.epochs:4d}e  bs {r.batch_size:4d}  lr {r.lr:g}  {r.schedule}"
                  f"{'  plateau' if r.plateau_patience else ''}{'  ema' if r.ema_decay else ''}  aug {r.augmentation}")
        return 0

    from input_pipeline.sources import BadImageError, DatasetNotReadyError
    from train.recipes import validate

    if args.plan:
        return _plan(args)
    if args.plan_max_batch or args.plan_json or args.plan_hlo:
        print("error: --plan-max-batch, --plan-json and --plan-hlo go with --plan TARGET", file=sys.stderr)
        return 1
    from train.trainer import RunConfig, TrainingError, print_error, run, validate_config

    try:
        # Everything is checked before any process connects or anything is written.
        recipe = validate(_recipe(args))
        config = validate_config(RunConfig(
            workdir=args.workdir, data_dir=args.data_dir, download=args.download, accelerator=args.accelerator,
            precision=args.precision, seed=args.seed, resume=args.resume, init_from=args.init_from,
            log_every=args.log_every, max_steps=args.max_steps, progress=not args.no_progress,
            input_order=args.input_order, pretrained=args.pretrained))
        _check_multi_host(args)
        _enable_compilation_cache(args.compilation_cache)
        _start_distributed(args)
        summary = run(recipe, config)
    except (KeyError, ValueError, TrainingError, DatasetNotReadyError, BadImageError, OSError) as err:
        print_error(err)
        return 1
    import jax

    if jax.process_index() == 0 and "best_top1" in summary:
        print(f"best top-1 {100 * summary['best_top1']:.2f}%, top-5 {100 * summary['best_top5']:.2f}% "
              f"(epoch {summary['best_epoch']}); results in {summary['workdir']} "
              f"(metrics.jsonl, tensorboard/, {os.path.basename(summary['plot'] or '')}, checkpoints/)")
    return 143 if summary["status"] == "preempted" else 0


def _plan(args) -> int:
    """``--plan``: compiles the run for the target and prints (and writes) the plan; trains nothing."""
    from train.plan import PlanError, format_plan, make_plan, run_shape, write_json
    from train.targets import parse_target
    from train.recipes import validate
    from train.trainer import print_error

    try:
        parse_target(args.plan)  # a typo fails before the data set is opened
        recipe = validate(_recipe(args))
        for flag, path in (("--plan-json", args.plan_json), ("--plan-hlo", args.plan_hlo)):
            if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
                raise ValueError(f"{flag} {path}: give a file path in an existing directory")
        shape = run_shape(recipe, precision=args.precision, data_dir=args.data_dir, pretrained=args.pretrained)
        plan = make_plan(args.plan, recipe, shape, utilization=args.plan_utilization,
                         search_max_batch=args.plan_max_batch, hlo_path=args.plan_hlo)
        print(format_plan(plan))
        if args.plan_json:
            write_json(plan, args.plan_json)
            print(f"plan written to {args.plan_json}")
    except (KeyError, ValueError, PlanError, OSError) as err:
        print_error(err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
