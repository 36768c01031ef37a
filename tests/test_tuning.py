"""Tests of km_tf.tuning and apps/tune.py: search, budget, resume, files."""

import json
import os
import subprocess
import sys

import keras
import keras_tuner
import numpy as np
import pytest

import km_tf
from km_tf import data, tuning
from support import small_convnet

IMAGE_SIZE = 32
NUM_CLASSES = 5
SMALL, LARGE = 2, 32
# Between the task sizes of the small and the large hidden width of
# small_convnet on 5 classes (255-351 vs. 1965-2061 parameters).
BUDGET = tuning.Budget(max_task_params=1000)
FIT_OPTIONS = {"epochs": 1, "steps_per_epoch": 2, "verbose": 0}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_digits(strength: float) -> data.ImageDatasets:
    # small_convnet has no in-model normalisation: normalise in the pipeline.
    return data.load("digits:5-9", image_size=IMAGE_SIZE, batch_size=32,
                     augment=strength, flip=False, normalization="tf")


def _space(**changes) -> tuning.SearchSpace:
    return tuning.SearchSpace(hidden_units=(SMALL, LARGE),
                              augment=(0.0, 0.5), **changes)


def _hypermodel(base, budget=BUDGET, **changes) -> tuning.KMHyperModel:
    return tuning.KMHyperModel(base, NUM_CLASSES, _load_digits,
                               space=_space(**changes), budget=budget)


@pytest.fixture(scope="module")
def base():
    keras.utils.set_random_seed(0)
    return small_convnet((IMAGE_SIZE, IMAGE_SIZE, 3), NUM_CLASSES)


@pytest.fixture(scope="module")
def search(base, tmp_path_factory):
    """A 1-trial random search, resumed as a 2-trial one, plus best model."""
    directory = str(tmp_path_factory.mktemp("tune"))

    def run(trials: int):
        hypermodel = _hypermodel(base)
        fitted = []
        fit = hypermodel.fit
        hypermodel.fit = lambda hp, model, **kw: (
            fitted.append(dict(hp.values)) or fit(hp, model, **kw))
        tuner = tuning.make_tuner("random", hypermodel, trials=trials,
                                  epochs=1, directory=directory,
                                  project_name="digits")
        tuner.search(**FIT_OPTIONS)
        return tuner, fitted

    first, first_fitted = run(1)
    first_trials = tuning.trial_summaries(first)
    tuner, resumed_fitted = run(2)
    config, result = tuning.train_best(
        tuner, epochs=1, output_dir=directory, steps_per_epoch=2, verbose=0)
    task_path = os.path.join(directory, "best.kmtask")
    km_tf.save_task(result.model, task_path)
    return {"first_trials": first_trials, "first_fitted": first_fitted,
            "resumed_fitted": resumed_fitted, "tuner": tuner,
            "config": config, "result": result, "task_path": task_path}


def test_fit_space_drops_sizes_no_combination_affords(base):
    hypermodel = _hypermodel(base)

    assert hypermodel.space.hidden_units == (SMALL,)
    assert hypermodel.full_space.hidden_units == (SMALL, LARGE)
    assert hypermodel.space.batchnorm == ("freeze", "train")


def test_budget_in_percent_of_base_shrinks_the_space(base):
    prices = tuning.price_structures(base, NUM_CLASSES, _space())
    small = prices[(SMALL, 1, "freeze")].task_percent_of_base

    space = tuning.fit_space(_space(), prices,
                             tuning.Budget(max_task_percent=small + 0.01))

    assert space.structures() == [(SMALL, 1, "freeze")]


def test_budget_below_every_configuration_names_the_smallest(base):
    with pytest.raises(tuning.BudgetError,
                       match=r"hidden_units=2, filter_units=1, "
                             r"batchnorm='freeze', has 255 task params"):
        _hypermodel(base, budget=tuning.Budget(max_task_params=100))


