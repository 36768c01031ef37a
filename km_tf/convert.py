"""`modulate()` turns a base network into a KM model; `bake()` turns it back.

    base ──modulate──> KM model ──fit / load_task──> KM model ──bake──> plain

`modulate` copies a functional or sequential Keras model and swaps every
`Conv2D` and `DepthwiseConv2D` for its kernel-modulated twin with the base
weights copied in; `bake` writes the modulated kernels into ordinary layers so
that the result runs (and converts to TFLite) without any KM code.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras

from km_tf.errors import UnsupportedLayerError
from km_tf.layers import (DEFAULT_FILTER_UNITS, DEFAULT_FORM,
                          DEFAULT_HIDDEN_UNITS, KM_LAYERS,
                          KernelModulatedConv2D, KernelModulatedDepthwiseConv2D,
                          check_modulator_options)
from km_tf.walk import (BATCHNORM_TYPES, ROLE_HEAD, is_container,
                        is_convolution, layer_role, walk_layers)

BATCHNORM_MODES = ("train", "freeze")

# Plain layer class -> its kernel-modulated twin, and back.
_MODULATED_TWIN = {
    keras.layers.Conv2D: KernelModulatedConv2D,
    keras.layers.DepthwiseConv2D: KernelModulatedDepthwiseConv2D,
}
_KM_CONFIG_KEYS = ("hidden_units", "form", "filter_units")


def is_rewritten(layer: keras.layers.Layer) -> bool:
    """Whether `modulate` rewrites `layer` (unless skipped): a `Conv2D` or
    `DepthwiseConv2D` exactly, not a subclass."""
    return type(layer) in _MODULATED_TWIN


def modulate(
    model: keras.Model,
    *,
    hidden_units: int = DEFAULT_HIDDEN_UNITS,
    form: str = DEFAULT_FORM,
    filter_units: int = DEFAULT_FILTER_UNITS,
    batchnorm: str = "train",
    head: Sequence[str] | None = None,
    skip: Sequence[str] = (),
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> keras.Model:
    """Returns a kernel-modulated copy of `model`, ready to train one task.

    Every `Conv2D` and `DepthwiseConv2D` becomes a `KernelModulatedConv2D` /
    `KernelModulatedDepthwiseConv2D` holding the base weights frozen, with a
    fresh identity modulator: the copy computes exactly what `model` does
    until it trains. `model` itself is not changed.

    Args:
        model: A functional or sequential Keras model (nested functional and
            sequential models, e.g. a `keras.applications` base inside a
            `Sequential`, are entered).
        hidden_units: Hidden width of the modulators over spatial kernels
            (the size knob).
        form: Which kernel units the modulators work on: `"hybrid"`
            (default), `"spatial"` or `"filter"`; see
            `km_tf.layers.modulator_plan`.
        filter_units: Hidden width of the modulators over whole filters
            (pointwise kernels in the hybrid form, every Conv2D in the filter
            form).
        batchnorm: `"train"`: BatchNorm gamma, beta and moving statistics
            train per task and are saved in the task file; `"freeze"`: they
            keep the base's values and BatchNorm runs in inference mode.
            Which suits a task depends on its training images per class:
            `km_tf.recipes.km_recipe` (km-train's `--batchnorm=auto`).
        head: Names of the layers that train per task besides the
            modulators (the task's head). `None` means every layer with
            weights that is neither a convolution nor a BatchNorm layer.
        skip: Names of convolution layers to leave unmodulated and frozen.
        overrides: Other modulator settings for some convolutions: `{layer
            name: {"hidden_units"/"form"/"filter_units": value}}`, e.g.
            `{"block4_conv": {"form": "filter", "filter_units": 8}}` (what
            the few-shot learner gives the last convolution,
            `km_tf.meta.km_maml(last_filter_units=8)`). Task files record
            them.

    Returns:
        A new `keras.Model` with only the per-task variables trainable.

    Raises:
        UnsupportedLayerError: `model` is subclassed, is already modulated, or
            holds a convolution KM cannot rewrite (e.g. `SeparableConv2D`,
            `Conv1D`) that is not listed in `skip`.
        ValueError: A bad option, or a name in `head`/`skip` that is not a
            layer of `model`.

    Example:
    >>> base = keras.applications.MobileNetV2(
    ...     (96, 96, 3), alpha=0.35, weights=None, classes=5)
    >>> km = modulate(base, hidden_units=16)
    >>> km.compile("adam", "sparse_categorical_crossentropy")
    """
    check_modulator_options(hidden_units, form, filter_units)
    if batchnorm not in BATCHNORM_MODES:
        hint = (" 'auto' depends on the task's training data, which modulate "
                "does not see: pass km_tf.recipes.km_recipe(images_per_class)"
                ".batchnorm." if batchnorm == "auto" else "")
        raise ValueError(
            f"`batchnorm` must be one of {BATCHNORM_MODES}; got "
            f"{batchnorm!r}.{hint}")
    skip, head = set(skip), None if head is None else set(head)
    _check_modulatable(model, skip, head or set())
    defaults = {"hidden_units": hidden_units, "form": form,
                "filter_units": filter_units}
    overrides = _checked_overrides(model, overrides or {}, skip, defaults)

    def clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        twin = _MODULATED_TWIN.get(type(layer))
        if twin is None or layer.name in skip:
            return _copy_layer(layer)
        return twin.from_config({**layer.get_config(), **defaults,
                                 **overrides.get(layer.name, {})})

    modulated = clone_layers(model, clone_layer)
    copy_base_weights(model, modulated)
    set_task_trainability(modulated, batchnorm=batchnorm, head=head)
    return modulated


def bake(model: keras.Model) -> keras.Model:
    """Returns a plain Keras copy of a KM model with its kernels baked in.

    Each KM convolution becomes the ordinary `Conv2D` / `DepthwiseConv2D` it
    came from, holding the modulated kernel. The result needs no km_tf code to
    run, save, or convert to TFLite, and its outputs equal the KM model's to
    float tolerance.

    Args:
        model: A model returned by `modulate` (trained or not).

    Returns:
        A new `keras.Model` with the same structure and layer names.
    """

    def clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
        if not isinstance(layer, KM_LAYERS):
            return _copy_layer(layer)
        config = layer.get_config()
        for key in _KM_CONFIG_KEYS:
            config.pop(key)
        return layer.plain_class.from_config(config)

    baked = clone_layers(model, clone_layer)
    for (_, source), (_, target) in zip(walk_layers(model),
                                        walk_layers(baked)):
        if isinstance(source, KM_LAYERS):
            target.kernel.assign(source.modulated_kernel())
            if source.use_bias:
                target.bias.assign(source.bias)
        else:
            target.set_weights(source.get_weights())
    return baked


def copy_base_weights(source: keras.Model, target: keras.Model) -> None:
    """Copies every layer's weights into a layer-for-layer clone.

    Between a KM convolution and a plain one (either way round) the base
    kernel and bias go across: the plain layer's `kernel` is the KM layer's
    `base_kernel`, never the modulated kernel. Other layers copy all their
    weights.
    """
    for (_, origin), (_, copy) in zip(walk_layers(source),
                                      walk_layers(target), strict=True):
        if isinstance(origin, KM_LAYERS) or isinstance(copy, KM_LAYERS):
            kernel = (origin.base_kernel if isinstance(origin, KM_LAYERS)
                      else origin.kernel)
            (copy.base_kernel if isinstance(copy, KM_LAYERS)
             else copy.kernel).assign(kernel)
            if copy.use_bias:
                copy.bias.assign(origin.bias)
        else:
            copy.set_weights(origin.get_weights())


def _copy_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
    return layer.__class__.from_config(layer.get_config())


def clone_layers(model: keras.Model,
                 clone_layer: Callable[[keras.layers.Layer],
                                       keras.layers.Layer]) -> keras.Model:
    """A built copy of a (possibly nested) functional or sequential model.

    Args:
        model: The model to copy; its weights are not copied.
        clone_layer: Makes each leaf layer's replacement (nested models are
            entered).

    Returns:
        The new model, built, with fresh weights.
    """
    clone = keras.models.clone_model(
        model, clone_function=clone_layer, recursive=True
    )
    if not clone.built:
        clone.build(model.inputs[0].shape if model.inputs else None)
    return clone


def _checked_overrides(model: keras.Model,
                       overrides: Mapping[str, Mapping[str, Any]],
                       skip: set[str], defaults: dict[str, Any]
                       ) -> dict[str, dict[str, Any]]:
    """`modulate`'s `overrides`, checked and completed from `defaults`."""
    modulated = {layer.name for _, layer in walk_layers(model)
                 if is_rewritten(layer) and layer.name not in skip}
    checked = {}
    for name, settings in overrides.items():
        if name not in modulated:
            raise ValueError(
                f"`overrides` names {name!r}, which is not a convolution "
                f"modulate() rewrites in {model.name!r} (skipped, another "
                "kind of layer, or no layer of that name): name a Conv2D or "
                "DepthwiseConv2D layer.")
        unknown = set(settings) - set(_KM_CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"`overrides[{name!r}]` sets {sorted(unknown)}; a layer's "
                f"modulator takes only {list(_KM_CONFIG_KEYS)}.")
        completed = {**defaults, **settings}
        check_modulator_options(completed["hidden_units"], completed["form"],
                                completed["filter_units"])
        if completed != defaults:
            checked[name] = completed
    return checked


def _check_modulatable(model: keras.Model, skip: set[str],
                       head: set[str]) -> None:
    if not is_container(model):
        raise UnsupportedLayerError(
            f"modulate() needs a functional or sequential model; "
            f"{type(model).__name__} is a subclassed model. Build the network "
            "with the functional API (or wrap its layers in keras.Sequential)."
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built: give it an Input or call "
            "`model.build(input_shape)` before modulate()."
        )
    names = set()
    for path, layer in walk_layers(model):
        names.add(layer.name)
        if isinstance(layer, KM_LAYERS):
            raise UnsupportedLayerError(
                f"Layer {path!r} is already kernel-modulated: modulate() takes "
                "the plain base model. Use bake() first to get one back."
            )
        if layer.name in skip:
            continue
        if is_convolution(layer) and not is_rewritten(layer):
            raise UnsupportedLayerError(
                f"Layer {path!r} is a {type(layer).__name__}, which Kernel "
                "Modulation does not rewrite (it supports Conv2D and "
                "DepthwiseConv2D). Pass skip=["
                f"{layer.name!r}] to keep it frozen, or rebuild it from "
                "supported layers (a SeparableConv2D is a DepthwiseConv2D "
                "followed by a 1x1 Conv2D)."
            )
        hidden = [sub for sub in layer._flatten_layers(include_self=False)
                  if is_convolution(sub)]
        if hidden:
            raise UnsupportedLayerError(
                f"Layer {path!r} ({type(layer).__name__}) holds convolution "
                f"{hidden[0].name!r} inside a custom layer, where modulate() "
                "cannot reach it. Build that block with the functional API, "
                f"or pass skip=[{layer.name!r}] to keep it frozen."
            )
    unknown = sorted((skip | head) - names)
    if unknown:
        raise ValueError(
            f"Layers {unknown} named in `skip`/`head` are not in model "
            f"{model.name!r}. Check the names with `model.summary()`."
        )


def set_task_trainability(model: keras.Model, *, batchnorm: str,
                          head: set[str] | None) -> None:
    """Makes exactly the per-task variables trainable (as `modulate` does).

    Layer flags are set one by one (never `model.trainable = True`, which
    would re-enable every variable); KM layers keep their base frozen
    themselves. Benchmarks use it for the non-KM methods too (head only,
    BatchNorm + head).

    Args:
        model: A (KM or plain) model, changed in place.
        batchnorm: `"train"` or `"freeze"` (see `modulate`).
        head: Names of the head layers; `None`: every layer with weights
            that is neither a convolution nor BatchNorm.
    """
    for _, layer in walk_layers(model):
        if isinstance(layer, KM_LAYERS):
            layer.trainable = True
        elif isinstance(layer, BATCHNORM_TYPES):
            layer.trainable = batchnorm == "train"
        elif head is None:
            layer.trainable = _is_default_head(layer)
        else:
            layer.trainable = layer.name in head


def _is_default_head(layer: keras.layers.Layer) -> bool:
    """Whether `modulate(head=None)` trains `layer` as part of the head:
    every layer with weights that is neither a convolution nor BatchNorm."""
    return (bool(layer.weights) and not is_convolution(layer)
            and not isinstance(layer, BATCHNORM_TYPES))


def modulation_options(model: keras.Model) -> dict[str, Any]:
    """The `modulate()` keyword arguments that rebuild `model`'s layout.

    Derived from the model itself (modulator sizes, which layers train), so
    task files can record how their model was made. `head` is `None` when
    the default rule picks the model's head (every layer with weights that
    is neither a convolution nor BatchNorm), so the options carry no
    auto-generated layer names; `skip` lists unmodulated convolutions.
    `hidden_units`, `form` and `filter_units` are the settings most KM
    layers have (the first of them on a tie), and `overrides` (`None` if
    empty) the layers whose settings differ.

    Raises:
        ValueError: `model` has no KM layer.
    """
    km_layers = [layer for _, layer in walk_layers(model)
                 if isinstance(layer, KM_LAYERS)]
    if not km_layers:
        raise ValueError(
            f"Model {model.name!r} has no kernel-modulated layer: call "
            "km_tf.modulate(base) first."
        )
    settings = {layer.name: (layer.hidden_units, layer.form,
                             layer.filter_units) for layer in km_layers}
    (hidden_units, form, filter_units), _ = Counter(
        settings.values()).most_common(1)[0]
    overrides = {name: dict(zip(_KM_CONFIG_KEYS, own))
                 for name, own in settings.items()
                 if own != (hidden_units, form, filter_units)}
    batchnorms = [layer for _, layer in walk_layers(model)
                  if isinstance(layer, BATCHNORM_TYPES)]
    plain_convs = [layer.name for _, layer in walk_layers(model)
                   if is_convolution(layer) and not isinstance(layer, KM_LAYERS)]
    head = [layer.name for _, layer in walk_layers(model)
            if layer_role(layer) == ROLE_HEAD]
    default_head = [layer.name for _, layer in walk_layers(model)
                    if _is_default_head(layer)]
    return {
        "hidden_units": hidden_units,
        "form": form,
        "filter_units": filter_units,
        "batchnorm": "train" if any(b.trainable for b in batchnorms)
        else "freeze",
        "head": None if head == default_head else head,
        "skip": plain_convs,
        "overrides": overrides or None,
    }
