"""Compression methods applied to a trained model: quantization (``quant``) and token reduction (``tokens``)."""
