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


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread (small nets slow down ~10x when the 2 test workers' OpenMP
    threads oversubscribe a busy machine); restores the setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
