"""Utilities shared by the DeepSeek-VL2 processor, examples and serving code."""

from deepseek_vl.utils.io import ImageLoadError, ImageNotFoundError, load_image, load_pil_images

__all__ = ["ImageLoadError", "ImageNotFoundError", "load_image", "load_pil_images"]
