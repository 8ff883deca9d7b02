"""The training loop: data-parallel ``jax.jit`` over a device mesh, evaluation, checkpoints, reports."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import flaxnets
from flaxnets.download import WeightsUnavailableError
from flaxnets.pretrained import is_checkpoint_location, merge_by_shape
from flaxnets.convert import META_FILE
from input_pipeline.pipeline import INPUT_ORDERS, global_batches, make_dataset
from input_pipeline.sources import Source, load_source
from train.checkpoints import Checkpoints, restore_run
from train.recipes import Recipe, validate
from train.report import Reporter
from train.program import build_program
from train.steps import TrainState


class TrainingError(RuntimeError):
    """A run that cannot start or must stop; the message says why (the CLI prints it alone)."""


def print_error(err: BaseException) -> None:
    """Prints ``err`` as ``error: ...`` lines on stderr, one per problem, without a traceback."""
    text = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    text = text.split("\n--------------------\n")[0]  # JAX's note on the frames it hid from a traced error
    for line in text.splitlines() or [type(err).__name__]:
        print(f"error: {line}", file=sys.stderr)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run reads and writes, and on what it runs (the recipe says how it trains).

    Attributes:
      workdir: checkpoints, metrics.jsonl, tensorboard/, curves.png.
      data_dir: tensorflow-datasets directory.
      download: let tfds download a data set that is not prepared.
      accelerator: ``cpu``, ``gpu`` or ``tpu``.
      precision: ``fp32`` or ``bf16`` (bfloat16 compute, float32 weights).
      seed: initialisation, data order and augmentation.
      resume: continue from the newest checkpoint in ``workdir`` if there is one.
      init_from: a ``python -m flaxnets.convert`` directory or a finished ``python -m train`` workdir
        (its best checkpoint) to start from; a new head if the classes differ.
      pretrained: start from published weights: ``"default"`` (the model's best), a tag
        (``flaxnets.list_pretrained()``), or a path/URL of a torchvision/timm checkpoint. The new
        head is sized to the data set, and the weights' preprocessing (size, crop, mean/std) is
        used in training and evaluation.
      keep_checkpoints: recent checkpoints kept (the best one is kept besides).
      log_every: steps between progress updates (each one syncs with the device).
      max_steps: stop (saving a checkpoint) after this many steps in total; None for no limit.
      progress: show a progress bar.
      input_order: ``per_host`` (each process reads only its share of the records) or ``global``
        (every process reads all of them in one order: the same batches on any topology).
    """

    workdir: str = "workdir"
    data_dir: str | None = None
    download: bool = False
    accelerator: str = "cpu"
    precision: str = "fp32"
    seed: int = 0
    resume: bool = True
    init_from: str | None = None
    pretrained: str | None = None
    keep_checkpoints: int = 3
    log_every: int = 10
    max_steps: int | None = None
    progress: bool = True
    input_order: str = "per_host"


def select_devices(accelerator: str) -> list[jax.Device]:
    """All devices of the requested platform; raises TrainingError if there are none."""
    try:
        devices = jax.devices(accelerator)
    except RuntimeError:
        devices = []
    if not devices:
        available = sorted({d.platform for d in jax.devices()})
        raise TrainingError(f"--accelerator {accelerator}: no {accelerator.upper()} is visible to JAX "
                            f"(available: {', '.join(available)}); install the matching jax build or pick another")
    return devices


RUN_INFO = "run.json"


