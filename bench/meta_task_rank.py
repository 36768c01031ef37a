"""How many numbers a MAML task's change of the last convolution needs.

    .venv/bin/python bench/meta_task_rank.py --run_dir=runs/meta_maml \\
        --output=bench/results/meta_task_rank

MAML's tasks rewrite the last convolution's kernel and little else
(`bench/meta_adaptation.py`). This program measures the size of that
rewrite on a finished km-meta-train run of `--method=maml`. Each episode is
adapted with the head and the last convolution's kernel (the run's inner
steps and rate at test); the kernel's change `D` is a matrix with a row per
filter input (`kh*kw*cin`) and a column per output filter. The query set is
then scored with `D` replaced by

    rank r         its best rank-r approximation (truncated SVD), per
                   episode, the head kept as adapted
    shared k       its projection on the `k` leading directions of the
                   changes of the meta-validation episodes (one subspace
                   of all kernels, learned from other tasks)

Rank r = 0 and k = 0 keep the kernel at its meta-trained value (with the
head adapted for the changed kernel). The report also gives the fraction of
`D`'s energy (squared Frobenius norm) the leading r singular values hold,
the mean over episodes. Transductive scoring (the query set's batch
statistics), as the run's own headline score.

What it says (BUILD.md, "Few-shot meta-learning"): the rank a modulator of
the last convolution must be able to express, which chose the filter-form
last modulator of KM-MAML's measured configuration.

Writes `<output>.json` and `<output>.md`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from km_tf import meta  # noqa: E402
from km_tf.meta import pools as meta_pools  # noqa: E402
from km_tf.walk import walk_layers  # noqa: E402

from determinism import THREADS_HELP, make_reproducible  # noqa: E402
from meta_adaptation import read_run, rebuild_learner  # noqa: E402
from results_io import (  # noqa: E402
    machine_summary, provenance, write_report)

RANKS = (0, 1, 2, 3, 4, 5, 6, 8, 16)
SHARED_DIMENSIONS = (0, 4, 16, 32, 64, 128, 256)


class KernelChanges:
    """Adapts episodes with the head and the last convolution's kernel, and
    scores them with that kernel's change replaced."""

    def __init__(self, learner: meta.MetaLearner) -> None:
        convolutions = [layer for _, layer in walk_layers(learner.model)
                        if isinstance(layer, keras.layers.Conv2D)]
        self.layer = convolutions[-1]
        kernel = self.layer.kernel
        self.learner = meta.MetaLearner(
            learner.model, outer_variables=[], options=learner.options,
            inner_variables=meta.head_variables(learner.model) + [kernel])
        self.index = next(i for i, v in enumerate(self.learner.parameters)
                          if v is kernel)
        self.initial = self.learner.parameter_values()
        self.shape = tuple(kernel.shape)
        self._adapt = tf.function(self._adapted, reduce_retracing=True,
                                  autograph=False)
        self._score = tf.function(self._accuracy, reduce_retracing=True,
                                  autograph=False)

    def _adapted(self, support_images, support_labels) -> list[tf.Tensor]:
        return self.learner.adapt(self.initial, support_images,
                                  support_labels)

    def _accuracy(self, values, query_images, query_labels) -> tf.Tensor:
        return meta.accuracy(query_labels, self.learner.forward(
            values, query_images, training=True))

    def adapt(self, episode: meta.Episode) -> tuple[list[tf.Tensor],
                                                    np.ndarray]:
        """The adapted values and the kernel's change, `(rows, filters)`."""
        adapted = self._adapt(episode.support_images, episode.support_labels)
        change = (adapted[self.index] - self.initial[self.index]).numpy()
        return adapted, change.reshape(-1, self.shape[-1])

    def score(self, adapted: list[tf.Tensor], change: np.ndarray,
              episode: meta.Episode) -> float:
        """Query accuracy with the kernel's change set to `change`."""
        values = list(adapted)
        values[self.index] = self.initial[self.index] + tf.constant(
            change.reshape(self.shape), self.initial[self.index].dtype)
        return float(self._score(values, episode.query_images,
                                 episode.query_labels))


