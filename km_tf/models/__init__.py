"""Base networks for Kernel Modulation: builders, heads, input normalisation.

Every model built here takes RGB pixels in `[0, 255]`; `add_preprocessing`
gives the same input to a base of your own.

Example:
>>> from km_tf import models
>>> base = models.build_model("mobilenet_v2", 5, image_size=96, alpha=0.35)
>>> task = models.build_task_model(base, 3, hidden_units=32)
"""

from km_tf.models.heads import HEAD_NAME
from km_tf.models.heads import add_head
from km_tf.models.heads import build_task_model
from km_tf.models.heads import replace_head
from km_tf.models.preprocessing import INPUT_NAME
from km_tf.models.preprocessing import INPUT_NORMALIZATION_NAME
from km_tf.models.preprocessing import NORMALIZATIONS
from km_tf.models.preprocessing import add_preprocessing
from km_tf.models.preprocessing import fold_channel_swap
from km_tf.models.preprocessing import input_normalization
from km_tf.models.preprocessing import input_size
from km_tf.models.preprocessing import normalization_layer
from km_tf.models.preprocessing import normalize
from km_tf.models.registry import DEFAULT_BN_MOMENTUM
from km_tf.models.registry import MODEL_NAMES
from km_tf.models.registry import MODELS
from km_tf.models.registry import ModelSpec
from km_tf.models.registry import build_base
from km_tf.models.registry import build_model
from km_tf.models.registry import get_spec
from km_tf.models.registry import normalization_for
from km_tf.models.weights import load_base
from km_tf.models.weights import load_weights
from km_tf.models.weights import set_batchnorm_momentum
