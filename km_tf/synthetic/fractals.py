"""Fractals: one class per random iterated function system (FractalDB-style).

Kataoka et al. (ACCV 2020) pretrained ConvNets on images of fractals drawn
from random iterated function systems (IFS) and found they transfer to
natural-image tasks. Here, as there:

- a class is an IFS of 2-4 random contractive affine maps of the plane
  (each map chosen with probability proportional to its area factor),
  kept only if its attractor fills a reasonable part of the frame (neither
  a speck nor a line);
- an instance is the attractor of that IFS with every parameter perturbed a
  little, drawn by the chaos game, rotated, flipped and scaled at random,
  in a random colour on a random dark background, its brightness the log
  of the point density.

Instances of class `c` depend only on the seed, `c` and how many are drawn,
so `fractals:100` holds the first 100 classes of `fractals:1000`.
"""

import numpy as np

from km_tf.errors import DataError
from km_tf.synthetic.cache import cached_arrays

FRACTAL_SIZE = 32
INSTANCES = 60
GENERATOR_VERSION = 1
_MAX_MAPS = 4
_POINTS = 3000
_BURN_IN = 20
_CANDIDATES = 32  # Systems tried at once when looking for a class.
_FILL_RANGE = (0.1, 0.55)  # Share of frame pixels the attractor must touch.
_MAX_GAIN = 0.95  # Largest singular value a map may have.
_PERTURBATION = 0.08  # Relative s.d. of an instance's parameter noise.
_MAX_ROTATION = np.pi / 4
_SCALES = (0.7, 0.95)  # Attractor extent, of the half frame.
_CHUNK = 2048  # Instances per chaos-game batch (memory: points x chunk x 8 B).


