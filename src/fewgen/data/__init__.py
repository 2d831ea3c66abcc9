"""Datasets, class splits, few-shot sets and episodes, augmentation."""

from fewgen.data.base import ArrayDataset, FewShotData
from fewgen.data.datasets import DATASETS, data_root, load_dataset
from fewgen.data.fewshot import Episodes, few_shot_set, sample_episodes

__all__ = [
    "DATASETS", "ArrayDataset", "Episodes", "FewShotData", "data_root", "few_shot_set",
    "load_dataset", "sample_episodes",
]
