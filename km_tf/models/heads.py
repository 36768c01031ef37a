"""Classifier heads: top a trunk with one, or swap it for a task's own."""

from typing import Any

import keras
from keras import layers

HEAD_NAME = "head"


def add_head(
    trunk: keras.Model,
    num_classes: int,
    *,
    dropout: float = 0.2,
    classifier_activation: str | None = None,
    name: str | None = None,
) -> keras.Model:
    """Tops a convolutional trunk with pooling, dropout and a Dense head.

    The result is one flat functional model (the trunk's layers plus
    `avg_pool`, `head_dropout` and the Dense layer named `"head"`), which
    `km_tf.modulate`, `keras.models.clone_model` and the TFLite converter
    all handle directly.

    Args:
        trunk: Functional model with a 4-D feature-map output.
        num_classes: Output units of the head.
        dropout: Dropout rate before the head; 0 leaves the layer out.
        classifier_activation: Head activation; `None` gives logits (train
            with `from_logits=True`).
        name: Model name; defaults to the trunk's name.

    Returns:
        The classifier `keras.Model`.

    Example:
    >>> add_head(km_tf.models.build_base("mobilenet_v2"), 10)
    """
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1; got {num_classes}.")
    x = layers.GlobalAveragePooling2D(name="avg_pool")(trunk.output)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(
        num_classes, activation=classifier_activation, name=HEAD_NAME
    )(x)
    return keras.Model(trunk.inputs, outputs, name=name or trunk.name)


def replace_head(
    model: keras.Model,
    num_classes: int,
    *,
    head_layer: str | None = None,
    classifier_activation: str | None = None,
) -> keras.Model:
    """Copies a classifier and gives the copy a fresh head.

    The input model is left untouched: its layers are cloned with their
    weights (BatchNorm momentum included), then the layer `head_layer` is
    replaced by a new Dense layer of the same name with `num_classes` units.

    Args:
        model: A functional classifier, e.g. from `build_model` or
            `keras.saving.load_model`.
        num_classes: Classes of the new task.
        head_layer: Name of the Dense layer to replace; `None`: the model's
            last layer, which must be a Dense layer (whatever its name).
        classifier_activation: Activation of the new head (`None`: logits).

    Returns:
        A new functional `keras.Model`.

    Example:
    >>> task = replace_head(keras.saving.load_model("base.keras"), 5)
    """
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    last = [layer.name for layer in copy.layers[-3:]]
    if head_layer is None:
        old_head = copy.layers[-1]
        if not isinstance(old_head, layers.Dense):
            raise ValueError(
                f"The last layer of model {model.name!r} is "
                f"{type(old_head).__name__} {old_head.name!r}, not a Dense "
                f"head (its last layers are {last}). Pass `head_layer=` the "
                "name of its classifier's Dense layer.")
    else:
        try:
            old_head = copy.get_layer(head_layer)
        except ValueError:
            raise ValueError(
                f"Model {model.name!r} has no layer named {head_layer!r} to "
                f"replace; its last layers are {last}. Pass `head_layer=` "
                "the name of its final Dense layer."
            ) from None
    outputs = layers.Dense(
        num_classes, activation=classifier_activation, name=old_head.name
    )(old_head.input)
    return keras.Model(copy.inputs, outputs, name=f"{model.name}_task")


def build_task_model(
    base: keras.Model,
    num_classes: int,
    *,
    head_layer: str | None = None,
    classifier_activation: str | None = None,
    **modulate_options: Any,
) -> keras.Model:
    """Builds a Kernel Modulation task model from a pretrained classifier.

    Replaces the head of `base` with a fresh one for `num_classes` (see
    `replace_head`), then calls `km_tf.modulate`, which freezes the base
    and swaps every conv for a kernel-modulated one.

    Args:
        base: Pretrained classifier (e.g. `build_model(...)` after training,
            or `keras.saving.load_model(path)`).
        num_classes: Classes of the task.
        head_layer: Name of the Dense head in `base`; `None`: its last
            layer (see `replace_head`).
        classifier_activation: Activation of the new head (`None`: logits).
        **modulate_options: Passed to `km_tf.modulate` (`hidden_units`,
            `form`, `batchnorm`, `head`, `skip`).

    Returns:
        The modulated task model; only the modulators and the head train.

    Example:
    >>> base = keras.saving.load_model("runs/digits04/base.keras")
    >>> task = build_task_model(base, 5, hidden_units=32)
    """
    from km_tf.convert import modulate  # the core API imports this package

    task = replace_head(
        base,
        num_classes,
        head_layer=head_layer,
        classifier_activation=classifier_activation,
    )
    return modulate(task, **modulate_options)
