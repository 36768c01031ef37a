"""Few-shot meta-learning with kernel modulators (KM-MAML) and baselines.

    episodes.py   N-way K-shot episodes from a labelled image pool, class
                  splits, a `tf.data` pipeline of meta-batches
    forward.py    a Keras model as a function of its weight values, with
                  KM kernels differentiable in the base kernel
    learners.py   `MetaLearner` and its methods: km_maml, anil, maml,
                  finetune (the design: its module docstring)
    export.py     the meta-trained base, and adapted tasks as task files
    metrics.py    mean accuracy with a 95% confidence interval, per-task
                  bytes
    pools.py      datasets for meta-learning: images in memory, class
                  splits (offline glyphs by script, tfds datasets)
    loop.py       the training loop: distributed, logged, checkpointed,
                  resumable (what km-meta-train and bench/meta.py run)

Example:
>>> from km_tf import meta
>>> splits = meta.split_classes(np.unique(labels), seed=0)
>>> train = meta.EpisodeSampler(images, labels, splits.train, ways=5,
...                             shots=1, queries=15, seed=0)
>>> learner = meta.km_maml(base, ways=5)
>>> step = tf.function(learner.meta_train_step)
>>> for episodes in train.dataset(meta_batch_size=4).take(2000):
...     step(episodes)
>>> test = meta.EpisodeSampler(images, labels, splits.test, ways=5,
...                            shots=1, queries=15, seed=1)
>>> meta.mean_confidence_interval(learner.evaluate(test.episodes(600)))
>>> meta_base = meta.meta_trained_base(learner)
>>> episode = test.episode(0)
>>> adapted = learner.adapt(learner.parameter_values(),
...                         episode.support_images, episode.support_labels)
>>> meta.save_adapted_task(
...     learner, adapted, meta_base, "task.kmtask",
...     statistics=learner.support_statistics(adapted,
...                                           episode.support_images))
"""

from km_tf.meta.episodes import (ClassSplits, Episode, EpisodeSampler,
                                 episode_seed, split_classes)
from km_tf.meta.export import meta_trained_base, save_adapted_task
from km_tf.meta.forward import modulate_kernel_differentiably, run_model
from km_tf.meta.learners import (BODY_ONLY_MODULATOR_RATE_FACTOR,
                                 DEFAULT_LAST_FILTER_UNITS,
                                 FINETUNE_OPTIONS, LAST_FILTER_RATE_FACTOR,
                                 METHODS, MODULATOR_RATE_FACTOR, STATISTICS,
                                 MetaGradients, MetaLearner, MetaOptions,
                                 accuracy, anil, cross_entropy, finetune,
                                 head_variables, km_maml, km_maml_options,
                                 make_learner, maml)
from km_tf.meta.metrics import (TaskStorage, mean_confidence_interval,
                                task_storage)

__all__ = [
    "BODY_ONLY_MODULATOR_RATE_FACTOR", "ClassSplits",
    "DEFAULT_LAST_FILTER_UNITS", "Episode", "EpisodeSampler",
    "FINETUNE_OPTIONS", "LAST_FILTER_RATE_FACTOR",
    "METHODS", "MODULATOR_RATE_FACTOR", "MetaGradients", "MetaLearner",
    "MetaOptions", "STATISTICS", "TaskStorage",
    "accuracy", "anil", "cross_entropy", "episode_seed", "finetune",
    "head_variables", "km_maml", "km_maml_options",
    "make_learner", "maml", "mean_confidence_interval", "meta_trained_base",
    "modulate_kernel_differentiably", "run_model", "save_adapted_task",
    "split_classes", "task_storage",
]
