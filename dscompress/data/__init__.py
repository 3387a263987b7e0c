"""Datasets by spec (built-in digits and digits-seg, MNIST IDX, CIFAR, VOC, image folders), their
preprocessing, training augmentation, validation split and loaders."""
