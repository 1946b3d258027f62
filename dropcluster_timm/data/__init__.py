""" Data for training and evaluation: ImageFolder splits and timm's data sets (``datasets``), the
embedded digits (``digits``)."""
from .datasets import (
    TRAIN_SPLITS, EVAL_SPLITS, DataBundle, EightBitReader, build_data, check_no_link_loop, class_names, cluster_batch,
    dataset_description, find_split_folder, is_folder_dataset, make_dataset, num_classes_of, set_transforms,
    split_name)
from .digits import EMBEDDED_DATASET, DigitsDataset

__all__ = [
    'EMBEDDED_DATASET', 'TRAIN_SPLITS', 'EVAL_SPLITS', 'DigitsDataset', 'DataBundle', 'num_classes_of', 'class_names',
    'is_folder_dataset', 'find_split_folder', 'make_dataset', 'build_data', 'set_transforms',
    'dataset_description', 'split_name', 'cluster_batch', 'check_no_link_loop', 'EightBitReader',
]
