"""Exports of lowbit models to other runtimes: ONNX QDQ (:func:`export_onnx`)."""

from .onnx import OnnxExportError, compare_onnx, export_onnx

__all__ = ["OnnxExportError", "compare_onnx", "export_onnx"]