def validate_config(config: RunConfig) -> RunConfig:
    """Checks ``config`` without touching the disk beyond looking; returns it unchanged.

    Raises:
      TrainingError: one line per problem (a workdir that is a file or cannot be created, counts
        that are not positive, unknown accelerator or precision, an ``init_from`` that is no
        ``python -m flaxnets.convert`` output).
    """
    problems = []
    for key, least, optional in (("log_every", 1, False), ("keep_checkpoints", 1, False), ("max_steps", 1, True),
                                 ("seed", 0, False)):
        value = getattr(config, key)
        if not ((optional and value is None) or (isinstance(value, int) and not isinstance(value, bool)
                                                 and value >= least)):
            kind = "a positive integer" if least == 1 else "an integer >= 0"
            problems.append(f"{key} (--{key.replace('_', '-')}) must be {kind}; got {value!r}")
    if config.accelerator not in ("cpu", "gpu", "tpu"):
        problems.append(f"accelerator must be cpu, gpu or tpu; got {config.accelerator!r}")
    if config.input_order not in INPUT_ORDERS:
        problems.append(f"input order must be one of {', '.join(INPUT_ORDERS)}; got {config.input_order!r}")
    if config.precision not in ("fp32", "bf16"):
        problems.append(f"precision must be fp32 or bf16; got {config.precision!r}")
    problems += _workdir_problems(config.workdir)
    if config.init_from is not None and not any(
            os.path.isfile(os.path.join(config.init_from, name)) for name in (META_FILE, RUN_INFO)):
        problems.append(f"--init-from {config.init_from} is neither a `python -m flaxnets.convert` output nor a "
                        f"training workdir (no {META_FILE} or {RUN_INFO} in it)")
    if config.init_from is not None and config.pretrained is not None:
        problems.append("--init-from and --pretrained both give starting weights: pick one")
    if problems:
        raise TrainingError("\n".join(problems))
    return config


def _workdir_problems(workdir: Any) -> list[str]:
    """Why ``workdir`` cannot hold a run: not a path, a file, or under a file or an unwritable folder."""
    if not isinstance(workdir, str) or not workdir:
        return [f"workdir must be a directory path; got {workdir!r}"]
    if os.path.exists(workdir):
        if not os.path.isdir(workdir):
            return [f"--workdir {workdir} is a file, not a directory: pick another --workdir"]
        return [] if os.access(workdir, os.W_OK | os.X_OK) else [f"--workdir {workdir} is not writable"]
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return [f"--workdir {workdir} cannot be created: {parent} is a file"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"--workdir {workdir} cannot be created: {parent} is not writable"]
    return []


