"""routerd: etcd in, validated and confirmed nginx reloads out."""

__version__ = "0.1.0"
