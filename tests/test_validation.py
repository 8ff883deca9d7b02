"""Bad input at every entry point: one clear line (exit status 1, or 2 for argparse), no traceback,
nothing written. Every case fails before any compilation or data loading, so the file is fast."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxnets
from tests.conftest import SMALL_INPUT
from tests.logs import message_lines
from train import evaluate as evaluate_cli
from train.__main__ import main as train_main
from train.checkpoints import Checkpoints
from train.evaluate import EvaluationError, Member, check_sizes
from train.recipes import DEFAULT_RECIPE, RecipeError, get_recipe, list_recipes, validate
from train.trainer import RUN_INFO, RunConfig, TrainingError, _diverged, _restore, run

DEFAULT = get_recipe(DEFAULT_RECIPE)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_error(capsys, code, message, lines=1):
    """Asserts exit status 1 and ``lines`` lines on stderr, each ``error: ...``, one containing ``message``."""
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert "Traceback" not in err and len(err.splitlines()) == lines, err
    assert all(line.startswith("error: ") for line in err.splitlines()), err
    assert message in err, err
    return err


# --- python -m train -----------------------------------------------------------------------------

TRAIN_CASES = [
    (["--batch-size", "0"], "batch_size must be a positive integer; got 0"),
    (["--batch-size", "-8"], "batch_size must be a positive integer; got -8"),
    (["--epochs", "0"], "epochs must be a positive integer; got 0"),
    (["--lr", "-0.1"], "lr must be a number > 0; got -0.1 (a negative rate climbs the loss)"),
    (["--lr", "0"], "lr must be a number > 0; got 0.0"),
    (["--set", "image_size=-3"], "image_size must be a positive integer or None; got -3"),
    (["--set", "image_size=0"], "image_size must be a positive integer or None; got 0"),
    (["--model", "xception", "--set", "image_size=6"],
     "xception needs images of at least 7 px (its two unpadded 3x3 stem convs); got image_size 6"),
    (["--model", "alexnet", "--set", "image_size=32"],
     "alexnet needs images of at least 67 px (its unpadded 11x11/4 stem and three 3x3/2 max pools)"),
    (["--model", "googlenet", "--set", "image_size=64"],
     "googlenet needs images of at least 79 px (its auxiliary heads pool 5x5 at stride 16"),
    (["--model", "d121", "--set", "image_size=28"], "densenet121 needs images of at least 29 px"),
    (["--model", "vgg11", "--set", "image_size=16"], "vgg11 needs images of at least 32 px"),
    (["--model", "resnet50", "--epochs", "5"],
     "milestones (30, 60) must be increasing epochs inside the 5 epochs (1 to 4); e.g. --set milestones=2,3"),
    (["--set", "schedule=step", "--set", "milestones=8,4"], "milestones (8, 4) must be increasing"),
    (["--set", "schedule=step", "--epochs", "1"], "the step schedule needs at least 2 epochs"),
    (["--set", "schedule=linear"], "unknown schedule 'linear'; use constant, step, exponential, cosine"),
    (["--set", "augmentation=mixup"], "unknown augmentation 'mixup'; use one of alexnet"),
    (["--set", "momentum=1"], "momentum must be a number in [0, 1); got 1.0"),
    (["--set", "weight_decay=-1e-4"], "weight_decay must be a number in [0, 1); got -0.0001"),
    (["--set", "decay_factor=0"], "decay_factor must be a number in (0, 1]; got 0.0"),
    (["--set", "decay_every_epochs=0"], "decay_every_epochs must be a number > 0"),
    (["--set", "warmup_epochs=20"], "warmup_epochs must be a number in [0, 15]; got 20.0"),
    (["--set", "label_smoothing=1"], "label_smoothing must be a number in [0, 1)"),
    (["--set", "aux_loss_weight=-0.3"], "aux_loss_weight must be a number >= 0"),
    (["--set", "ema_decay=1"], "ema_decay must be a number in (0, 1); got 1.0"),
    (["--set", "dropout_rate=1.5"], "dropout_rate must be a number in [0, 1)"),
    (["--set", "lr=nan"], "lr must be a number > 0; got nan"),
    (["--set", "lr_reference_batch=0"], "lr_reference_batch must be a positive integer or None"),
    (["--set", "plateau_patience=-1"], "plateau_patience must be an integer >= 0"),
    (["--set", "momentum=0", "--set", "nesterov=true"], "nesterov needs momentum > 0"),
    (["--set", "model=resnet05"], "unknown model 'resnet05'"),
    (["--log-every", "0"], "log_every (--log-every) must be a positive integer; got 0"),
    (["--max-steps", "0"], "max_steps (--max-steps) must be a positive integer; got 0"),
    (["--seed", "-1"], "seed (--seed) must be an integer >= 0; got -1"),
    (["--num-processes", "2"], "--num-processes and --process-id need --coordinator"),
    (["--coordinator", "localhost:1234"], "--coordinator needs --num-processes and --process-id"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "--coordinator must be host:port"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id must be in [0, --num-processes)"),
]


@pytest.mark.parametrize("args, message", TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_train_cli_bad_value(args, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = train_main([*args, "--workdir", str(workdir), "--no-progress"])
    one_line_error(capsys, code, message)
    assert not workdir.exists()


def test_train_cli_lists_every_problem_on_its_own_line(tmp_path, capsys):
    code = train_main(["--batch-size", "0", "--epochs", "0", "--lr", "-1", "--workdir", str(tmp_path / "run")])
    err = one_line_error(capsys, code, "epochs must be a positive integer", lines=3)
    assert "batch_size must" in err and "lr must" in err


@pytest.mark.parametrize("args", [["--epochs", "abc"], ["--accelerator", "npu"], ["--precision", "fp16"],
                                  ["--batch-size", "1.5"], ["--no-such-flag"]])
def test_train_cli_usage_errors_exit_2(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main([*args, "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage:" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_workdir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    one_line_error(capsys, train_main(["--workdir", str(path)]), f"--workdir {path} is a file, not a directory")
    one_line_error(capsys, train_main(["--workdir", str(path / "run")]), f"cannot be created: {path} is a file")
    assert path.read_text() == "keep me"


def test_training_without_the_train_extra_says_what_to_install(tmp_path, monkeypatch, capsys):
    import train.__main__ as cli

    monkeypatch.setattr(cli, "_TRAINING_STACK", ("optax", "no_such_module_flaxnets"))
    assert train_main(["--workdir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("error: training needs the [train] extra (no_such_module_flaxnets not installed): "
                   "pip install 'flaxnets[train]' (from a clone: pip install -e '.[train]')")
    assert not os.path.exists(tmp_path / "run")


def test_init_from_a_directory_without_converted_weights(tmp_path, capsys):
    code = train_main(["--init-from", str(tmp_path), "--workdir", str(tmp_path / "run")])
    one_line_error(capsys, code, "is neither a `python -m flaxnets.convert` output nor a training workdir (no model.json or run.json in it)")
    assert not (tmp_path / "run").exists()


def _run_record(workdir, model="vgg11", recipe="vgg16_sgd-plateau_74e_imagenet", dataset="flaxnets_digits"):
    workdir.mkdir()
    record = {"model": model, "dataset": dataset, "num_classes": 10, "image_size": 32, "precision": "fp32",
              "recipe": {"name": recipe, "ema_decay": None}}
    (workdir / RUN_INFO).write_text(json.dumps(record))
    return (workdir / RUN_INFO).read_text()


def test_workdir_of_another_model_is_not_resumed(tmp_path, capsys):
    workdir = tmp_path / "run"
    before = _run_record(workdir)
    code = train_main(["--workdir", str(workdir), "--no-progress"])
    one_line_error(capsys, code, f"--workdir {workdir} holds a run of vgg11 (vgg16_sgd-plateau_74e_imagenet, on "
                                 f"flaxnets_digits; see its run.json), not resnet18 ({DEFAULT_RECIPE}")
    assert (workdir / RUN_INFO).read_text() == before and os.listdir(workdir) == [RUN_INFO]


def test_unreadable_run_record(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / RUN_INFO).write_text("{not json")
    one_line_error(capsys, train_main(["--workdir", str(workdir)]), "run.json is not a readable run record")
    assert os.listdir(workdir) == [RUN_INFO]


def test_the_commands_themselves_print_one_line_and_exit_1(tmp_path):
    commands = [["train", "--batch-size", "0", "--workdir", str(tmp_path / "run")],
                ["train.evaluate", "--workdir", str(tmp_path / "nowhere")]]
    procs = [subprocess.Popen([sys.executable, "-m", *command], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for command in commands]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        lines = message_lines(err)
        assert proc.returncode == 1 and out == "" and len(lines) == 1, err
        assert lines[0].startswith("error: ") and "Traceback" not in err
    assert os.listdir(tmp_path) == []


# --- the Python API of training ------------------------------------------------------------------


def test_every_preset_is_valid():
    for name in list_recipes():
        assert validate(get_recipe(name)) is get_recipe(name)


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 0}, "batch_size must be a positive integer; got 0"),
    ({"epochs": "10"}, "epochs must be a positive integer; got '10'"),
    ({"lr": -0.1}, "lr must be a number > 0"),
    ({"milestones": [1.5]}, "milestones must be a tuple of epochs"),
    ({"nesterov": "yes"}, "nesterov must be true or false; got 'yes'"),
    ({"model": "xception", "image_size": 3}, "xception needs images of at least 7 px"),
    ({"model": "", "augmentation": ""}, "model must be a non-empty string"),
])
def test_validate_raises_a_value_error_naming_the_field(changes, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        validate(dataclasses.replace(DEFAULT, **changes))


def test_recipe_error_collects_every_problem():
    with pytest.raises(RecipeError) as info:
        validate(dataclasses.replace(DEFAULT, epochs=0, batch_size=-1, schedule="linear", image_size=-3))
    assert len(info.value.problems) == 4 and str(info.value).count("\n") == 3


def test_run_validates_before_touching_the_workdir(tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(RecipeError, match="batch_size must be a positive integer"):
        run(dataclasses.replace(DEFAULT, batch_size=0), RunConfig(workdir=str(workdir)))
    with pytest.raises(TrainingError, match="keep_checkpoints .* must be a positive integer"):
        run(DEFAULT, RunConfig(workdir=str(workdir), keep_checkpoints=0))
    with pytest.raises(TrainingError, match="precision must be fp32 or bf16"):
        run(DEFAULT, RunConfig(workdir=str(workdir), precision="fp16"))
    assert not workdir.exists()


def test_a_checkpoint_that_does_not_fit_is_one_line():
    class Mismatched:
        last_dir = "/w/checkpoints/last"

        def restore_latest(self, like):
            raise ValueError("Dict key mismatch; expected keys: ['trace']\nlong details")

        def close(self):
            pass

    with pytest.raises(TrainingError) as info:
        _restore(Mismatched(), None)
    assert str(info.value) == ("cannot resume from /w/checkpoints/last: its checkpoint does not fit this model and "
                               "optimizer (Dict key mismatch; expected keys: ['trace']); pick another --workdir, or "
                               "--no-resume")


def test_a_nan_before_the_first_checkpoint_says_there_is_none():
    message = _diverged(float("nan"), 3, None, "/w/checkpoints/last")
    assert message.startswith("loss became nan at step 3, before the first checkpoint") and "None" not in message
    assert "(step 22) is in /w/checkpoints/last" in _diverged(float("inf"), 30, 22, "/w/checkpoints/last")


# --- flaxnets: create_model, __call__, extract_features, dense_logits -------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    ({"num_classes": 0}, ValueError, "num_classes must be a positive integer; got 0"),
    ({"num_classes": 2.5}, ValueError, "num_classes must be a positive integer; got 2.5"),
    ({"num_classes": True}, ValueError, "num_classes must be a positive integer; got True"),
    ({"dtype": jnp.int32}, TypeError, "dtype must be a floating dtype"),
    ({"dropout_rate": 1.0}, ValueError, r"dropout_rate must be in \[0, 1\)"),
    ({"depth": 50}, TypeError, "has no option"),
])
def test_create_model_rejects(kwargs, error, message):
    with pytest.raises(error, match=message):
        flaxnets.create_model("resnet18", **kwargs)


def test_create_model_rejects_a_name_that_is_not_a_string():
    with pytest.raises(TypeError, match="expects a model name"):
        flaxnets.create_model(18)


NO_PARAMS = {"params": {}}  # the input check comes first: no parameter is looked up before it raises


@pytest.mark.parametrize("x, error, message", [
    (np.zeros((2, 3, 32, 32), np.float32), ValueError,
     r"looks like NCHW: transpose to NHWC with x.transpose\(0, 2, 3, 1\)"),
    (np.zeros((32, 32, 3), np.float32), ValueError, r"got rank 3.*add a batch axis: x\[None\]"),
    (np.zeros((4, 32), np.float32), ValueError, r"shape \(batch, height, width, 3\); got rank 2"),
    (np.zeros((2, 32, 32, 1), np.float32), ValueError, "3 colour channels last.*grayscale"),
    (np.zeros((2, 32, 32, 4), np.float32), ValueError, r"3 colour channels last \(NHWC\); got shape \(2, 32, 32, 4\)"),
    (np.zeros((2, 32, 32, 3), np.uint8), TypeError, "expects float images.*got uint8: convert and normalise"),
    (np.zeros((2, 32, 32, 3), bool), TypeError, "expects float images.*got bool"),
    ([[0.0]], TypeError, "expects an NHWC float array of images; got list"),
])
def test_model_input_checks(x, error, message):
    with pytest.raises(error, match=message):
        flaxnets.create_model("resnet18", num_classes=10).apply(NO_PARAMS, x)


def test_input_checks_run_while_tracing():
    model = flaxnets.create_model("resnet18", num_classes=10)
    with pytest.raises(ValueError, match="looks like NCHW"):
        jax.jit(model.apply)(NO_PARAMS, jnp.zeros((2, 3, 32, 32)))
    # Shapes are static: a well-formed input leaves nothing of the check in the compiled program.
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    text = jax.jit(model.apply).lower(variables, jnp.zeros((1, 16, 16, 3))).as_text()
    assert "NCHW" not in text and "callback" not in text


@pytest.mark.parametrize("name, mode, least", [
    ("alexnet", {}, 67), ("alexnet_owt", {}, 63), ("vgg11", {}, 32), ("vgg16_1x1", {}, 32), ("resnet50", {}, 1),
    ("resnext50_32x4d", {}, 1), ("densenet121", {}, 29), ("xception", {}, 7), ("googlenet", {"train": True}, 79),
    ("googlenet", {"train": False}, 31), ("googlenet_bn", {"train": True}, 15), ("vgg11", {"dense": True}, 224),
    ("alexnet", {"dense": True}, 227),
])
def test_minimum_input_sizes(name, mode, least):
    # Computed from the layers; each is the smallest size that traces (checked once by eval_shape
    # with the check disabled: one pixel less fails or leaves an empty feature map).
    model = flaxnets.create_model(name, num_classes=10)
    assert model.min_input_size(**mode)[0] == least
    if least > 1:
        with pytest.raises(ValueError, match=f"needs images of at least {least} px"):
            model.apply(NO_PARAMS, np.zeros((1, least - 1, least + 5, 3), np.float32), **mode)


def test_every_model_states_its_minimum_and_the_test_sizes_respect_it():
    for name in flaxnets.list_models():
        least, why = flaxnets.create_model(name).min_input_size(train=True)
        assert 1 <= least <= SMALL_INPUT.get(name, 64) and why


def test_googlenet_evaluates_below_its_training_minimum():
    model = flaxnets.create_model("googlenet", num_classes=10)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 96, 96, 3)))
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 64, 64, 3))), variables)
    assert out.shape == (1, 10)


def test_extract_features_and_dense_logits_checks():
    model = flaxnets.create_model("resnet18", num_classes=10)
    with pytest.raises(TypeError, match=r"pass the whole dict, not variables\['params'\]"):
        flaxnets.extract_features(model, {"conv1": {}}, np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(TypeError, match=r"names must be a tuple of feature names, e.g. \('stage2',\)"):
        flaxnets.extract_features(model, NO_PARAMS, np.zeros((1, 16, 16, 3), np.float32), names="stage2")
    with pytest.raises(ValueError, match="looks like NCHW"):
        flaxnets.extract_features(model, NO_PARAMS, np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="looks like NCHW"):
        flaxnets.dense_logits(flaxnets.create_model("vgg11"), NO_PARAMS, np.zeros((1, 3, 256, 256), np.float32))
    with pytest.raises(TypeError, match="dense_logits expects a model from flaxnets.create_model; got str"):
        flaxnets.dense_logits("vgg11", NO_PARAMS, np.zeros((1, 256, 256, 3), np.float32))


# --- python -m train.evaluate --------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    workdir = tmp_path / "run"
    _run_record(workdir, model="resnet18", recipe=DEFAULT_RECIPE)
    return workdir


EVAL_CASES = [
    (["--image-size", "0"], "--image-size must be a positive integer; got 0"),
    (["--batch-views", "0"], "--batch-views must be a positive integer; got 0"),
    (["--limit", "-5"], "--limit must be a positive integer; got -5"),
    (["--limit", "0"], "--limit must be a positive integer; got 0"),
    (["--scales", "256,abc"], "--scales expects comma-separated positive integers, e.g. 256,384,512; got '256,abc'"),
    (["--scales", "0"], "--scales expects comma-separated positive integers"),
    (["--out", "/nonexistent/dir/eval.json"], "--out /nonexistent/dir/eval.json must be a file path in an existing"),
    (["--ema"], "was trained without EMA (its recipe's ema_decay is None)"),
    ([], "no checkpoint in"),
]


@pytest.mark.parametrize("args, message", EVAL_CASES, ids=[" ".join(a) or "no checkpoint" for a, _ in EVAL_CASES])
def test_evaluate_cli_bad_value(args, message, run_dir, capsys):
    code = evaluate_cli.main(["--workdir", str(run_dir), "--no-progress", *args])
    one_line_error(capsys, code, message)
    assert os.listdir(run_dir) == [RUN_INFO]


def test_evaluate_cli_bad_workdirs(tmp_path, capsys):
    one_line_error(capsys, evaluate_cli.main(["--workdir", str(tmp_path / "nowhere")]),
                   "nowhere is not a `python -m train` workdir or a `python -m flaxnets.convert` output")
    (tmp_path / "file").write_text("")
    one_line_error(capsys, evaluate_cli.main(["--workdir", str(tmp_path / "file")]), "file is a file, not a")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / RUN_INFO).write_text("[1, 2")
    one_line_error(capsys, evaluate_cli.main(["--workdir", str(tmp_path / "bad")]), "is not a readable run record")
    (tmp_path / "bad" / RUN_INFO).write_text("[1, 2]")
    one_line_error(capsys, evaluate_cli.main(["--workdir", str(tmp_path / "bad")]), "(a JSON list, not an object)")
    (tmp_path / "bad" / RUN_INFO).write_text(json.dumps({"model": "resnet18"}))
    one_line_error(capsys, evaluate_cli.main(["--workdir", str(tmp_path / "bad")]), "no checkpoint in")
    checkpoints = Checkpoints(str(tmp_path / "bad"))
    checkpoints.save(1, {"params": {"w": jnp.zeros(2)}})
    checkpoints.close()
    one_line_error(capsys, evaluate_cli.main(["--workdir", str(tmp_path / "bad")]),
                   "lacks num_classes, image_size, precision, dataset, recipe: not written by `python -m train`")


@pytest.mark.parametrize("args", [["--protocol", "12crop"], ["--checkpoint", "first"], ["--limit", "x"], []])
def test_evaluate_cli_usage_errors_exit_2(args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(args if args else ["--protocol", "center"])  # [] -> --workdir missing
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "usage:" in err and "Traceback" not in err


def test_evaluation_sizes_are_checked_before_any_image_is_read():
    def member(name, size):
        return Member(name, flaxnets.create_model(name, num_classes=10), {}, size, None, "unloaded")

    with pytest.raises(EvaluationError, match=r"xception \(Xception\) needs images of at least 7 px .*got image "
                                              "size 5"):
        check_sizes([member("xception", 5)], ["center"], None)
    with pytest.raises(EvaluationError, match="the 10crop protocol crops 16 px views, so every scale must be at least"):
        check_sizes([member("resnet18", 16)], ["10crop"], (12,))
    with pytest.raises(EvaluationError, match=r"--scales 20: the dense protocol's shorter sides must be at least 29 "
                                              r"px for densenet121 \(DenseNet\)"):
        check_sizes([member("densenet121", 32)], ["dense"], (20,))
    with pytest.raises(EvaluationError, match=r"--scales 32,37,41: .* at least 224 px for vgg11 \(VGG\) \(dense "
                                              r"evaluation slides its FC layers as a 7x7 window\)"):
        check_sizes([member("vgg11", 32)], ["dense"], None)
    check_sizes([member("resnet18", 16)], ["center", "10crop", "144crop", "dense"], None)  # the defaults fit
