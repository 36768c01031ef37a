"""MAML-style meta-learners: KM-MAML, ANIL, MAML, and a fine-tuning baseline.

What trains where, and why
--------------------------
Meta-learning has two loops. The *inner loop* adapts a network to one
few-shot task: a few plain gradient steps (`inner_learning_rate`) on the
episode's support set. The *outer loop* meta-trains the network's initial
weights so that this adaptation works: its loss is the query-set loss of
the adapted network, averaged over a meta-batch of episodes, and its
optimizer (a Keras optimizer) updates the initial weights.

    method      inner loop adapts          outer loop meta-trains
    km_maml     modulators (+ head, + BN   base kernels and biases, BN
                gamma/beta, if asked)      gamma/beta, modulators, head
    anil        head                       everything trainable
    maml        everything trainable       everything trainable
    finetune    head (or everything)       nothing (a pretrained base)

`km_maml` is Kernel Modulation's use in meta-learning (Hu & Liu, ICPR
2022): the model is `km_tf.modulate(base)`; a new task adapts only the
modulators, so it is an ordinary task file (`km_tf.meta.export.
save_adapted_task`) next to the meta-trained base. By default the head is
meta-trained and shared (body-only adaptation) and the last convolution's
modulator works on whole filters and steps ten times faster than the
others: the configuration that measured best (BUILD.md, "Few-shot
meta-learning"; `km_maml` lists the alternatives). KM
layers keep their base kernel out of `trainable_variables`
(`KernelModulatedConv2D._freeze_base`), so the outer loop lists those
kernels (and biases) itself and differentiates the query loss with respect
to them like any other weight.

The network runs as a function of its weights (`km_tf.meta.forward.
run_model`, Keras' `stateless_call` with differentiable KM kernels), so
inner-loop weights are tensors: `adapted = initial - rate * gradient`.
Second-order meta-gradients (MAML proper) differentiate through those
updates with nested `tf.GradientTape`s. First-order ones (FOMAML) stop the
gradient at the inner-loop gradients, so the outer gradient is the gradient
of the query loss at the adapted weights, applied to the initial weights.

BatchNorm uses batch statistics in every forward pass (`training=True`), as
MAML does (Finn et al., 2017): its moving statistics take no part in the
meta-gradient. (The batch moments are computed so that their second
derivatives are exact, which TensorFlow's `tf.nn.moments` are not; see
`km_tf.meta.forward`.) They are still updated, outside the gradient, by every
forward pass of the outer step (support and query, like Keras `fit` would),
so that an exported task can run in inference mode. `MetaOptions.
batch_statistics=False` runs every pass in inference mode instead (the
fine-tuning baseline's default).

A query set can be scored with three kinds of BatchNorm statistics
(`STATISTICS`, `MetaLearner.evaluate`): its own batch statistics
("query": transductive, as MAML papers report; a device classifying one
image at a time has no such batch), the moving statistics of meta-training
("moving"), or statistics re-estimated on the task's support set after
adapting ("support", `MetaLearner.support_statistics`). Adapting used the
support set's batch statistics, so "support" is what the adapted weights
were fitted to; an exported task keeps them in its file
(`save_adapted_task(..., statistics=...)`).

All state lives in Keras variables (the model's) and the outer optimizer,
so a `tf.train.Checkpoint(model=learner.model, optimizer=learner.optimizer)`
holds a run. `MetaLearner.meta_train_step(episodes)` is a plain function of
one batch of episodes: wrap it in `tf.function` and, under a strategy, in
`strategy.run` (gradients are scaled for Keras' cross-replica sum, moving
statistics averaged over the replicas; build the learner inside
`strategy.scope()`).

Example:
>>> learner = km_maml(base, ways=5, options=MetaOptions(inner_steps=5))
>>> step = tf.function(learner.meta_train_step)
>>> for episodes in sampler.dataset(meta_batch_size=4).take(1000):
...     step(episodes)
>>> accuracies = learner.evaluate(test_sampler.episodes(600))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import keras
import numpy as np
import tensorflow as tf

from km_tf.convert import is_rewritten, modulate
from km_tf.layers import (DEFAULT_FILTER_UNITS, DEFAULT_FORM,
                          DEFAULT_HIDDEN_UNITS, KM_LAYERS)
from km_tf.meta.episodes import Episode
from km_tf.meta.forward import run_model
from km_tf.models.heads import replace_head
from km_tf.tasks import task_variables
from km_tf.walk import (BATCHNORM_TYPES, ROLE_BATCHNORM, ROLE_HEAD,
                         ROLE_MODULATED, layer_role, walk_layers)

METHODS = ("km_maml", "anil", "maml", "finetune")
# The BatchNorm statistics a query set can be scored with (`evaluate`).
STATISTICS = ("query", "moving", "support")
# km_maml's default inner step sizes, as multiples of `inner_learning_rate`
# (measured in BUILD.md, "Few-shot meta-learning"): the modulators' when
# the head adapts too, the modulators' when they adapt alone, and a
# filter-form last modulator's.
MODULATOR_RATE_FACTOR = 0.1
BODY_ONLY_MODULATOR_RATE_FACTOR = 1.0
LAST_FILTER_RATE_FACTOR = 10.0
# Hidden units of km_maml's filter-form last modulator (`last_filter_units`).
DEFAULT_LAST_FILTER_UNITS = 8

Values = list[tf.Tensor]
State = dict[int, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class MetaOptions:
    """How a learner adapts to a task.

    Attributes:
        inner_steps: Gradient steps on the support set per task, in
            meta-training (0 adapts nothing).
        inner_learning_rate: Step size of those (plain SGD) steps.
        first_order: Stop the meta-gradient at the inner-loop gradients
            (FOMAML) instead of differentiating through them.
        eval_inner_steps: Inner steps when evaluating; `None`: as many as
            `inner_steps` (MAML used 5 to train and 10 to test).
        batch_statistics: Run every forward pass in training mode
            (BatchNorm batch statistics, dropout on), as MAML does; `False`:
            inference mode (moving statistics, no dropout).
        modulator_learning_rate: Inner step size of KM modulator weights;
            `None`: `km_maml` picks it for its configuration (see there;
            a learner built by hand: `MODULATOR_RATE_FACTOR` (0.1) times
            `inner_learning_rate`).
        last_modulator_learning_rate: Inner step size of the last
            modulated convolution's modulator; `None`: `km_maml` picks it
            (a learner built by hand: as the other modulators').
        learn_inner_rates: Meta-learn the inner step sizes: one per inner
            variable (per layer weight, as MAML++'s per-layer rates,
            Antoniou et al., 2019, without their per-step ones, so any
            number of evaluation steps can use them), starting at the fixed
            rates above. They are outer variables (`MetaLearner.
            inner_rates`), trained by the outer optimizer through the
            second-order meta-gradient; a first-order learner refuses them
            (its meta-gradient does not reach them).
        zero_head: Start every task's head at zero instead of at a
            meta-trained value (the "zeroing trick" of Kao et al., 2022). A
            task's labels are an arbitrary order of its classes, so one
            initial head cannot suit them all; from zeros, the first inner
            step makes each class's weights a centred sum of its support
            features. The head is then not meta-trained, and the
            learner sets its variables to zero (so a saved initial task or
            meta-trained base shows what every task starts from).
    """

    inner_steps: int = 5
    inner_learning_rate: float = 0.01
    first_order: bool = False
    eval_inner_steps: int | None = None
    batch_statistics: bool = True
    modulator_learning_rate: float | None = None
    last_modulator_learning_rate: float | None = None
    learn_inner_rates: bool = False
    zero_head: bool = False

    def __post_init__(self) -> None:
        for name in ("inner_steps", "eval_inner_steps"):
            value = getattr(self, name)
            if value is None and name == "eval_inner_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or (
                    value < 0):
                raise ValueError(
                    f"`{name}` must be an integer >= 0; got {value!r}.")
        for name in ("inner_learning_rate", "modulator_learning_rate",
                     "last_modulator_learning_rate"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"`{name}` must be positive; got "
                                 f"{value!r}.")
        if self.learn_inner_rates and self.first_order:
            raise ValueError(
                "`learn_inner_rates` needs second-order meta-gradients (the "
                "first-order ones stop at the inner steps, so the rates "
                "would get none): set first_order=False, or keep the rates "
                "fixed.")

    def inner_rate(self, role: str, *, last: bool = False) -> float:
        """Inner step size of a variable of this `km_tf.walk` role (`last`:
        of the last modulated convolution)."""
        if role != ROLE_MODULATED:
            return self.inner_learning_rate
        if last and self.last_modulator_learning_rate is not None:
            return self.last_modulator_learning_rate
        if self.modulator_learning_rate is None:
            return MODULATOR_RATE_FACTOR * self.inner_learning_rate
        return self.modulator_learning_rate

    @property
    def evaluation_steps(self) -> int:
        """Inner steps when evaluating."""
        return (self.inner_steps if self.eval_inner_steps is None
                else self.eval_inner_steps)


@dataclasses.dataclass
class MetaGradients:
    """What one meta-batch gives the outer loop.

    Attributes:
        loss: Query loss of the adapted networks, mean over the episodes.
        accuracy: Their query accuracy, mean over the episodes.
        gradients: Gradient of `loss` for each of the learner's
            `outer_variables` (zeros where it has none).
        state: `{id(variable): value}` of the variables the forward passes
            updated (BatchNorm moving statistics, seed states).
    """

    loss: tf.Tensor
    accuracy: tf.Tensor
    gradients: list[tf.Tensor]
    state: State


class MetaLearner:
    """Adapts a network to few-shot tasks and meta-trains its initial weights.

    Build one with `km_maml`, `anil`, `maml` or `finetune`; the class
    itself takes any split of a model's variables into the ones the inner
    loop adapts and the ones the outer loop meta-trains.

    Args:
        model: A built functional or sequential Keras model giving logits.
        inner_variables: Variables each task adapts (non-empty).
        outer_variables: Variables meta-training updates (may be empty: a
            learner that only adapts). They may be non-trainable in Keras'
            sense (KM base kernels).
        options: Inner-loop options.
        optimizer: The outer optimizer and its learning rate (e.g.
            `km_tf.training.make_optimizer(options, total_steps)`); `None`:
            Adam at 1e-3. It is built on `outer_variables` here (create the
            learner inside a strategy's scope to distribute it).

    Attributes:
        parameters: The variables the learner differentiates (inner and
            outer ones, in the model's order, then `inner_rates`); a list
            of *values* always follows this order.
        moving_statistics: Every BatchNorm layer's moving mean and
            variance (what `support_statistics` re-estimates, and what a
            task with its own statistics stores).
        inner_rates: With `options.learn_inner_rates`, the meta-learned
            inner step sizes: a float32 vector variable, one per inner
            variable (in `inner_variables`' order), also the last outer
            variable; `None` with fixed rates.
    """

    def __init__(self, model: keras.Model, *,
                 inner_variables: Sequence[keras.Variable],
                 outer_variables: Sequence[keras.Variable],
                 options: MetaOptions = MetaOptions(),
                 optimizer: keras.optimizers.Optimizer | None = None
                 ) -> None:
        known = {id(v) for v in model.variables}
        for name, variables in (("inner_variables", inner_variables),
                                ("outer_variables", outer_variables)):
            strangers = [v.path for v in variables if id(v) not in known]
            if strangers:
                raise ValueError(
                    f"`{name}` holds variables that are not {model.name!r}'s"
                    f" ({', '.join(strangers[:3])}): pass variables of the "
                    "learner's model.")
        if not inner_variables:
            raise ValueError("`inner_variables` is empty: the inner loop "
                             "must adapt something (e.g. the head).")
        self.model = model
        self.options = options
        inner_ids = {id(v) for v in inner_variables}
        outer_ids = {id(v) for v in outer_variables}
        head_ids = {id(v) for v in head_variables(model)}
        if options.zero_head:
            if not head_ids or not head_ids <= inner_ids:
                raise ValueError(
                    "`zero_head` starts every task's head at zero, so the "
                    "inner loop must adapt the whole head: pass its "
                    "weights in `inner_variables`, or set zero_head=False.")
            outer_ids -= head_ids
        self.parameters = [v for v in model.variables
                           if id(v) in inner_ids | outer_ids]
        self.inner_variables = [v for v in self.parameters
                                if id(v) in inner_ids]
        self.outer_variables = [v for v in self.parameters
                                if id(v) in outer_ids]
        self._inner = [i for i, v in enumerate(self.parameters)
                       if id(v) in inner_ids]
        self._zeroed = [i for i, v in enumerate(self.parameters)
                        if options.zero_head and id(v) in head_ids]
        for i in self._zeroed:
            self.parameters[i].assign(
                keras.ops.zeros_like(self.parameters[i]))
        roles = {id(item.variable): item.role
                 for item in task_variables(model)}
        modulated = [layer for _, layer in walk_layers(model)
                     if isinstance(layer, KM_LAYERS)]
        last = {id(v) for v in (modulated[-1].modulator.weights
                                if modulated else ())}
        self._inner_rates = [options.inner_rate(roles.get(id(v), ""),
                                                last=id(v) in last)
                             for v in self.inner_variables]
        self.inner_rates = None
        if options.learn_inner_rates:
            self.inner_rates = keras.Variable(
                np.asarray(self._inner_rates, np.float32), dtype="float32",
                name="inner_rates")
            self.parameters.append(self.inner_rates)
            self.outer_variables.append(self.inner_rates)
            outer_ids.add(id(self.inner_rates))
        self._outer = [i for i, v in enumerate(self.parameters)
                       if id(v) in outer_ids]
        self.optimizer = optimizer or keras.optimizers.Adam(1e-3)
        if self.outer_variables:
            self.optimizer.build(self.outer_variables)
        # Straight-line code (loops over static step counts): autograph
        # would only slow the tracing down.
        self._score = tf.function(self._score_episode, reduce_retracing=True,
                                  autograph=False)
        self.moving_statistics = [
            weight for _, layer in walk_layers(model)
            if isinstance(layer, BATCHNORM_TYPES)
            for weight in (layer.moving_mean, layer.moving_variance)]

    # -- Pure functions of weight values --------------------------------

    @property
    def network_outer_variables(self) -> list[keras.Variable]:
        """The network's meta-trained weights: `outer_variables` without
        the learned inner rates."""
        return [v for v in self.outer_variables if v is not self.inner_rates]

    def inner_step_sizes(self) -> list[float]:
        """The inner step size of each of `inner_variables` (the learned
        ones with `options.learn_inner_rates`)."""
        if self.inner_rates is None:
            return list(self._inner_rates)
        return [float(rate) for rate in
                keras.ops.convert_to_numpy(self.inner_rates)]

    def parameter_values(self) -> Values:
        """The current values of `parameters`, as tensors."""
        return [tf.convert_to_tensor(v) for v in self.parameters]

    def forward(self, values: Sequence[tf.Tensor], images, *,
                training: bool | None = None,
                statistics: State | None = None) -> tf.Tensor:
        """The model's logits with `parameters` set to `values`.

        Args:
            values: One tensor per parameter (e.g. from `adapt`).
            images: RGB pixels in [0, 255], `(batch, h, w, 3)`.
            training: Keras' `training` flag; `None`: the options'
                `batch_statistics`. Layer updates are discarded.
            statistics: BatchNorm moving statistics to use in place of the
                model's (`support_statistics`); they matter in inference
                mode (`training=False`).
        """
        if training is None:
            training = self.options.batch_statistics
        logits, _ = self._run(values, dict(statistics or {}), images,
                              training)
        return logits

    def adapt(self, values: Sequence[tf.Tensor], support_images,
              support_labels, *, steps: int | None = None) -> Values:
        """Adapts `values` to one task: `steps` inner-loop steps.

        Args:
            values: One tensor per parameter, e.g. `parameter_values()`.
            support_images: `(N*K, h, w, 3)` pixels in [0, 255].
            support_labels: `(N*K,)` labels in `0 .. N-1`.
            steps: Inner steps; `None`: the options' `evaluation_steps`.

        Returns:
            The adapted values (only the inner variables' differ); no
            variable changes.
        """
        steps = self.options.evaluation_steps if steps is None else steps
        adapted, _ = self._adapt(list(values), {}, support_images,
                                 support_labels, steps, second_order=False)
        return adapted

    def meta_gradients(self, values: Sequence[tf.Tensor],
                       episodes: Episode) -> MetaGradients:
        """The outer loop's loss and gradients for a batch of episodes.

        Args:
            values: One tensor per parameter: the initial weights.
            episodes: An `Episode` of tensors with a leading meta-batch axis
                (of static size, e.g. `EpisodeSampler.dataset(
                meta_batch_size=...)`).

        Returns:
            `MetaGradients`, averaged over the episodes; second-order or
            first-order as the options say.
        """
        count = episodes.support_images.shape[0]
        if count is None:
            raise ValueError(
                "The meta-batch size of `episodes` is unknown: batch the "
                "episodes with drop_remainder=True (EpisodeSampler.dataset "
                "does).")
        values, state = list(values), {}
        losses, accuracies, total = [], [], None
        for index in range(count):
            episode = Episode(*(part[index] for part in episodes))
            loss, accuracy, gradients, state = self._task_gradients(
                values, state, episode)
            losses.append(loss)
            accuracies.append(accuracy)
            total = gradients if total is None else [
                a + b for a, b in zip(total, gradients)]
        return MetaGradients(
            loss=tf.add_n(losses) / count,
            accuracy=tf.add_n(accuracies) / count,
            gradients=[g / count for g in total], state=state)

    # -- Steps that change variables ------------------------------------

    def meta_train_step(self, episodes: Episode) -> dict[str, tf.Tensor]:
        """One outer step on a batch of episodes; returns loss and accuracy.

        Updates the outer variables with the optimizer and assigns the
        BatchNorm moving statistics (and seed states) the forward passes
        computed. A plain function: wrap it in `tf.function`, and in
        `strategy.run` to distribute it (each replica's gradient is divided
        by the replica count, as Keras' optimizer sums them; the returned
        loss and accuracy are the replica's own).

        Raises:
            ValueError: The learner has no outer variables (`finetune`).
        """
        if not self.outer_variables:
            raise ValueError(
                "This learner meta-trains nothing (it has no outer "
                "variables, like the `finetune` baseline): evaluate it "
                "directly, or build a km_maml / anil / maml learner.")
        result = self.meta_gradients(self.parameter_values(), episodes)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self.optimizer.apply_gradients(zip(
            [g / replicas for g in result.gradients], self.outer_variables))
        self._assign_state(result.state, replicas)
        return {"loss": result.loss, "accuracy": result.accuracy}

    def _assign_state(self, state: State, replicas: int) -> None:
        """Assigns the updated moving statistics (and seed states)."""
        assign_updates(self.model, state, replicas)

    # -- Evaluation -----------------------------------------------------

    def support_statistics(self, values: Sequence[tf.Tensor], support_images
                           ) -> State:
        """BatchNorm statistics re-estimated on a task's support set.

        One training-mode pass of the network at `values` (e.g. adapted
        ones) over the support images gives each BatchNorm layer the mean
        and variance of its inputs there: what the task's own moving
        statistics would be. An exported task that keeps them
        (`km_tf.meta.save_adapted_task(..., statistics=...)`) computes
        `evaluate(..., statistics="support")`.

        Args:
            values: One tensor per parameter.
            support_images: The task's support images, `(N*K, h, w, 3)`.

        Returns:
            `{id(variable): value}` for the moving mean and variance of
            every BatchNorm layer that normalizes with batch moments in
            training mode (trainable ones); no variable changes.
        """
        mapping = {id(v): t for v, t in zip(self.parameters, values)}
        _, updates = run_model(self.model, mapping, support_images,
                               training=True, momentum=0.0)
        wanted = {id(v) for v in self.moving_statistics}
        return {key: tf.stop_gradient(value) for key, value in updates.items()
                if key in wanted}

    def evaluate(self, episodes: Iterable[Episode], *,
                 steps: int | None = None,
                 statistics: str | None = None) -> np.ndarray:
        """Adapts to each episode's support set and scores its query set.

        The learner's variables are the initial weights of every episode;
        nothing changes.

        Args:
            episodes: Single (unbatched) episodes, e.g.
                `EpisodeSampler.episodes(600)`.
            steps: Inner steps; `None`: the options' `evaluation_steps`.
            statistics: The BatchNorm statistics the query set is scored
                with, one of `STATISTICS`: `"query"`, its own batch
                statistics (transductive, as MAML reports); `"moving"`, the
                moving statistics of meta-training (an exported task that
                keeps the base's statistics); `"support"`, statistics
                re-estimated on the support set after adapting
                (`support_statistics`; an exported task with its own).
                `None`: `"query"` if the options' `batch_statistics`, else
                `"moving"`.

        Returns:
            The query accuracy of every episode, float64 `(episodes,)`;
            `km_tf.meta.mean_confidence_interval` summarises it.
        """
        if statistics is None:
            statistics = self.scored_statistics[0]
        return self.evaluate_with(episodes, steps=steps,
                                  statistics=(statistics,))[statistics]

    @property
    def scored_statistics(self) -> tuple[str, ...]:
        """The statistics this learner's query sets are scored with: all of
        `STATISTICS` when it adapts with batch statistics (the first,
        "query", is its headline score, as MAML reports), else "moving"
        alone (its inner loop runs in inference mode, like fine-tuning)."""
        return STATISTICS if self.options.batch_statistics else ("moving",)

    def evaluate_with(self, episodes: Iterable[Episode], *,
                      steps: int | None = None,
                      statistics: Sequence[str] = STATISTICS
                      ) -> dict[str, np.ndarray]:
        """`evaluate` under several BatchNorm statistics at once: each
        episode is adapted once and its query set scored with each.

        Args:
            episodes: Single (unbatched) episodes.
            steps: Inner steps; `None`: the options' `evaluation_steps`.
            statistics: Names from `STATISTICS` (see `evaluate`).

        Returns:
            `{name: query accuracy of every episode}` (float64 arrays).
        """
        statistics = ((statistics,) if isinstance(statistics, str)
                      else tuple(statistics))
        unknown = [name for name in statistics if name not in STATISTICS]
        if unknown or not statistics:
            raise ValueError(
                f"Unknown BatchNorm statistics {unknown or statistics!r}: "
                f"choose from {', '.join(STATISTICS)}.")
        steps = self.options.evaluation_steps if steps is None else steps
        scores = np.array([
            self._score(Episode(*(tf.convert_to_tensor(part)
                                  for part in episode)),
                        steps=steps, statistics=statistics).numpy()
            for episode in episodes], dtype=np.float64).reshape(
                -1, len(statistics))
        return {name: scores[:, i] for i, name in enumerate(statistics)}

    # -- The loops ------------------------------------------------------

    def _run(self, values: Sequence[tf.Tensor], state: State, images,
             training: bool) -> tuple[tf.Tensor, State]:
        """Logits for `images`, and the state after the pass."""
        mapping = {id(v): t for v, t in zip(self.parameters, values)}
        mapping.update(state)
        logits, updates = run_model(self.model, mapping, images,
                                    training=training)
        state = {**state, **{key: tf.stop_gradient(value)
                             for key, value in updates.items()}}
        return logits, state

    def _adapt(self, values: Values, state: State, images, labels,
               steps: int, *, second_order: bool) -> tuple[Values, State]:
        """The inner loop. With `second_order`, the updates stay
        differentiable for an enclosing tape; else their gradients are
        constants (stopped)."""
        values = list(values)
        for i in self._zeroed:
            values[i] = tf.zeros_like(values[i])
        rates = self._inner_rates
        if self.inner_rates is not None:
            rates = tf.unstack(values[-1])
        for _ in range(steps):
            inner = [values[i] for i in self._inner]
            with tf.GradientTape() as tape:
                tape.watch(inner)
                logits, state = self._run(values, state, images,
                                          self.options.batch_statistics)
                loss = cross_entropy(labels, logits)
            gradients = tape.gradient(loss, inner)
            values = list(values)
            for i, rate, gradient in zip(self._inner, rates, gradients):
                if gradient is None:
                    continue
                if not second_order:
                    gradient = tf.stop_gradient(gradient)
                values[i] = values[i] - tf.cast(rate, gradient.dtype) * (
                    gradient)
        return values, state

    def _task_gradients(self, values: Values, state: State, episode: Episode
                        ) -> tuple[tf.Tensor, tf.Tensor, Values, State]:
        """Query loss, accuracy and outer gradients of one episode."""
        steps = self.options.inner_steps
        training = self.options.batch_statistics
        if self.options.first_order:
            # FOMAML: the gradient at the adapted weights is the gradient.
            values, state = self._adapt(
                values, state, episode.support_images,
                episode.support_labels, steps, second_order=False)
            watched = [values[i] for i in self._outer]
            with tf.GradientTape() as tape:
                tape.watch(watched)
                logits, state = self._run(values, state,
                                          episode.query_images, training)
                loss = cross_entropy(episode.query_labels, logits)
        else:
            watched = [values[i] for i in self._outer]
            with tf.GradientTape() as tape:
                tape.watch(watched)
                adapted, state = self._adapt(
                    values, state, episode.support_images,
                    episode.support_labels, steps, second_order=True)
                logits, state = self._run(adapted, state,
                                          episode.query_images, training)
                loss = cross_entropy(episode.query_labels, logits)
        gradients = tape.gradient(loss, watched)
        gradients = [tf.zeros_like(w) if g is None else g
                     for w, g in zip(watched, gradients)]
        return loss, accuracy(episode.query_labels, logits), gradients, state

    def _score_episode(self, episode: Episode, *, steps: int,
                       statistics: tuple[str, ...]) -> tf.Tensor:
        """Query accuracy of one adapted episode under each statistics."""
        adapted = self.adapt(self.parameter_values(), episode.support_images,
                             episode.support_labels, steps=steps)
        scores = []
        for name in statistics:
            own = None
            if name == "support":
                own = self.support_statistics(adapted, episode.support_images)
            logits = self.forward(adapted, episode.query_images,
                                  training=name == "query", statistics=own)
            scores.append(accuracy(episode.query_labels, logits))
        return tf.stack(scores)


def assign_updates(model: keras.Model, state: State, replicas: int) -> None:
    """Assigns the variable updates of forward passes (`run_model`'s).

    Under a strategy with several replicas, float values (BatchNorm moving
    statistics) are averaged over the replicas first (one batched
    all-reduce): Keras creates them without an aggregation, so each replica
    would keep its own. Call it in a replica context (`strategy.run`).

    Args:
        model: The model whose variables `state` names.
        state: `{id(variable): value}`.
        replicas: `num_replicas_in_sync` of the current strategy.
    """
    updated = [v for v in model.variables if id(v) in state]
    values = [state[id(v)] for v in updated]
    floats = [i for i, value in enumerate(values)
              if value.dtype.is_floating]
    if replicas > 1 and floats:
        averaged = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.MEAN, [values[i] for i in floats])
        for i, value in zip(floats, averaged):
            values[i] = value
    for variable, value in zip(updated, values):
        variable.assign(value)


def cross_entropy(labels, logits) -> tf.Tensor:
    """Mean softmax cross-entropy of integer labels.

    Written with `log_softmax` (float32, or float64 for float64 logits)
    because TensorFlow's fused sparse cross-entropy refuses second
    derivatives.
    """
    dtype = tf.float64 if logits.dtype == tf.float64 else tf.float32
    logits = tf.cast(logits, dtype)
    one_hot = tf.one_hot(tf.cast(labels, tf.int32), tf.shape(logits)[-1],
                         dtype=dtype)
    return -tf.reduce_mean(tf.reduce_sum(
        one_hot * tf.nn.log_softmax(logits), axis=-1))


def accuracy(labels, logits) -> tf.Tensor:
    """Fraction of `labels` that `logits` rank first (float32)."""
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.reduce_mean(tf.cast(
        tf.equal(predicted, tf.cast(labels, tf.int32)), tf.float32))


# -- The four methods ----------------------------------------------------


def km_maml(base: keras.Model, ways: int, *,
            options: MetaOptions = MetaOptions(),
            optimizer: keras.optimizers.Optimizer | None = None,
            head_layer: str | None = None,
            hidden_units: int = DEFAULT_HIDDEN_UNITS,
            form: str = DEFAULT_FORM,
            filter_units: int = DEFAULT_FILTER_UNITS,
            adapt_batchnorm: bool = False,
            adapt_head: bool = False,
            last_filter_units: int | None = DEFAULT_LAST_FILTER_UNITS
            ) -> MetaLearner:
    """KM-MAML: tasks adapt the modulators; meta-training trains all.

    The model is `km_tf.modulate(base with a ways-class head,
    batchnorm="train")`. The inner loop adapts the modulators (and, if
    asked, the head, and BatchNorm's gamma and beta: what a KM transfer
    task with `batchnorm="train"` holds); the outer loop meta-trains the
    base kernels and biases, BatchNorm's gamma and beta, the head, and the
    modulators' initial values. Convolutions `modulate` cannot rewrite
    stay frozen.

    The defaults are the configuration that measured best on the offline
    glyph split (BUILD.md, "Few-shot meta-learning"): the head is shared
    (`adapt_head=False`), the last convolution's modulator is filter-form
    (`last_filter_units=8`), and rates left `None` in `options` are
    `inner_learning_rate` for the modulators and ten times it for that
    last one (`BODY_ONLY_MODULATOR_RATE_FACTOR`,
    `LAST_FILTER_RATE_FACTOR`). With the head adapting, modulators default
    to a tenth of it (`MODULATOR_RATE_FACTOR`); without `last_filter_units`
    the last modulator steps like the others.

    Args:
        base: A pretrained (or fresh) base classifier; not changed.
        ways: Classes per task (N): the head's width.
        options: Inner-loop options; `None` modulator rates are filled in
            as above (`MetaLearner.options` holds the rates used).
        optimizer: Outer optimizer (`None`: Adam at 1e-3).
        head_layer: Name of the base's Dense head; `None`: its last layer
            (see `km_tf.models.replace_head`).
        hidden_units: Modulator size (see `km_tf.modulate`).
        form: Modulator form.
        filter_units: Hidden width of filter-unit modulators.
        adapt_batchnorm: Tasks also adapt BatchNorm's gamma and beta (two
            values per channel), so their files hold BatchNorm too.
        adapt_head: Tasks adapt the head too. `False`: only the
            modulators (and BatchNorm, if asked) adapt, and the head is
            meta-trained like the base and the same in every task
            (body-only adaptation, BOIL: Oh et al., 2021), so the
            modulators must carry each task.
        last_filter_units: The last modulated convolution (a Conv2D; a
            base ending in a DepthwiseConv2D is refused) works on whole
            filters with this many hidden units (a per-layer `modulate`
            override): a step on it changes the layer's channel mixing by a
            rank-`last_filter_units` product, the shape of MAML's per-task
            change there (BUILD.md). `None`: a modulator like the others.

    Returns:
        The `MetaLearner`.
    """
    if options.zero_head and not adapt_head:
        raise ValueError(
            "`zero_head` starts every task's head at zero, so tasks must "
            "adapt the head, and km_maml's default shares one meta-trained "
            "head: pass adapt_head=True, or set zero_head=False.")
    options = km_maml_options(options, adapt_head=adapt_head,
                              last_filter_form=last_filter_units is not None)
    task_base = replace_head(base, ways, head_layer=head_layer)
    overrides = {}
    if last_filter_units is not None:
        overrides[_last_modulated_conv2d(task_base)] = {
            "form": "filter", "filter_units": last_filter_units}
    model = modulate(task_base, hidden_units=hidden_units, form=form,
                     filter_units=filter_units, batchnorm="train",
                     overrides=overrides)
    roles = (ROLE_MODULATED,) + ((ROLE_HEAD,) if adapt_head else ()) + (
        (ROLE_BATCHNORM,) if adapt_batchnorm else ())
    inner = [item.variable for item in task_variables(model)
             if item.role in roles and item.variable.trainable]
    base_weights = [weight for _, layer in walk_layers(model)
                    if isinstance(layer, KM_LAYERS)
                    for weight in ([layer.base_kernel] + (
                        [layer.bias] if layer.use_bias else []))]
    return MetaLearner(model, inner_variables=inner,
                       outer_variables=[*model.trainable_variables,
                                        *base_weights],
                       options=options, optimizer=optimizer)


def _last_modulated_conv2d(model: keras.Model) -> str:
    """The name of the last convolution `modulate` rewrites, which must be
    a Conv2D: the one layer both `last_filter_units` (its form) and
    `last_modulator_learning_rate` (its rate) apply to."""
    convolutions = [layer for _, layer in walk_layers(model)
                    if is_rewritten(layer)]
    if not convolutions:
        raise ValueError(
            "`last_filter_units` sets the last Conv2D's modulator, but "
            f"{model.name!r} has no Conv2D layer: pass "
            "last_filter_units=None.")
    last = convolutions[-1]
    if not isinstance(last, keras.layers.Conv2D):
        raise ValueError(
            f"`last_filter_units` makes the last modulated convolution's "
            f"modulator filter-form, but {model.name!r}'s is "
            f"{type(last).__name__} {last.name!r}, whose filters are single "
            "channels: pass last_filter_units=None.")
    return last.name


def km_maml_options(options: MetaOptions, *, adapt_head: bool,
                    last_filter_form: bool) -> MetaOptions:
    """`options` with `km_maml`'s default modulator rates in place of
    `None` (see `km_maml`)."""
    rate = options.modulator_learning_rate
    if rate is None:
        rate = options.inner_learning_rate * (
            MODULATOR_RATE_FACTOR if adapt_head
            else BODY_ONLY_MODULATOR_RATE_FACTOR)
    last_rate = options.last_modulator_learning_rate
    if last_rate is None:
        last_rate = (options.inner_learning_rate * LAST_FILTER_RATE_FACTOR
                     if last_filter_form else rate)
    return dataclasses.replace(options, modulator_learning_rate=rate,
                               last_modulator_learning_rate=last_rate)


def anil(base: keras.Model, ways: int, *,
         options: MetaOptions = MetaOptions(),
         optimizer: keras.optimizers.Optimizer | None = None,
         head_layer: str | None = None) -> MetaLearner:
    """ANIL (Raghu et al., 2020): tasks adapt the head; meta-training
    trains everything.

    Args: as `km_maml` (without the modulator options).
    """
    model = replace_head(base, ways, head_layer=head_layer)
    return MetaLearner(model, inner_variables=head_variables(model),
                       outer_variables=model.trainable_variables,
                       options=options, optimizer=optimizer)


def maml(base: keras.Model, ways: int, *,
         options: MetaOptions = MetaOptions(),
         optimizer: keras.optimizers.Optimizer | None = None,
         head_layer: str | None = None) -> MetaLearner:
    """MAML (Finn et al., 2017): tasks adapt and meta-training trains every
    trainable weight.

    Args: as `km_maml` (without the modulator options).
    """
    model = replace_head(base, ways, head_layer=head_layer)
    return MetaLearner(model, inner_variables=model.trainable_variables,
                       outer_variables=model.trainable_variables,
                       options=options, optimizer=optimizer)


FINETUNE_OPTIONS = MetaOptions(inner_steps=100, inner_learning_rate=0.01,
                               batch_statistics=False)


def finetune(base: keras.Model, ways: int, *,
             options: MetaOptions = FINETUNE_OPTIONS,
             all_layers: bool = False,
             head_layer: str | None = None) -> MetaLearner:
    """The fine-tuning baseline: no meta-training.

    A conventionally pretrained base gets a fresh `ways`-class head; each
    task fine-tunes the head (or, with `all_layers`, every trainable
    weight) on its support set with `options.inner_steps` plain gradient
    steps. Its default options run in inference mode (moving BatchNorm
    statistics, no dropout), as fine-tuning a pretrained base usually does.

    Args:
        base: The pretrained base classifier; not changed.
        ways: Classes per task.
        options: Fine-tuning steps and rate (`FINETUNE_OPTIONS`).
        all_layers: Fine-tune every trainable weight, not only the head.
        head_layer: Name of the base's Dense head (see `km_maml`).

    Returns:
        A `MetaLearner` without outer variables (`meta_train_step` refuses).
    """
    if options.learn_inner_rates:
        raise ValueError(
            "The fine-tuning baseline meta-trains nothing, so it cannot "
            "learn its inner rates: pass options with "
            "learn_inner_rates=False.")
    model = replace_head(base, ways, head_layer=head_layer)
    inner = model.trainable_variables if all_layers else head_variables(
        model)
    return MetaLearner(model, inner_variables=inner, outer_variables=[],
                       options=options)


def head_variables(model: keras.Model) -> list[keras.Variable]:
    """The trainable weights of the head (what ANIL adapts): every
    trainable layer with weights that is neither a convolution nor
    BatchNorm (as `km_tf.modulate`'s default head)."""
    return [weight for _, layer in walk_layers(model)
            if layer_role(layer) == ROLE_HEAD
            for weight in layer.trainable_weights]


def make_learner(method: str, base: keras.Model, ways: int,
                 **kwargs) -> MetaLearner:
    """The learner of `method` (one of `METHODS`), e.g. from a flag.

    Args:
        method: `"km_maml"`, `"anil"`, `"maml"` or `"finetune"`.
        base: The base classifier.
        ways: Classes per task.
        **kwargs: That method's keyword arguments.
    """
    builders = {"km_maml": km_maml, "anil": anil, "maml": maml,
                "finetune": finetune}
    if method not in builders:
        raise ValueError(f"Unknown meta-learning method {method!r}; choose "
                         f"one of {', '.join(METHODS)}.")
    return builders[method](base, ways, **kwargs)
