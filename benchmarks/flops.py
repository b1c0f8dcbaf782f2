"""Analytic FLOP count of a Keras CNN (2 FLOPs per multiply-add, convolutions and dense only).

Written by hand because TensorFlow's profiler needs frozen TF1 graphs; counting the layers that
do the arithmetic is what throughput comparisons use (BN, activations and pooling are <1%).
"""
from __future__ import annotations

import keras


def _unwrap(layer):
    return layer.layer if isinstance(layer, keras.layers.Wrapper) else layer


def count_flops(model: keras.Model) -> int:
    """FLOPs of one forward pass of ``model`` built for a fixed input shape (batch 1)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            total += count_flops(layer)
            continue
        layer = _unwrap(layer)
        if not hasattr(layer, "output") or layer.output is None:
            continue
        shape = layer.output.shape
        if isinstance(layer, keras.layers.SeparableConv2D):
            _, h, w, cout = shape
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            total += 2 * h * w * (kh * kw * cin * layer.depth_multiplier + cin * layer.depth_multiplier * cout)
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, cout = shape
            kh, kw = layer.kernel_size
            total += 2 * h * w * kh * kw * cout
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, cout = shape
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            total += 2 * h * w * kh * kw * cin * cout // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.input.shape[-1] * layer.units
    return int(total)
