"""Datasets held in memory as uint8 tensors, and the partitions that give each client its share."""

from fedbabu.data.datasets import Dataset, load_dataset
from fedbabu.data.partition import Partition, make_partition

__all__ = ["Dataset", "Partition", "load_dataset", "make_partition"]
