"""The trainer: segmentation models (`models`), datasets (`data`), distillers and the training loop.

Pure PyTorch on top of the public `segkd_kernels` API."""
