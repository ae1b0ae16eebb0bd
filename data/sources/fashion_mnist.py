"""Fashion-MNIST: MNIST's format and sizes (``mnist.py`` reads it), under ``FashionMNIST/raw``."""
from .mnist import mnist_format

SOURCE = mnist_format("FashionMNIST")
