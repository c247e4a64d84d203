"""mt_scale: Mean Teacher semi-supervised image classification on timm models.

Importing the package registers our timm models (mt_resnext152_32x4d, cifar_shakeshake26,
mt_digits_cnn) so `timm.create_model` builds them by name.
"""

from mt_scale import model as _model  # noqa: F401  (registers the models with timm)
