"""Numbers of the authors' release (docs/model.md §2), shared by the tests that check them."""

# Trainable parameters of the release's models: (total, encoder, decoder). cifar10_vmf is not
# in the release's table: it is a GaussianSQVAE (so D stays 64) without a variance head on the
# CIFAR10 nets, i.e. exactly the networks and codebook of cifar10_gauss_1.
RELEASE_PARAMS = {
    "mnist_gauss_1": (240386, 116128, 116065),
    "fashion-mnist_gauss_1": (248578, 116128, 116065),
    "cifar10_gauss_1": (341252, 154336, 154147),
    "celeba_gauss_1": (630532, 319584, 278179),
    "celeba_gauss_2": (671876, 360928, 278179),
    "celeba_gauss_3": (671876, 360928, 278179),
    "celeba_gauss_4": (671876, 360928, 278179),
    "celebamask_vmf": (354989, 196756, 154071),
    "cifar10_vmf": (341252, 154336, 154147),
}
