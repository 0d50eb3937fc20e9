"""Self-Lengthen on Kubernetes: the pipeline (selflengthen.pipeline) and its operator (selflengthen.operator)."""

__version__ = "0.1.0"