def _check_workdir_matches(config: RunConfig, recipe: Recipe) -> None:
    """Refuses to resume a workdir whose ``run.json`` records another model, recipe or data set.

    Overridden fields (a longer ``epochs``, another ``lr``) may change between runs; the model,
    the preset and the data set may not, or the checkpoint would be restored into another state.
    """
    path = os.path.join(config.workdir, RUN_INFO)
    if not config.resume or not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            info = json.load(f)
        theirs = (info["model"], info["recipe"]["name"], info["dataset"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TrainingError(f"{path} is not a readable run record ({type(err).__name__}: {err}); "
                            "pick another --workdir, or remove it to start over") from None
    ours = (recipe.model, recipe.name, recipe.dataset)
    if _canonical(theirs) != _canonical(ours):
        raise TrainingError(f"--workdir {config.workdir} holds a run of {theirs[0]} ({theirs[1]}, on {theirs[2]}; see "
                            f"its {RUN_INFO}), not {ours[0]} ({ours[1]}, on {ours[2]}): pick another --workdir, or "
                            "rerun with that model and recipe to resume it")


def _canonical(entry: tuple[str, str, str]) -> tuple[str, str, str]:
    model, name, dataset = entry
    try:
        model = flaxnets.resolve_name(model)
    except KeyError:
        pass
    return model, name, dataset


def _check_init_from(directory: str, recipe: Recipe) -> None:
    """Converted or trained weights must be of the recipe's model (only the head may differ)."""
    record = META_FILE if os.path.isfile(os.path.join(directory, META_FILE)) else RUN_INFO
    try:
        with open(os.path.join(directory, record)) as f:
            model = json.load(f)["model"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TrainingError(f"--init-from {directory}: unreadable {record} ({type(err).__name__}: {err})") from None
    if _canonical((model, "", ""))[0] != flaxnets.resolve_name(recipe.model):
        raise TrainingError(f"--init-from {directory} holds {model} weights, but the recipe trains "
                            f"{flaxnets.resolve_name(recipe.model)}")


def eval_source(dataset: str, data_dir: str | None = None, download: bool = False) -> Source:
    """The evaluation split of ``dataset``: ``validation`` (or ``test``) of a tfds name, ``val/`` of a folder."""
    if os.path.isdir(dataset):
        return _eval_split(os.path.join(dataset, "val"), None, False)
    return _eval_split(dataset, data_dir, download)


def _eval_split(source_name: str, data_dir: str | None, download: bool) -> Source:
    for split in ("validation", "test"):
        try:
            return load_source(source_name, split, data_dir=data_dir, download=download)
        except Exception as err:  # noqa: BLE001 - try the next split name
            if "no split" not in str(err) and "does not exist" not in str(err):
                raise
    raise TrainingError(f"{source_name} has neither a 'validation' nor a 'test' split")


def _load_sources(recipe: Recipe, config: RunConfig) -> tuple[Source, Source]:
    if os.path.isdir(recipe.dataset):
        train = load_source(os.path.join(recipe.dataset, "train"))
    else:
        train = load_source(recipe.dataset, "train", data_dir=config.data_dir, download=config.download)
    return train, eval_source(recipe.dataset, config.data_dir, config.download)


def run_image_size(recipe: Recipe, pretrained: str | None, prep: flaxnets.Preprocessing) -> int:
    """The training resolution: the recipe's, else the pretrained weights' crop, else the model's default."""
    return recipe.image_size or (prep.crop if pretrained else flaxnets.model_info(recipe.model).input_size)


def _load_init_from(directory: str) -> dict[str, Any]:
    """The variables of a converted directory, or of a training workdir's best (else last) checkpoint."""
    if os.path.isfile(os.path.join(directory, META_FILE)):
        return flaxnets.load_converted(directory)[1]
    found = restore_run(directory)
    if found is not None:
        tree = found[2]
        return {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}
    raise TrainingError(f"--init-from {directory}: no checkpoint in {os.path.join(directory, 'checkpoints')}")


def _preprocessing(model: str, pretrained: str | None) -> tuple[flaxnets.Preprocessing, dict[str, Any]]:
    """The weights' preprocessing and the model options they need (defaults without ``pretrained``).

    A checkpoint file (path or URL) carries no metadata: it gets torchvision's ImageNet defaults.
    """
    if pretrained is None or is_checkpoint_location(pretrained):
        return flaxnets.Preprocessing(), {}
    try:
        weights = flaxnets.weights_info(model, None if pretrained == "default" else pretrained)
    except KeyError as err:
        raise TrainingError(f"--pretrained: {err.args[0] if err.args else err}") from None
    return weights.preprocessing, {k: v for k, v in weights.options.items() if k != "num_classes"}


def _load_pretrained(model: str, pretrained: str) -> dict[str, Any]:
    """The published (or file) weights of ``model`` as variables, with their own classifier."""
    try:
        return flaxnets.pretrained(model, None if pretrained == "default" else pretrained)[1]
    except WeightsUnavailableError as err:
        raise TrainingError(f"{err}") from None


def _init_from(state: TrainState, variables: dict[str, Any]) -> TrainState:
    """Copies loaded weights into ``state``; leaves whose shape differs (a new head) keep their init."""
    params = merge_by_shape(state.params, variables["params"])
    stats = merge_by_shape(state.batch_stats, variables.get("batch_stats", {})) if state.batch_stats else state.batch_stats
    ema = jax.tree.map(jnp.copy, params) if state.ema_params else state.ema_params
    return state.replace(params=params, ema_params=ema, batch_stats=stats,
                         opt_state=state.tx.init(params))


class _StopRequest:
    """Turns SIGTERM (preemption) into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _evaluate(eval_fn, state, source, image_size, batch_size, data_sharding, crop_fraction=0.875) -> dict[str, float]:
    """Top-1/top-5 over the whole eval split (padding masked out)."""
    totals = {"top1": 0, "top5": 0, "count": 0}
    ds = make_dataset(source, batch_size=batch_size, train=False, image_size=image_size,
                      eval_crop_fraction=crop_fraction)
    for batch in global_batches(ds, data_sharding):
        for key, value in eval_fn(state, batch).items():
            totals[key] += int(value)
    count = max(totals["count"], 1)
    return {"top1": totals["top1"] / count, "top5": totals["top5"] / count, "count": totals["count"]}


def run(recipe: Recipe, config: RunConfig) -> dict[str, Any]:
    """Trains ``recipe`` under ``config``; returns the final summary (best accuracy, paths, status).

    Nothing is written to ``config.workdir`` before the recipe, the config, the devices, the data
    and any checkpoint to resume from have been checked.

    Raises:
      RecipeError: a bad recipe field (a ``ValueError``; one line per problem).
      TrainingError: bad settings, a workdir of another run, or a loss that became NaN/Inf (the
        last good checkpoint is kept).
    """
    started = time.perf_counter()
    validate(recipe)
    validate_config(config)
    devices = select_devices(config.accelerator)
    if recipe.batch_size % len(devices):
        processes = f" of {jax.process_count()} processes" if jax.process_count() > 1 else ""
        raise TrainingError(f"batch size {recipe.batch_size} is not divisible by the {len(devices)} devices"
                            f"{processes}; use a multiple of {len(devices)}")
    _check_workdir_matches(config, recipe)
    if config.init_from:
        _check_init_from(config.init_from, recipe)
    prep, options = _preprocessing(recipe.model, config.pretrained)
    train_source, eval_source = _load_sources(recipe, config)
    steps_per_epoch = train_source.num_examples // recipe.batch_size
    if steps_per_epoch == 0:
        raise TrainingError(f"batch size {recipe.batch_size} exceeds the {train_source.num_examples} training examples")
    total_steps = steps_per_epoch * recipe.epochs
    image_size = run_image_size(recipe, config.pretrained, prep)
    program = build_program(recipe, num_classes=train_source.num_classes, image_size=image_size,
                            steps_per_epoch=steps_per_epoch, precision=config.precision, devices=devices,
                            mean=prep.mean, std=prep.std, model_options=options)
    replicated, data_sharding, schedule = program.replicated, program.data_sharding, program.schedule
    state = program.init_state(config.seed)
    ckpt = Checkpoints(config.workdir, keep=config.keep_checkpoints)
    is_main = jax.process_index() == 0
    if config.resume and ckpt.latest_step() is not None:
        state = _restore(ckpt, state)
        _say(is_main, f"resumed from step {int(state.step)} in {ckpt.last_dir}")
    elif config.init_from or config.pretrained:
        flag = "--init-from" if config.init_from else "--pretrained"
        try:
            loaded = (_load_init_from(config.init_from) if config.init_from
                      else _load_pretrained(recipe.model, config.pretrained))
            state = jax.device_put(_init_from(state, loaded), replicated)
        except (ValueError, TypeError, KeyError, OSError, TrainingError) as err:
            ckpt.close()
            text = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
            raise TrainingError(f"{flag} {config.init_from or config.pretrained} does not fit {recipe.model}: "
                                f"{text.splitlines()[0] if text else type(err).__name__}") from None
        _say(is_main, f"started from {flag} {config.init_from or config.pretrained}"
                      f"{' (backbone frozen)' if recipe.freeze_backbone else ''}")
    reporter = Reporter(config.workdir, enabled=is_main)
    if is_main:
        _write_run_info(config, recipe, train_source.num_classes, image_size, prep)

    jit_train, jit_eval = program.train, program.eval
    evaluate = functools.partial(_evaluate, source=eval_source, image_size=image_size,
                                 batch_size=recipe.batch_size, data_sharding=data_sharding,
                                 crop_fraction=prep.crop / prep.resize)

    step = int(state.step)
    status = "finished"
    with _StopRequest() as stop:
        _say(is_main, f"training {recipe.model} ({recipe.name}) on {train_source.name}: {train_source.num_examples} "
                      f"images, {train_source.num_classes} classes, {image_size}px, {recipe.epochs} epochs x "
                      f"{steps_per_epoch} steps of {recipe.batch_size} on {len(devices)} {config.accelerator} device(s)")
        while step < total_steps:
            epoch, done = divmod(step, steps_per_epoch)
            ds = make_dataset(train_source, batch_size=recipe.batch_size, train=True, recipe=recipe.augmentation,
                              image_size=image_size, seed=config.seed * 100_003 + epoch,
                              input_order=config.input_order, skip_batches=done)
            ds = ds.take(steps_per_epoch - done)
            bar = _progress(config.progress and is_main, epoch, recipe.epochs, steps_per_epoch, done)
            pending, losses, tick, images = [], [], time.perf_counter(), 0
            for batch in global_batches(ds, data_sharding):
                state, metrics = jit_train(state, batch)
                if started is not None:  # users iterate on start-up time: compiling, loading, the cache
                    jax.block_until_ready(metrics)
                    _say(is_main, f"first step done {time.perf_counter() - started:.1f} s after start")
                    started = None
                step += 1
                images += recipe.batch_size
                pending.append(metrics)
                done_epoch = step % steps_per_epoch == 0
                if len(pending) >= config.log_every or done_epoch or stop.requested:
                    fetched = jax.device_get(pending)
                    pending = []
                    loss = float(np.mean([m["loss"] for m in fetched]))
                    losses += [float(m["loss"]) for m in fetched]
                    if not math.isfinite(loss):
                        ckpt.close()
                        raise TrainingError(_diverged(loss, step, ckpt.latest_step(), ckpt.last_dir))
                    rate = images / (time.perf_counter() - tick)
                    lr = float(schedule(step - 1)) * float(state.lr_scale)
                    reporter.log_step(step, {"loss": loss, "lr": lr, "images_per_sec": rate})
                    if bar is not None:
                        bar.update(len(fetched))
                        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}")
                    tick, images = time.perf_counter(), 0
                if stop.requested or (config.max_steps is not None and step >= config.max_steps):
                    break
            if bar is not None:
                bar.close()
            if step % steps_per_epoch == 0:
                state = _end_of_epoch(state, epoch, step, losses, recipe, jit_eval, evaluate, ckpt, reporter, is_main)
            if step < total_steps and (stop.requested or (config.max_steps is not None and step >= config.max_steps)):
                if ckpt.latest_step() != step:
                    ckpt.save(step, state)
                status = "preempted" if stop.requested else "stopped at --max-steps"
                _say(is_main, f"{status}: saved step {step} to {ckpt.last_dir}; rerun the same command to resume")
                break
    ckpt.close()
    return _summary(reporter, config, status, step, is_main)


def _restore(ckpt: Checkpoints, state: TrainState) -> TrainState:
    """The newest checkpoint restored into ``state``'s structure, or a one-line error if it does not fit."""
    try:
        return ckpt.restore_latest(state)
    except Exception as err:  # noqa: BLE001 - Orbax raises many types for a checkpoint of another shape
        ckpt.close()
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrainingError(f"cannot resume from {ckpt.last_dir}: its checkpoint does not fit this model and optimizer "
                            f"({first[:200]}); pick another --workdir, or --no-resume") from None


def _diverged(loss: float, step: int, last_good: int | None, last_dir: str) -> str:
    """The message of a run stopped by a NaN/Inf loss: where the last good checkpoint is, or that there is none."""
    if last_good is None:
        return (f"loss became {loss} at step {step}, before the first checkpoint; stopped, so there is no checkpoint "
                "to go back to (try a smaller lr or a longer warm-up)")
    return f"loss became {loss} at step {step}; stopped. The last good checkpoint (step {last_good}) is in {last_dir}"


def _write_run_info(config: RunConfig, recipe: Recipe, num_classes: int, image_size: int,
                    prep: flaxnets.Preprocessing) -> None:
    """Records what was trained in ``run.json``, so ``python -m train.evaluate`` can rebuild the model."""
    data_dir = os.path.abspath(os.path.expanduser(config.data_dir)) if config.data_dir else None
    info = {"model": recipe.model, "dataset": recipe.dataset, "data_dir": data_dir, "num_classes": num_classes,
            "image_size": image_size, "precision": config.precision, "recipe": dataclasses.asdict(recipe),
            "pretrained": config.pretrained, "init_from": config.init_from,
            "preprocessing": {"mean": list(prep.mean), "std": list(prep.std),
                              "eval_crop_fraction": prep.crop / prep.resize}}
    with open(os.path.join(config.workdir, RUN_INFO), "w") as f:
        json.dump(info, f, indent=2)


def _end_of_epoch(state, epoch, step, losses, recipe, jit_eval, evaluate, ckpt, reporter, is_main):
    """Evaluates, applies the plateau rule, records and checkpoints one finished epoch."""
    result = evaluate(jit_eval, state)
    record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
              "eval_top1": result["top1"], "eval_top5": result["top5"], "lr_scale": float(state.lr_scale)}
    if recipe.ema_decay is not None:
        ema = evaluate(functools.partial(jit_eval, use_ema=True), state)
        record.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
    if recipe.plateau_patience > 0:
        state = _plateau(state, result["top1"], recipe)
    reporter.write(step, record)
    ema_text = f", EMA top-1 {100 * record['ema_top1']:.2f}%" if "ema_top1" in record else ""
    _say(is_main, f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, eval top-1 "
                  f"{100 * result['top1']:.2f}% top-5 {100 * result['top5']:.2f}%{ema_text}")
    ckpt.save(step, state, metrics={"top1": max(result["top1"], record.get("ema_top1", 0.0))})
    return state


def _plateau(state: TrainState, top1: float, recipe: Recipe) -> TrainState:
    """Divides the lr by 10 after ``plateau_patience`` evals without improvement (at most N times)."""
    # The best is stored in float32: a repeat of the same accuracy must not count as progress.
    if top1 > float(state.plateau_best) + 1e-6:
        return state.replace(plateau_best=jnp.asarray(top1, jnp.float32), plateau_bad_epochs=jnp.zeros((), jnp.int32))
    bad = int(state.plateau_bad_epochs) + 1
    reductions = round(-math.log10(float(state.lr_scale)))
    if bad >= recipe.plateau_patience and reductions < recipe.plateau_max_reductions:
        return state.replace(lr_scale=state.lr_scale * 0.1, plateau_bad_epochs=jnp.zeros((), jnp.int32))
    return state.replace(plateau_bad_epochs=jnp.asarray(bad, jnp.int32))


def _summary(reporter: Reporter, config: RunConfig, status: str, step: int, is_main: bool) -> dict[str, Any]:
    history = reporter.history() if is_main else []
    summary: dict[str, Any] = {"status": status, "step": step, "workdir": os.path.abspath(config.workdir)}
    if history:
        key = "ema_top1" if "ema_top1" in history[-1] and max(r["ema_top1"] for r in history) > max(
            r["eval_top1"] for r in history) else "eval_top1"
        best = max(history, key=lambda r: r[key])
        summary.update(best_top1=best[key], best_top5=best[key.replace("top1", "top5")], best_epoch=best["epoch"],
                       plot=reporter.plot(), metrics=reporter.metrics_path)
    return summary


def _progress(enabled: bool, epoch: int, epochs: int, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False)


def _say(enabled: bool, message: str) -> None:
    if enabled:
        print(message, flush=True)
