"""The reconstruction terms the quantizer layers pair with (docs/model.md §4), torch only:
with ``mse = sum (x_hat - x)^2 / B`` (summed over an example's values, mean over the batch),
ARELBO is ``dim_x / 2 * log(mse)``. networks/losses.py holds the others (a learned variance,
the vMF likelihood of label maps)."""
import torch


def squared_error(x_hat, x):
    """The release's "MSE": squared error summed over an image's pixels, mean over images."""
    # Not F.mse_loss, whose gradient is channel-first whatever x_hat's layout (docs/speed.md).
    return (x_hat - x).square().sum() / x.shape[0]


def arelbo_loss(mse, dim_x):
    return dim_x / 2 * torch.log(mse)