def fractal_images(classes: int, instances: int = INSTANCES, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Draws (or reads from the cache) `classes` fractal classes.

    Args:
        classes: Number of classes (IFS), `>= 2`.
        instances: Images per class.
        seed: Seed of the systems and the drawing.

    Returns:
        `(images, labels, class_names)`: uint8 RGB `(n, FRACTAL_SIZE,
        FRACTAL_SIZE, 3)` images, int64 labels, names `fractal_0000`...

    Raises:
        DataError: `classes < 2` or `instances < 1`.
    """
    if classes < 2 or instances < 1:
        raise DataError(f"Fractals need >= 2 classes and >= 1 instance; got "
                        f"{classes} classes, {instances} instances.")
    arrays = cached_arrays(
        f"fractals_v{GENERATOR_VERSION}_{classes}x{instances}_"
        f"{FRACTAL_SIZE}px_seed{seed}",
        lambda: {"images": _draw_classes(classes, instances, seed)})
    labels = np.repeat(np.arange(classes, dtype=np.int64), instances)
    return arrays["images"], labels, [f"fractal_{c:04d}"
                                      for c in range(classes)]


def class_system(class_id: int, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The IFS of one class: maps `(MAX_MAPS, 2, 3)` and probabilities
    `(MAX_MAPS,)` (unused maps have probability 0)."""
    rng = np.random.default_rng([seed, class_id, 0])
    while True:
        maps, probabilities = _random_systems(rng, _CANDIDATES)
        points = _chaos_game(maps, probabilities,
                             rng.random((_POINTS // 3, _CANDIDATES)))
        for candidate in range(_CANDIDATES):
            fill = np.mean(_density(points[:, candidate], 1.0, 0.0,
                                    False) > 0)
            if _FILL_RANGE[0] <= fill <= _FILL_RANGE[1]:
                return maps[candidate], probabilities[candidate]


def _random_systems(rng: np.random.Generator, count: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`count` random contractive IFS of 2..MAX_MAPS maps."""
    maps = rng.uniform(-1.0, 1.0, (count, _MAX_MAPS, 2, 3))
    gains = np.linalg.svd(maps[..., :2], compute_uv=False)[..., 0]
    maps[..., :2] *= np.minimum(1.0, _MAX_GAIN / gains)[..., None, None]
    used = np.arange(_MAX_MAPS) < rng.integers(2, _MAX_MAPS + 1,
                                               (count, 1))
    weights = np.abs(np.linalg.det(maps[..., :2])) + 0.02
    weights *= used
    return maps, weights / weights.sum(axis=1, keepdims=True)


def _draw_classes(classes: int, instances: int, seed: int) -> np.ndarray:
    """Every instance of every class, drawn in chunks of instances."""
    maps, probabilities, uniforms, looks = [], [], [], []
    for class_id in range(classes):
        system, weights = class_system(class_id, seed)
        rng = np.random.default_rng([seed, class_id, 1])
        noise = 1.0 + _PERTURBATION * rng.standard_normal(
            (instances, *system.shape))
        perturbed = system * noise
        gains = np.linalg.svd(perturbed[..., :2], compute_uv=False)[..., 0]
        perturbed[..., :2] *= np.minimum(1.0, _MAX_GAIN / gains)[
            ..., None, None]
        maps.append(perturbed)
        probabilities.append(np.broadcast_to(weights, (instances,
                                                       _MAX_MAPS)))
        uniforms.append(rng.random((_POINTS, instances)))
        looks.append(_random_looks(rng, instances))
    maps = np.concatenate(maps)
    probabilities = np.concatenate(probabilities)
    uniforms = np.concatenate(uniforms, axis=1)
    looks = {key: np.concatenate([look[key] for look in looks])
             for key in looks[0]}
    images = np.empty((len(maps), FRACTAL_SIZE, FRACTAL_SIZE, 3), np.uint8)
    for start in range(0, len(maps), _CHUNK):
        part = slice(start, start + _CHUNK)
        points = _chaos_game(maps[part], probabilities[part],
                             uniforms[:, part])
        for offset, index in enumerate(range(*part.indices(len(maps)))):
            density = _density(_rotate(points[:, offset],
                                       looks["angle"][index]),
                               looks["scale"][index], 0.0,
                               looks["flip"][index])
            images[index] = _colour(density, looks["colour"][index],
                                    looks["background"][index])
    return images


def _random_looks(rng: np.random.Generator, count: int
                  ) -> dict[str, np.ndarray]:
    return {"angle": rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, count),
            "scale": rng.uniform(*_SCALES, count),
            "flip": rng.random(count) < 0.5,
            "colour": rng.uniform(96.0, 255.0, (count, 3)),
            "background": rng.uniform(0.0, 48.0, count)}


def _chaos_game(maps: np.ndarray, probabilities: np.ndarray,
                uniforms: np.ndarray) -> np.ndarray:
    """Points `(steps - burn-in, systems, 2)` of each system's attractor.

    Args:
        maps: `(systems, MAX_MAPS, 2, 3)` affine maps.
        probabilities: `(systems, MAX_MAPS)`.
        uniforms: `(steps, systems)` uniform draws that pick the maps.
    """
    cumulative = np.cumsum(probabilities, axis=1)[:, :-1]
    choices = (uniforms[..., None] > cumulative[None]).sum(-1)
    systems = np.arange(len(maps))
    point = np.zeros((len(maps), 2))
    points = np.empty((len(uniforms), len(maps), 2))
    for step, choice in enumerate(choices):
        chosen = maps[systems, choice]
        point = np.einsum("sij,sj->si", chosen[..., :2], point) + chosen[..., 2]
        points[step] = point
    return points[_BURN_IN:]


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return points @ np.array([[cos, sin], [-sin, cos]])


def _density(points: np.ndarray, scale: float, margin: float, flip: bool
             ) -> np.ndarray:
    """Log point density on the frame, in `[0, 1]`, the attractor centred
    and scaled so its larger half-extent is `scale` of the half frame."""
    low, high = np.percentile(points, [1, 99], axis=0)
    centre, extent = (low + high) / 2, max(float(np.max(high - low)) / 2,
                                           1e-9)
    unit = (points - centre) / extent * scale  # Attractor in [-scale, scale].
    if flip:
        unit[:, 0] = -unit[:, 0]
    pixels = np.floor((unit + 1.0) / 2.0 * FRACTAL_SIZE).astype(np.int64)
    inside = np.all((pixels >= 0) & (pixels < FRACTAL_SIZE), axis=1)
    counts = np.bincount(pixels[inside, 1] * FRACTAL_SIZE + pixels[inside, 0],
                         minlength=FRACTAL_SIZE * FRACTAL_SIZE)
    density = np.log1p(counts.reshape(FRACTAL_SIZE, FRACTAL_SIZE))
    return density / max(float(density.max()), 1e-9)


def _colour(density: np.ndarray, colour: np.ndarray, background: float
            ) -> np.ndarray:
    image = background + (colour - background) * density[..., None]
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
