"""Train the service's own facial-expression CNN on FER2013 and write it with its model card.

Reads the FER2013 Training and PublicTest splits straight from the shared zip (never extracted, never
copied into the repo), trains a small VGG-style Keras 3 network on Training, keeps the epoch with the best
flip-averaged PublicTest accuracy and writes

* ``resources/emotion_model.keras``: input a batch of 48x48x1 grey float32 in 0..255, output softmax
  probabilities over ``EMOTION_LABELS`` (the normalisation is the model's first layer);
* ``resources/emotion_model.md``: the model card with every figure this run measured.

PrivateTest is evaluated once, after the epoch was chosen, and only reported.

    nice -n 10 .venv/bin/python -m tools.train_emotion                 # full run (about an hour here)
    .venv/bin/python -m tools.train_emotion --time-steps 60            # time one epoch, train nothing
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from api.services.emotion import EMOTION_LABELS, FACE_SIZE, tta_views
from tools.common import REPO_ROOT
from tools.datasets import FER2013_PRIVATETEST, FER2013_ZIP, fer2013_arrays
from tools.eval_emotion import metrics

SIZE = FACE_SIZE
# Model-card sections that tools/eval_emotion.py writes (or that quote its runs); a new training run keeps them.
EVAL_SECTIONS = (
    "\n## Comparison with the baselines",
    "\n## Face crop for photos",
    "\n## Test-time views",
    "\n## Inference time",
)


# ----------------------------------------------------------------------------------------- augmentation
def make_augment(max_rotation_deg: float, max_shift: float, scale_range: float, erase_prob: float) -> object:
    """A tf function (images (B,48,48,1) float32, labels) -> augmented batch, all in-graph.

    One random affine per image (rotation, isotropic zoom, shift, horizontal flip) applied with a single
    ImageProjectiveTransformV3 call: cheaper than chaining Keras preprocessing layers, and FER2013 faces
    vary in exactly these ways (the crops are only roughly aligned). Contrast/brightness jitter copes with
    the data set's mix of lighting; a small random erase makes the net use more than one facial region.
    """
    import tensorflow as tf

    centre = (SIZE - 1) / 2.0

    def augment(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        batch = tf.shape(images)[0]
        angle = tf.random.uniform([batch], -1.0, 1.0) * (max_rotation_deg * math.pi / 180.0)
        scale = tf.random.uniform([batch], 1.0 - scale_range, 1.0 + scale_range)
        shift = tf.random.uniform([batch, 2], -max_shift, max_shift) * SIZE
        flip = tf.where(tf.random.uniform([batch]) < 0.5, -1.0, 1.0)
        # Output pixel p maps to input pixel A p + b with A = R(angle) * diag(flip, 1) / scale, rotating
        # about the image centre; the transform op wants that output->input map as 8 numbers.
        cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
        a0, a1 = cos * flip, -sin
        b0, b1 = sin * flip, cos
        a2 = centre - a0 * centre - a1 * centre + shift[:, 0]
        b2 = centre - b0 * centre - b1 * centre + shift[:, 1]
        zeros = tf.zeros([batch])
        transforms = tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=images,
            transforms=transforms,
            output_shape=tf.constant([SIZE, SIZE]),
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="REFLECT",
        )
        # Brightness/contrast about the image mean, in 0..255 units.
        mean = tf.reduce_mean(out, axis=[1, 2, 3], keepdims=True)
        contrast = tf.random.uniform([batch, 1, 1, 1], 0.75, 1.25)
        brightness = tf.random.uniform([batch, 1, 1, 1], -25.0, 25.0)
        out = tf.clip_by_value((out - mean) * contrast + mean + brightness, 0.0, 255.0)
        # Random erase: one grey square of 8-16 px per chosen image.
        side = tf.random.uniform([batch, 1, 1], 8.0, 16.0)
        cy = tf.random.uniform([batch, 1, 1], 0.0, SIZE)
        cx = tf.random.uniform([batch, 1, 1], 0.0, SIZE)
        grid = tf.range(SIZE, dtype=tf.float32)
        inside_y = tf.abs(grid[None, :, None] - cy) < side / 2
        inside_x = tf.abs(grid[None, None, :] - cx) < side / 2
        chosen = tf.random.uniform([batch, 1, 1]) < erase_prob
        mask = tf.logical_and(tf.logical_and(inside_y, inside_x), chosen)[..., None]
        out = tf.where(mask, tf.fill(tf.shape(out), 128.0), out)
        return out, labels

    return tf.function(augment)


# ---------------------------------------------------------------------------------------------- model
def build_model(widths: tuple[int, ...], convs_per_block: int, dropout: float, weight_decay: float) -> object:
    """VGG-style: blocks of 3x3 conv + BN + ReLU, 2x2 max-pool between blocks, global pooling, softmax.

    The normalisation from 0..255 grey to roughly zero-mean unit-range is the first layer, so callers feed
    raw pixel values. L2 on the conv kernels stands in for weight decay (BN makes it act on the effective
    learning rate, which is what regularises small FER2013 nets).
    """
    import keras
    from keras import layers

    reg = keras.regularizers.L2(weight_decay) if weight_decay > 0 else None
    inputs = keras.Input(shape=(SIZE, SIZE, 1), dtype="float32", name="grey48")
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalise")(inputs)
    for block, width in enumerate(widths):
        for conv in range(convs_per_block):
            x = layers.Conv2D(
                width, 3, padding="same", use_bias=False, kernel_regularizer=reg, name=f"b{block}_conv{conv}"
            )(x)
            x = layers.BatchNormalization(name=f"b{block}_bn{conv}")(x)
            x = layers.ReLU(name=f"b{block}_relu{conv}")(x)
        if block < len(widths) - 1:
            x = layers.MaxPooling2D(2, name=f"b{block}_pool")(x)
            # Light spatial dropout, growing with depth: the schedule is short (tens of epochs), and heavier
            # dropout here slowed convergence more than it reduced over-fitting in such runs.
            x = layers.SpatialDropout2D(min(0.05 * (block + 1), 0.15), name=f"b{block}_drop")(x)
    # Average and max pooling together: max keeps a strong local cue (an open mouth), average the overall
    # configuration; the concat costs 2x the head weights only.
    x = layers.Concatenate(name="pool")(
        [layers.GlobalAveragePooling2D(name="gap")(x), layers.GlobalMaxPooling2D(name="gmp")(x)]
    )
    x = layers.Dropout(dropout, name="head_drop")(x)
    x = layers.Dense(256, use_bias=False, kernel_regularizer=reg, name="fc")(x)
    x = layers.BatchNormalization(name="fc_bn")(x)
    x = layers.ReLU(name="fc_relu")(x)
    x = layers.Dropout(dropout, name="fc_drop")(x)
    logits = layers.Dense(len(EMOTION_LABELS), name="logits")(x)
    # Softmax in float32 whatever the compute policy, so the probabilities sum to 1 to float32 precision.
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, outputs, name="emotion_vgg")


# ------------------------------------------------------------------------------------------- evaluation
def predict_tta(model: object, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Mean of the softmax for each image and its mirror image (N,7): the service's default "flip" views."""
    views = tta_views(images.astype(np.float32)[..., None], "flip")
    probabilities = model.predict(views, batch_size=batch_size, verbose=0)
    return probabilities.reshape(2, len(images), -1).mean(axis=0)


def scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, object]:
    """Accuracy, count and recall per class (NaN for a class without images) from ``tools.eval_emotion.metrics``:
    the figures that the model card and ``results.json`` keep."""
    result = metrics(probabilities, labels)
    recall: dict[str, float | None] = result["recall"]  # type: ignore[assignment]
    nan_for_none = {label: float("nan") if value is None else value for label, value in recall.items()}
    return {"accuracy": result["accuracy"], "n": result["n"], "recall": nan_for_none}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zip", type=Path, default=FER2013_ZIP)
    parser.add_argument("--private", type=Path, default=FER2013_PRIVATETEST, help="PrivateTest folder (report only)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "resources" / "emotion_model.keras")
    parser.add_argument("--card", type=Path, default=REPO_ROOT / "resources" / "emotion_model.md")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/train_emotion"), help="checkpoints")
    parser.add_argument("--epochs", type=int, default=40, help="epochs (the most, with a time budget)")
    parser.add_argument(
        "--time-budget-min", type=float, default=0.0, help="anneal over this many minutes of fit, then stop"
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup-epochs", type=float, default=2.0)
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="L2 on kernels")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--widths", default="32,64,128,256", help="channels per block")
    parser.add_argument("--convs-per-block", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.4)
    parser.add_argument("--rotation", type=float, default=12.0, help="max rotation, degrees")
    parser.add_argument("--shift", type=float, default=0.1, help="max shift, fraction of 48 px")
    parser.add_argument("--zoom", type=float, default=0.1, help="zoom range +/-")
    parser.add_argument("--erase", type=float, default=0.25, help="probability of a random erase")
    parser.add_argument("--disgust-weight", type=float, default=2.0, help="class weight of the rare class")
    parser.add_argument("--precision", choices=("float32", "mixed_bfloat16"), default="mixed_bfloat16")
    parser.add_argument(
        "--init-weights", type=Path, default=None, help="start from this .keras model (a further stage)"
    )
    parser.add_argument("--jit", action="store_true", help="XLA-compile the training step")
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--time-steps", type=int, default=0, help="only time this many steps and exit")
    parser.add_argument("--train-limit", type=int, default=0, help="use only the first N (smoke tests)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "nice -n 10 .venv/bin/python -m tools.train_emotion " + shlex.join(sys.argv[1:] if argv is None else argv)
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    keras.utils.set_random_seed(args.seed)
    # bfloat16 runs the convolutions on the CPU's AMX/AVX-512 bf16 units through oneDNN; BN statistics,
    # the loss and the softmax stay in float32 (Keras' mixed policy), so accuracy is not affected.
    keras.mixed_precision.set_global_policy(args.precision)

    started = time.time()
    x_train, y_train = fer2013_arrays(f"{args.zip}:train")
    x_val, y_val = fer2013_arrays(f"{args.zip}:publictest")
    if args.train_limit:
        keep = np.random.default_rng(args.seed).permutation(len(x_train))[: args.train_limit]
        x_train, y_train = x_train[keep], y_train[keep]
    print(f"loaded train {x_train.shape} publictest {x_val.shape} in {time.time() - started:.1f}s")

    widths = tuple(int(w) for w in args.widths.split(","))
    model = build_model(widths, args.convs_per_block, args.dropout, args.weight_decay)
    if args.init_weights:
        # A further stage (warm restart): start from an earlier stage's exported model, same architecture.
        model.set_weights(keras.models.load_model(args.init_weights, compile=False).get_weights())
        print(f"initialised from {args.init_weights}", flush=True)
    steps_per_epoch = len(x_train) // args.batch_size
    model.compile(
        # The learning rate is a plain variable that the TimeOrStepSchedule callback sets before each step.
        optimizer=keras.optimizers.AdamW(learning_rate=args.lr / 10, weight_decay=0.0),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing),
        metrics=["accuracy"],
        jit_compile=args.jit,
    )

    # Class weights as per-sample weights: only disgust (1.5% of Training) is up-weighted; inverse-frequency
    # weights for all classes would trade overall accuracy for balanced recall.
    class_weight = np.ones(len(EMOTION_LABELS), dtype=np.float32)
    class_weight[EMOTION_LABELS.index("disgust")] = args.disgust_weight
    augment = make_augment(args.rotation, args.shift, args.zoom, args.erase)
    one_hot = np.eye(len(EMOTION_LABELS), dtype=np.float32)
    train_ds = (
        tf.data.Dataset.from_tensor_slices((x_train[..., None], y_train))
        .shuffle(len(x_train), seed=args.seed, reshuffle_each_iteration=True)
        .batch(args.batch_size, drop_remainder=True)
        .map(
            lambda x, y: (
                *augment(tf.cast(x, tf.float32), tf.gather(one_hot, y)),
                tf.gather(class_weight, y),
            ),
            num_parallel_calls=1,
        )
        .prefetch(2)
    )

    if args.time_steps:
        iterator = iter(train_ds.repeat())
        model.train_on_batch(*next(iterator))  # build + trace outside the timing
        tic = time.time()
        for _ in range(args.time_steps):
            model.train_on_batch(*next(iterator))
        per_step = (time.time() - tic) / args.time_steps
        print(
            f"params {model.count_params():,}  {per_step * 1000:.1f} ms/step  "
            f"epoch ~{per_step * steps_per_epoch:.0f}s ({steps_per_epoch} steps of {args.batch_size})",
            flush=True,
        )
        return 0

    args.work_dir.mkdir(parents=True, exist_ok=True)
    best_path = args.work_dir / "best.weights.h5"
    history_path = args.work_dir / "history.json"

    budget_s = args.time_budget_min * 60.0
    history: list[dict[str, float | None]] = []
    fit_offset = 0.0
    if history_path.exists():  # resumed run: keep the record (and the clock) of the epochs already done
        history = json.loads(history_path.read_text())
        fit_offset = float(history[-1]["fit_s"]) if history else 0.0  # type: ignore[arg-type]
    fit_started = time.time()

    def progress() -> float:
        """Fraction of the schedule done: of the time budget if there is one, else of the epochs."""
        if budget_s > 0:
            return min(1.0, (fit_offset + time.time() - fit_started) / budget_s)
        return min(1.0, int(model.optimizer.iterations) / (steps_per_epoch * args.epochs))

    class TimeOrStepSchedule(keras.callbacks.Callback):
        """Linear warm-up from lr/10 over the first epochs, then cosine decay to 1% of the peak.

        With ``--time-budget-min`` the cosine runs over wall time instead of steps and training stops when
        the budget is spent: on this shared 2-core machine the speed of an epoch varied 4-5x with the load
        of other work, so a fixed epoch count could not promise a finishing time, while a time-driven
        schedule always completes its annealing (and the best epoch is still chosen on PublicTest).
        """

        def on_train_batch_begin(self, batch: int, logs: dict[str, float] | None = None) -> None:
            step = int(self.model.optimizer.iterations)
            warm = min(1.0, 0.1 + 0.9 * step / max(1.0, args.warmup_epochs * steps_per_epoch))
            cosine = 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress()))
            self.model.optimizer.learning_rate.assign(args.lr * warm * cosine)

    class SelectOnPublicTest(keras.callbacks.Callback):
        """Flip-averaged PublicTest accuracy after each epoch of the second half of the schedule (early
        epochs are never the best, and the evaluation costs ~8% of an epoch); keeps the best weights."""

        def __init__(self) -> None:
            super().__init__()
            self.best = max((h["val_tta"] or -1.0 for h in history), default=-1.0)
            self.epoch_started = time.time()

        def on_epoch_begin(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            self.epoch_started = time.time()

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            logs = logs or {}
            done = progress()
            val = None
            if done >= 0.5 or epoch + 1 == args.epochs:
                val = scores(predict_tta(self.model, x_val), y_val)["accuracy"]
            record = {
                "epoch": epoch + 1,
                "loss": float(logs.get("loss", float("nan"))),
                "train_acc": float(logs.get("accuracy", float("nan"))),
                "val_tta": val,
                "lr": float(self.model.optimizer.learning_rate),
                "fit_s": fit_offset + time.time() - fit_started,
                "elapsed_s": fit_offset + time.time() - started,
            }
            history.append(record)
            if val is not None and val > self.best:
                self.best = val
                self.model.save_weights(best_path)
            history_path.write_text(json.dumps(history, indent=1))
            print(f"epoch {epoch + 1}: {json.dumps(record)} best {self.best:.4f}", flush=True)
            epoch_seconds = time.time() - self.epoch_started
            if budget_s > 0 and record["fit_s"] + 0.5 * epoch_seconds > budget_s:
                self.model.stop_training = True  # the next epoch would end well past the budget

    model.fit(
        train_ds,
        epochs=args.epochs,
        verbose=2,
        callbacks=[
            # Resumable: rerunning the same command after a crash continues from the last finished epoch.
            keras.callbacks.BackupAndRestore(str(args.work_dir / "backup")),
            TimeOrStepSchedule(),
            SelectOnPublicTest(),
        ],
    )
    fit_seconds = time.time() - fit_started
    wall_seconds = time.time() - started
    if fit_offset:
        # Resumed: add the time the earlier processes spent (their last record's elapsed time).
        wall_seconds += fit_offset

    model.load_weights(best_path)
    best_epoch = max((h for h in history if h["val_tta"] is not None), key=lambda h: h["val_tta"])["epoch"]

    # Export a float32 copy: the service runs one face at a time, where bf16 casts cost more than they save.
    keras.mixed_precision.set_global_policy("float32")
    export = build_model(widths, args.convs_per_block, args.dropout, args.weight_decay)
    export.set_weights(model.get_weights())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    export.save(args.out)

    results: dict[str, dict[str, object]] = {}
    for split, (x, y) in {"PublicTest": (x_val, y_val)}.items():
        plain = export.predict(x.astype(np.float32)[..., None], batch_size=256, verbose=0)
        results[split] = {"plain": scores(plain, y), "tta": scores(predict_tta(export, x), y)}
    if args.private.is_dir():
        x_private, y_private = fer2013_arrays(args.private)
        plain = export.predict(x_private.astype(np.float32)[..., None], batch_size=256, verbose=0)
        results["PrivateTest (half)"] = {
            "plain": scores(plain, y_private),
            "tta": scores(predict_tta(export, x_private), y_private),
        }
    train_sample = np.random.default_rng(0).choice(len(x_train), min(3000, len(x_train)), replace=False)
    results["Training (3,000 sample, no augmentation)"] = {
        "plain": scores(
            export.predict(x_train[train_sample].astype(np.float32)[..., None], batch_size=256, verbose=0),
            y_train[train_sample],
        ),
        "tta": scores(predict_tta(export, x_train[train_sample]), y_train[train_sample]),
    }
    print(json.dumps(results, indent=1), flush=True)
    (args.work_dir / "results.json").write_text(json.dumps(results, indent=1))

    write_card(
        args,
        command=command,
        params=export.count_params(),
        size_bytes=args.out.stat().st_size,
        history=history,
        best_epoch=best_epoch,
        results=results,
        fit_seconds=fit_seconds,
        wall_seconds=wall_seconds,
        train_counts=np.bincount(y_train, minlength=len(EMOTION_LABELS)),
        val_counts=np.bincount(y_val, minlength=len(EMOTION_LABELS)),
        summary=_summary(export),
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) and {args.card}", flush=True)
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _summary(model: object) -> str:
    buffer = io.StringIO()
    model.summary(print_fn=lambda line, **_: buffer.write(line + "\n"), line_length=100)
    return buffer.getvalue()


def write_card(
    args: argparse.Namespace,
    *,
    command: str,
    params: int,
    size_bytes: int,
    history: list[dict[str, float | None]],
    best_epoch: int,
    results: dict[str, dict[str, object]],
    fit_seconds: float,
    wall_seconds: float,
    train_counts: np.ndarray,
    val_counts: np.ndarray,
    summary: str,
) -> None:
    """The model card. A section on the face crop (margin measured by tools/eval_emotion.py) is kept when
    the card is rewritten, since that measurement is made after training."""
    crop_section = ""
    earlier_stage = ""
    if args.card.exists():
        previous = args.card.read_text()
        # Sections written by tools/eval_emotion.py after training: kept as they are.
        markers = [previous.index(m) for m in EVAL_SECTIONS if m in previous]
        end = min(markers, default=len(previous))
        crop_section = previous[end:].rstrip() + "\n" if markers else ""
        if args.init_weights and "\n## Training" in previous:
            # Keep the record of the stage this one started from (its training and accuracy sections).
            body = previous[previous.index("\n## Training") : end].strip().replace("\n## ", "\n### ")
            earlier_stage = (
                "\n## Earlier stage (this run started from its model)\n\n<details><summary>Its training "
                "and accuracy</summary>\n\n#" + body + "\n</details>\n"
            )

    def row(name: str, entry: dict[str, object]) -> str:
        plain, tta = entry["plain"], entry["tta"]
        recall = " | ".join(f"{tta['recall'][label]:.3f}" for label in EMOTION_LABELS)  # type: ignore[index]
        return f"| {name} | {plain['n']} | {plain['accuracy']:.4f} | {tta['accuracy']:.4f} | {recall} |"  # type: ignore[index]

    init_note = (
        f"; initialised from `{args.init_weights}`, the model of the earlier stage recorded below (warm "
        "restart: a new warm-up and cosine cycle)"
        if args.init_weights
        else ""
    )
    header = " | ".join(EMOTION_LABELS)
    curve = "\n".join(
        f"| {h['epoch']} | {h['loss']:.4f} | {h['train_acc']:.4f} | "
        + ("-" if h["val_tta"] is None else f"{h['val_tta']:.4f}")
        + f" | {h['lr']:.2e} | {h['elapsed_s'] / 60:.1f} |"
        for h in history
    )
    schedule = (
        f"cosine decay over a wall-time budget of {args.time_budget_min:g} min of training (stop when spent)"
        if args.time_budget_min > 0
        else f"cosine decay over {args.epochs} epochs"
    )
    counts = ", ".join(f"{label} {n}" for label, n in zip(EMOTION_LABELS, train_counts, strict=True))
    val_counts_text = ", ".join(f"{label} {n}" for label, n in zip(EMOTION_LABELS, val_counts, strict=True))
    card = f"""# Emotion model card: `emotion_model.keras`

Our own facial-expression classifier, trained from scratch by `tools/train_emotion.py`. Every figure below
was written by that script (training and split accuracies) or by `tools/eval_emotion.py` (the crop section).

## Use

* Input: a batch of 48x48x1 grey images, float32 in 0..255 (the model normalises internally), cropped
  like FER2013 (see "Face crop for photos"; the service's `crop_face_for_emotion` does this).
* Output: softmax probabilities, order `{", ".join(EMOTION_LABELS)}`.
* Test-time augmentation: the service averages the probabilities of the face and its mirror image
  (`api.services.emotion.KerasEmotionClassifier`); the "TTA" columns below are that figure.

## Data

* FER2013 Training split (from `fer2013_train_publictest.zip`; the 433 images identical to PrivateTest
  images were removed upstream): {int(train_counts.sum())} images: {counts}.
* Epoch selection: FER2013 PublicTest, {int(val_counts.sum())} images: {val_counts_text}.
* Report only: the half of FER2013 PrivateTest in `../shared/facedata/emotion/fer2013_privatetest`
  (never used for any choice).
* FER2013 is a research data set; the images are not in this repository.

## Architecture

VGG-style CNN: {len(args.widths.split(","))} blocks of {args.convs_per_block} x (3x3 conv, batch norm, ReLU)
with widths {args.widths}, 2x2 max-pool and spatial dropout (0.05, 0.10, 0.15) between blocks, global average + max
pooling, dropout {args.dropout}, dense 256 + BN + ReLU, dropout {args.dropout}, dense 7, softmax.
{params:,} parameters, {size_bytes / 1e6:.2f} MB on disk (float32).

<details><summary>Keras summary</summary>

```
{summary.rstrip()}
```
</details>

## Training

* Command: `{command}` (from the repository root, with `../shared` present){init_note}
* Epochs run: {len(history)} (at most {args.epochs}), batch {args.batch_size}; best PublicTest epoch
  (flip-averaged, evaluated over the second half of the schedule): **{best_epoch}**.
* Optimiser: AdamW, peak learning rate {args.lr}, linear warm-up over {args.warmup_epochs} epochs from
  {args.lr / 10:g}, then {schedule}, down to 1% of the peak; L2 {args.weight_decay} on kernels.
* Loss: categorical cross-entropy, label smoothing {args.label_smoothing}; sample weight {args.disgust_weight}
  for `disgust` (1.5% of the data), 1 for the others.
* Augmentation (in the tf.data graph, per image): rotation +/-{args.rotation} deg, zoom +/-{args.zoom:.0%},
  shift +/-{args.shift:.0%} of the side, horizontal flip (p=0.5), reflect padding, contrast x0.75-1.25,
  brightness +/-25 grey levels, random grey square 8-16 px (p={args.erase}).
* Compute: {args.precision} (convolutions in bfloat16 on the CPU's AMX/AVX-512 units, float32 master
  weights), exported as float32. Seed {args.seed}.
* Wall time on this machine ({_cpu_name()}, {os.cpu_count()} cores,
  `nice -n 10`, shared with other work): **{wall_seconds / 60:.1f} min** in all, of which
  {fit_seconds / 60:.1f} min in `fit` (this process; earlier processes of a resumed run are in the total).

## Accuracy

"plain" = one pass; "TTA" = mean of the image and its mirror (what the service returns). Recall per class
with TTA.

| split | n | plain | TTA | {header} |
|---|---|---|---|{"---|" * len(EMOTION_LABELS)}
{chr(10).join(row(name, entry) for name, entry in results.items())}

The baselines on the same data, and full photos through the detector, are in "Comparison with the
baselines" below (written by `python -m tools.eval_emotion --update-card`).

<details><summary>Per-epoch record</summary>

| epoch | train loss | train acc (augmented) | PublicTest TTA | last lr | elapsed min |
|---|---|---|---|---|---|
{curve}
</details>
{earlier_stage}{crop_section}"""
    args.card.parent.mkdir(parents=True, exist_ok=True)
    args.card.write_text(card)


if __name__ == "__main__":
    raise SystemExit(main())
