"""Vision towers mcollapse defines itself, registered with transformers' Auto classes on import."""

from mcollapse.models.vision.efficientnet_lite import EfficientNetLiteConfig, EfficientNetLiteModel

__all__ = ["EfficientNetLiteConfig", "EfficientNetLiteModel"]
