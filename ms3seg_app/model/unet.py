"""2D U-Net with the layer structure of the published MS3SEG U-Net.

Bashiri Bawil et al., "MS3SEG", Scientific Data 2025: conv-BN-ReLU x2 per level,
4 max-pools, UpSampling2D + concatenate, 1x1 convolution with softmax. The base width
is a parameter (64 in the paper); with ``base_filters=64, in_channels=1`` the layer
list matches the published model so its ``.h5`` weights load through
:func:`ms3seg_app.model.card.load_model`.
"""
from __future__ import annotations

import keras
from keras import layers


def _block(x, filters: int, name: str, use_bias: bool = False):
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=use_bias, kernel_initializer="he_normal",
                          name=f"{name}_conv{i}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{i}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{i}")(x)
    return x


def build_unet(input_shape: tuple = (256, 256, 1), n_classes: int = 4, base_filters: int = 16,
               depth: int = 4, dropout: float = 0.1, use_bias: bool = False) -> keras.Model:
    """Build the U-Net.

    Parameters
    ----------
    input_shape : tuple (H, W, C)
        ``H`` and ``W`` divisible by ``2**depth`` (``None`` allowed for any size).
    n_classes : int
        Output channels (4 for the tri-mask).
    base_filters : int
        Filters of the first level; doubled at each of the ``depth`` pools.
    depth : int
        Number of max-pools (4 in MS3SEG).
    dropout : float
        Spatial dropout at the bottleneck (0 disables; it holds no weights).
    use_bias : bool
        Biases in the 3x3 convolutions. Ours: False (redundant before batch norm);
        MS3SEG's published U-Net: True (Keras default), needed to load its ``.h5``.

    Returns
    -------
    keras.Model
        Input ``(N, H, W, C)`` float32, output ``(N, H, W, n_classes)`` softmax
        probabilities (float32).
    """
    inp = keras.Input(shape=input_shape, name="flair")
    skips = []
    x = inp
    for level in range(depth):
        x = _block(x, base_filters * 2**level, f"enc{level}", use_bias)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _block(x, base_filters * 2**depth, "bottleneck", use_bias)
    if dropout:
        x = layers.SpatialDropout2D(dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(depth)):
        x = layers.UpSampling2D(2, name=f"up{level}")(x)
        x = layers.Concatenate(name=f"concat{level}")([x, skips[level]])
        x = _block(x, base_filters * 2**level, f"dec{level}", use_bias)
    out = layers.Conv2D(n_classes, 1, activation="softmax", dtype="float32", name="trimask")(x)
    return keras.Model(inp, out, name=f"ms3seg_unet{base_filters}")
