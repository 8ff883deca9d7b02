"""Fine-tunes a pretrained ResNet-18 on new classes in a plain optax loop (walk-through: docs/finetuning.md).

    python docs/finetune_example.py                         # torchvision's weights, downloaded once
    python docs/finetune_example.py --image-size 64         # quicker on a CPU
    python docs/finetune_example.py --weights ./resnet18.safetensors --linear-probe

"Your images" here are scikit-learn's 1,797 handwritten digits (8x8 grey, shipped inside
scikit-learn: no download), made RGB and prepared with the weights' own preprocessing.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np
import optax
from sklearn.datasets import load_digits

import flaxnets

MODEL, HEAD, NUM_CLASSES = "resnet18", "fc", 10  # "fc": the classifier's parameter name in ResNets


def load_images(held_out: int = 360):
    """((train images, labels), (held-out images, labels)): uint8 RGB (N, 8, 8, 3), a fixed split."""
    digits = load_digits()
    images = np.repeat(np.round(digits.images * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1)
    order = np.random.RandomState(0).permutation(len(images))
    test, train = order[:held_out], order[held_out:]
    return (images[train], digits.target[train]), (images[test], digits.target[test])


def preprocessing_for(weights: str | None, image_size: int | None = None) -> flaxnets.Preprocessing:
    """The weights' published preprocessing (resize, crop, mean/std), optionally scaled to ``image_size``."""
    # A checkpoint file carries no such metadata: take the architecture's default published weights'
    # (every torchvision ResNet uses the same ImageNet mean/std; only the resize differs).
    is_file = weights is not None and flaxnets.is_checkpoint_location(weights)
    spec = flaxnets.weights_info(MODEL, None if is_file else weights).preprocessing
    if image_size:  # keep the resize/crop ratio, mean, std and interpolation
        spec = dataclasses.replace(spec, resize=round(spec.resize * image_size / spec.crop), crop=image_size)
    return spec


def make_optimizer(params, lr: float, head_lr_multiplier: float, linear_probe: bool):
    """SGD with momentum: the new head at ``lr * head_lr_multiplier``, the backbone at ``lr`` (or frozen)."""
    labels = {name: "head" if name == HEAD else "backbone" for name in params}  # a prefix of the params tree
    backbone = optax.set_to_zero() if linear_probe else optax.sgd(lr, momentum=0.9)
    return optax.multi_transform({"head": optax.sgd(lr * head_lr_multiplier, momentum=0.9),
                                  "backbone": backbone}, labels)


def make_train_step(module, optimizer, linear_probe: bool):
    """A jitted ``step(params, batch_stats, opt_state, images, labels) -> (params, batch_stats, opt_state, loss)``."""

    def loss_fn(params, batch_stats, images, labels):
        variables = {"params": params, "batch_stats": batch_stats}
        if linear_probe:  # inference-mode BatchNorm: the pretrained running statistics stay as loaded
            logits = module.apply(variables, images, train=False)
        else:  # batch statistics, and the running averages updated
            logits, updated = module.apply(variables, images, train=True, mutable=["batch_stats"])
            batch_stats = updated["batch_stats"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), batch_stats

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


def main(argv=None) -> dict:
    """Runs the example; returns ``{"losses", "accuracy", "variables"}`` (the fine-tuned variables)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="a tag (tv_in1k) or a checkpoint path/URL; default: the best published")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, help="train at this size, not the weights' crop (224)")
    parser.add_argument("--lr", type=float, default=0.001, help="the backbone's learning rate")
    parser.add_argument("--head-lr-multiplier", type=float, default=10.0)
    parser.add_argument("--linear-probe", action="store_true", help="train the head only; backbone and BN frozen")
    args = parser.parse_args(argv)

    model = flaxnets.create_model(MODEL, pretrained=args.weights or True, num_classes=NUM_CLASSES)
    module, variables = model.unbind()  # new 10-class head; backbone and BN statistics pretrained
    params, batch_stats = variables["params"], variables["batch_stats"]
    spec = preprocessing_for(args.weights, args.image_size)
    (train_x, train_y), (test_x, test_y) = load_images()

    optimizer = make_optimizer(params, args.lr, args.head_lr_multiplier, args.linear_probe)
    opt_state, step = optimizer.init(params), make_train_step(module, optimizer, args.linear_probe)
    rng, losses = np.random.default_rng(0), []
    for i in range(args.steps):
        batch = rng.choice(len(train_x), args.batch_size, replace=False)
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state,
                                                    flaxnets.preprocess(train_x[batch], spec), train_y[batch])
        losses.append(float(loss))
        if (i + 1) % 10 == 0 or i + 1 == args.steps:  # the mean since the last line: less noisy
            print(f"step {i + 1:4d}  loss {np.mean(losses[-((i % 10) + 1):]):.4f}", flush=True)

    variables = {"params": params, "batch_stats": batch_stats}
    predict = jax.jit(lambda variables, images: module.apply(variables, images, train=False).argmax(-1))
    predicted = np.concatenate([predict(variables, flaxnets.preprocess(test_x[i:i + 120], spec))
                                for i in range(0, len(test_x), 120)])
    accuracy = float(np.mean(predicted == test_y))
    print(f"held-out accuracy {accuracy:.3f} on {len(test_x)} images (chance 0.100)")
    return {"losses": losses, "accuracy": accuracy, "variables": variables}

if __name__ == "__main__":
    main()
