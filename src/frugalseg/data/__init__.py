"""Data layer: readers, preprocessing, few-label splits, batch sampling and augmentation, synthetic phantoms."""
