"""Training augmentation: random crops of the padded image and horizontal flips, a segmentation
mask cropped and flipped with its image."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from dscompress.data.datasets import data_task


class Augmented(Dataset):
    """Random crops of the padded image (and horizontal flips), drawn from torch's global RNG;
    a segmentation mask is cropped and flipped with its image."""

    def __init__(self, dataset: Dataset, flip: bool):
        self.dataset = dataset
        self.classes = dataset.classes
        self.task = data_task(dataset)
        _, height, width = dataset[0][0].shape
        steps = [v2.RandomCrop((height, width), padding=max(1, min(height, width) // 8), padding_mode="reflect")]
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        if self.task == "segmentation":
            image, mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(label))
            return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        return self.transform(image), label
