import pytest
import torch


@pytest.fixture(scope="session")
def digits_cnn(tmp_path_factory):
    """The small CNN trained on digits (default recipe), and its splits. Trained once per worker."""
    from lowbit.train import train_or_load

    ckpt = tmp_path_factory.mktemp("ckpt") / "small_cnn-digits.pt"
    torch.manual_seed(0)
    model, splits, meta = train_or_load("small_cnn", "digits", checkpoint=ckpt, progress=False)
    return model.eval(), splits, meta
