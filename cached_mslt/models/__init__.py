"""Model architectures beyond transformers' own; importing this registers them with the Auto classes."""

from cached_mslt.models.preln_bert import (
    PreLNBertConfig,
    PreLNBertForMaskedLM,
    PreLNBertForSequenceClassification,
)

__all__ = ["PreLNBertConfig", "PreLNBertForMaskedLM", "PreLNBertForSequenceClassification"]
