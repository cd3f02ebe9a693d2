import pytest
import torch

from model.config import DDConfig, ModelConfig

torch.set_num_threads(1)  # tests share 2 cores with the server and worker processes they start


def tiny_model_config(size: int = 64, attn: list[int] | None = None) -> ModelConfig:
    """A 2.7 M-parameter network of the first_radio.yaml family (ch 32) for fast CPU tests."""
    dd = DDConfig(resolution=[size, size], ch=32, ch_mult=[1, 2, 4], num_res_blocks=1,
                  attn_resolutions=attn or [])
    return ModelConfig(embed_dim=3, ddconfig=dd)


@pytest.fixture
def tiny_config() -> ModelConfig:
    return tiny_model_config()