def test_build_fails_the_trial_of_an_over_budget_combination(base):
    # Both hidden widths fit with frozen BatchNorm, the large one not with
    # trained BatchNorm: the space keeps it, build() rejects the pair.
    prices = tuning.price_structures(base, NUM_CLASSES, _space())
    limit = prices[(LARGE, 1, "freeze")].task_params
    assert prices[(LARGE, 1, "train")].task_params > limit
    hypermodel = _hypermodel(base, budget=tuning.Budget(limit))
    assert hypermodel.space.hidden_units == (SMALL, LARGE)
    hp = keras_tuner.HyperParameters()
    hypermodel.config(hp)
    hp.values.update(hidden_units=LARGE, batchnorm="train")

    with pytest.raises(keras_tuner.errors.FailedTrialError,
                       match="Over budget"):
        hypermodel.build(hp)

    hp.values.update(batchnorm="freeze")
    assert isinstance(hypermodel.build(hp), keras.Model)


def test_default_point_is_the_cheapest_affordable_configuration(base):
    hp = keras_tuner.HyperParameters()

    config = _hypermodel(base).config(hp)

    assert config.structure == (SMALL, 1, "freeze")


def test_search_completes_within_budget(search):
    trials = tuning.trial_summaries(search["tuner"])

    assert [t["status"] for t in trials] == ["COMPLETED", "COMPLETED"]
    assert all(t["hyperparameters"]["hidden_units"] == SMALL for t in trials)
    assert search["config"].hidden_units == SMALL
    report = km_tf.task_report(search["result"].model)
    assert BUDGET.allows(report)
    assert 0.0 <= search["result"].accuracy["test"] <= 1.0


def test_resumed_search_runs_only_the_missing_trial(search):
    trials = tuning.trial_summaries(search["tuner"])

    assert len(search["first_fitted"]) == 1
    assert len(search["resumed_fitted"]) == 1
    assert trials[0] == search["first_trials"][0]
    assert search["resumed_fitted"][0] == trials[1]["hyperparameters"]


def test_saved_task_loads_into_a_freshly_modulated_base(base, search):
    images = next(iter(_load_digits(0.0).test))[0]

    restored = km_tf.restore_task(base, search["task_path"])

    options = km_tf.read_task_options(search["task_path"])
    assert options["hidden_units"] == search["config"].hidden_units
    assert options["batchnorm"] == search["config"].batchnorm
    np.testing.assert_allclose(restored.predict(images, verbose=0),
                               search["result"].model.predict(images,
                                                              verbose=0),
                               atol=1e-5)


def test_search_rejects_training_data_passed_to_search(base):
    hypermodel = _hypermodel(base)
    hp = keras_tuner.HyperParameters()

    with pytest.raises(ValueError, match="fit options only"):
        hypermodel.fit(hp, hypermodel.build(hp), np.zeros((1, 32, 32, 3)))


def test_app_writes_task_file_and_report(base, tmp_path):
    base_path = str(tmp_path / "base.keras")
    base.save(base_path)
    flagfile = tmp_path / "tune.flags"
    flagfile.write_text("\n".join([
        f"--base={base_path}", f"--output_dir={tmp_path / 'run'}",
        f"--image_size={IMAGE_SIZE}", "--trials=1", "--epochs=1",
        "--steps_per_epoch=1", f"--hidden_units={SMALL},{LARGE}",
        "--augment=0,0.5", "--max_task_params=1000",
    ]) + "\n")

    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "apps", "tune.py"),
         f"--flagfile={flagfile}"], cwd=tmp_path, capture_output=True,
        text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        timeout=600)

    assert done.returncode == 0, done.stderr[-4000:]

    run = tmp_path / "run"
    report = json.loads((run / "tune_report.json").read_text())
    assert report["best_hyperparameters"]["hidden_units"] == SMALL
    assert report["final"]["task"]["task_params"] <= 1000
    assert "best hyperparameters:" in (run / "tune_report.txt").read_text()
    restored = km_tf.restore_task(base, run / "task.kmtask")
    assert isinstance(restored, keras.Model)
