"""cached-mslt: multi-stage layerwise BERT pretraining with a cached frozen bottom."""

__version__ = "0.1.0"
