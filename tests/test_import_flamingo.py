import numpy as np
import pytest
import torch
from conftest import to_numpy

from keras_perceiver.converters.flamingo import resampler_config_from_state_dict, resampler_from_state_dict

flamingo_pytorch = pytest.importorskip("flamingo_pytorch", reason="needs the test extra (flamingo-pytorch)")


def _reference(dim, depth, dim_head, heads, num_latents, num_media_embeds, ff_mult, seed=0):
    torch.manual_seed(seed)
    model = flamingo_pytorch.PerceiverResampler(
        dim=dim, depth=depth, dim_head=dim_head, heads=heads, num_latents=num_latents,
        num_media_embeds=num_media_embeds, ff_mult=ff_mult,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorms too, so every weight matters
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(
    "dim,depth,dim_head,heads,num_latents,num_media_embeds,ff_mult",
    [(32, 2, 8, 4, 6, 3, 4), (48, 3, 16, 2, 5, 4, 2), (24, 1, 12, 2, 3, 2, 1)],
)
def test_flamingo_pytorch_parity(dim, depth, dim_head, heads, num_latents, num_media_embeds, ff_mult):
    reference = _reference(dim, depth, dim_head, heads, num_latents, num_media_embeds, ff_mult)
    media = np.random.default_rng(0).normal(size=(2, num_media_embeds, 7, dim)).astype("float32")
    with torch.no_grad():
        expected = reference(torch.from_numpy(media)).numpy()
    model = resampler_from_state_dict(reference.state_dict(), num_heads=heads)
    assert model.config.depth == depth and model.config.head_channels == dim_head
    out = to_numpy(model(media))
    assert out.shape == expected.shape == (2, num_media_embeds, num_latents, dim)
    assert np.abs(out - expected).max() <= 1e-4
    # rank-3 media (one media item), as flamingo-pytorch accepts
    with torch.no_grad():
        single = reference(torch.from_numpy(media[:, 0])).numpy()
    np.testing.assert_allclose(to_numpy(model(media[:, 0])), single, atol=1e-4)


def test_open_flamingo_layout_parity():
    """OpenFlamingo keys: a `perceiver.` prefix, no time embeddings, (B, T, F, v, D) media."""
    reference = _reference(32, 2, 8, 4, 6, 1, 4)
    with torch.no_grad():
        reference.media_pos_emb.zero_()  # OpenFlamingo checkpoints carry no time embeddings
    state = {f"perceiver.{k}": v for k, v in reference.state_dict().items() if k != "media_pos_emb"}
    assert resampler_config_from_state_dict(state, num_heads=4)["num_media_embeds"] is None
    model = resampler_from_state_dict(state, num_heads=4)
    media = np.random.default_rng(1).normal(size=(2, 3, 1, 9, 32)).astype("float32")  # T=3, F=1
    with torch.no_grad():
        expected = reference(torch.from_numpy(media[:, :, 0])).numpy()
    assert np.abs(to_numpy(model(media)) - expected).max() <= 1e-4


def test_mismatched_state_dict_is_refused():
    reference = _reference(32, 2, 8, 4, 6, 3, 4)
    state = reference.state_dict()
    state.pop("layers.1.0.to_out.weight")
    with pytest.raises((ValueError, KeyError), match="to_out"):
        resampler_from_state_dict(state, num_heads=4)
