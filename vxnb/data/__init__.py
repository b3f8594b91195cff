"""Datasets: an8Flower (rendered here), real MNIST digits, and user image folders."""