def truncated(change: np.ndarray, rank: int) -> np.ndarray:
    """The best rank-`rank` approximation of `change`."""
    u, s, vt = np.linalg.svd(change, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def measure(run_dir: str | os.PathLike, episodes: int) -> dict[str, Any]:
    """Scores the run's meta-test episodes with the last kernel's change
    truncated; returns the JSON-ready results."""
    started = time.perf_counter()
    settings = read_run(run_dir)
    if settings["method"] != "maml":
        raise ValueError(
            f"{run_dir} is a --method={settings['method']} run; only maml "
            "adapts the convolution kernels this program measures. Pass a "
            "--method=maml run.")
    pools = meta_pools.load_pools(settings["data"], settings["image_size"])
    changes = KernelChanges(rebuild_learner(run_dir, settings))

    def adapted_episodes(split: str):
        sampler = pools.sampler(
            split, ways=settings["ways"], shots=settings["shots"],
            queries=settings["queries"],
            seed=meta.episode_seed(settings["seed"], split))
        for episode in sampler.episodes(episodes):
            episode = meta.Episode(*(tf.convert_to_tensor(part)
                                     for part in episode))
            yield (episode, *changes.adapt(episode))

    # The shared subspace comes from the meta-validation tasks' changes.
    flattened = np.stack([change.reshape(-1) for _, _, change
                          in adapted_episodes("validation")])
    _, _, directions = np.linalg.svd(flattened, full_matrices=False)
    dimensions = [k for k in SHARED_DIMENSIONS if k <= len(directions)]
    ranks = [r for r in RANKS if r <= min(changes.shape[-1],
                                          np.prod(changes.shape[:-1]))]
    by_rank = {r: [] for r in ranks}
    by_dimension = {k: [] for k in dimensions}
    full, energy = [], []
    for episode, adapted, change in adapted_episodes("test"):
        full.append(changes.score(adapted, change, episode))
        singular = np.linalg.svd(change, compute_uv=False)
        energy.append(np.cumsum(singular ** 2) / np.sum(singular ** 2))
        for r in ranks:
            by_rank[r].append(changes.score(
                adapted, truncated(change, r), episode))
        for k in dimensions:
            basis = directions[:k]
            projected = basis.T @ (basis @ change.reshape(-1))
            by_dimension[k].append(changes.score(
                adapted, projected.reshape(change.shape), episode))
    mean_energy = np.mean(energy, axis=0)

    def summary(accuracies: list[float]) -> dict[str, float]:
        accuracy, ci95 = meta.mean_confidence_interval(
            np.asarray(accuracies))
        return {"accuracy": round(float(accuracy), 5),
                "ci95": round(float(ci95), 5)}

    return {
        "run_dir": os.fspath(run_dir), "settings": settings,
        "episodes": episodes, "layer": changes.layer.name,
        "inner_steps": changes.learner.options.evaluation_steps,
        "change_shape": list(changes.shape),
        "full_change": summary(full),
        "rank": {str(r): {**summary(by_rank[r]), "energy": round(float(
            mean_energy[r - 1]), 4) if r else 0.0} for r in ranks},
        "shared": {str(k): summary(by_dimension[k]) for k in dimensions},
        "machine": machine_summary(tensorflow=True),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(time.perf_counter() - started, 1)}


def markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown report."""
    settings = results["settings"]
    rows, filters = (int(np.prod(results["change_shape"][:-1])),
                     results["change_shape"][-1])
    full = results["full_change"]
    lines = [
        "# How many numbers a MAML task's change of the last convolution "
        "needs",
        "",
        *provenance(results),
        f"Run: `{results['run_dir']}` (--method={settings['method']}, "
        f"{settings['ways']}-way {settings['shots']}-shot, "
        f"{settings['meta_steps']} meta-steps, seed {settings['seed']}); "
        f"{results['episodes']} meta-test episodes, the head and "
        f"`{results['layer']}`'s kernel adapted "
        f"({results['inner_steps']} inner steps); its change is a "
        f"{rows} x {filters} matrix. Transductive accuracy in % with 95% "
        f"CI; with the whole change: {100 * full['accuracy']:.2f} ± "
        f"{100 * full['ci95']:.2f}.",
        "",
        "| change kept | accuracy | energy held |",
        "|---|---|---|",
    ]
    for rank, score in results["rank"].items():
        lines.append(f"| rank {rank} | {100 * score['accuracy']:.2f} ± "
                     f"{100 * score['ci95']:.2f} | "
                     f"{100 * score['energy']:.1f}% |")
    lines += ["", "| projected on the meta-validation changes' leading k "
              "directions | accuracy |", "|---|---|"]
    for dimensions, score in results["shared"].items():
        lines.append(f"| k = {dimensions} | {100 * score['accuracy']:.2f} ± "
                     f"{100 * score['ci95']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    make_reproducible(flags.FLAGS.threads)
    results = measure(flags.FLAGS.run_dir, flags.FLAGS.episodes)
    results = {"command": " ".join(["python", *sys.argv]), **results}
    print(write_report(flags.FLAGS.output, results, markdown))


if __name__ == "__main__":
    flags.DEFINE_string("run_dir", None, "--output_dir of a finished "
                        "km-meta-train run of --method=maml.", required=True)
    flags.DEFINE_integer("episodes", 300, "Meta-validation and meta-test "
                         "episodes.", lower_bound=2)
    flags.DEFINE_string("output", "bench/results/meta_task_rank",
                        "Results path stem (.json and .md are written).")
    flags.DEFINE_integer("threads", 1, THREADS_HELP, lower_bound=0)
    app.run(main)
