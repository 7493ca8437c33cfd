"""Training side of the toolkit: CIFAR-10 files (`experiments.data`), the device-resident data
set with augmentation and label noise (`experiments.datasets`), per-worker samplers
(`experiments.sampling`), networks (`experiments.models`) and the Local SGD trainer.

Submodules are imported explicitly (``from experiments.data import load_cifar10``); this file
imports nothing heavy.
"""
