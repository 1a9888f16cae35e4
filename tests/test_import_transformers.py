import numpy as np
import pytest
import torch
from conftest import to_numpy

from keras_perceiver.converters.transformers_perceiver import from_transformers

transformers = pytest.importorskip("transformers", reason="needs the test extra (transformers)")

ENCODERS = {
    "uneven_widths": dict(d_latents=48, num_latents=8, num_blocks=2, num_self_attends_per_block=2,
                          num_self_attention_heads=4, num_cross_attention_heads=2, qk_channels=16, v_channels=48),
    "defaults_widening": dict(d_latents=32, num_latents=6, num_blocks=3, num_self_attends_per_block=1,
                              num_self_attention_heads=2, num_cross_attention_heads=1,
                              self_attention_widening_factor=2, cross_attention_widening_factor=3),
}


def _perturbed(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_masked_lm_parity(encoder, tmp_path):
    config = transformers.PerceiverConfig(d_model=32, vocab_size=262, max_position_embeddings=40, **ENCODERS[encoder])
    reference = _perturbed(transformers.PerceiverForMaskedLM(config))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 262, size=(2, 40)).astype("int64")
    mask = np.ones((2, 40), "int64")
    mask[1, 25:] = 0
    with torch.no_grad():
        expected = reference(inputs=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    reference.save_pretrained(tmp_path)
    for source in (reference, str(tmp_path)):
        model = from_transformers(source)
        out = to_numpy(model({"token_ids": ids.astype("int32"), "input_mask": mask.astype(bool)}))
        assert out.shape == expected.shape == (2, 40, 262)
        assert np.abs(out - expected).max() <= 1e-4


@pytest.mark.parametrize("head", ["Learned", "Fourier", "ConvProcessing"])
@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_image_classification_parity(head, encoder):
    size = 20 if head == "ConvProcessing" else 8  # the conv stem: 20 -> 10 -> 4
    config = transformers.PerceiverConfig(image_size=size, num_labels=5, d_model=32, **ENCODERS[encoder])
    reference = getattr(transformers, f"PerceiverForImageClassification{head}")(config)
    if head == "ConvProcessing":  # non-trivial batch-norm statistics
        norm = reference.perceiver.input_preprocessor.convnet.batchnorm
        with torch.no_grad():
            norm.running_mean.normal_(0, 0.3)
            norm.running_var.uniform_(0.5, 2.0)
    reference = _perturbed(reference)
    pixels = np.random.default_rng(1).normal(size=(2, 3, size, size)).astype("float32")
    with torch.no_grad():
        expected = reference(inputs=torch.from_numpy(pixels)).logits.numpy()
    model = from_transformers(reference)
    out = to_numpy(model(pixels.transpose(0, 2, 3, 1)))  # channels-last here
    assert out.shape == expected.shape == (2, 5)
    assert np.abs(out - expected).max() <= 1e-4


def test_unsupported_head_is_refused():
    config = transformers.PerceiverConfig(d_latents=32, num_latents=4, num_self_attends_per_block=1, d_model=32)
    with pytest.raises(ValueError, match="must be one of.*received PerceiverForSequenceClassification"):
        from_transformers(transformers.PerceiverForSequenceClassification(config))


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_optical_flow_parity(encoder):
    config = transformers.PerceiverConfig(train_size=[6, 8], **ENCODERS[encoder])
    reference = _perturbed(transformers.PerceiverForOpticalFlow(config))
    # two frames of 3x3 patches around each pixel: (batch, frames, 27, H, W) in transformers
    patches = np.random.default_rng(2).normal(size=(2, 2, 27, 6, 8)).astype("float32")
    with torch.no_grad():
        expected = reference(inputs=torch.from_numpy(patches)).logits.numpy()
    model = from_transformers(reference)
    out = to_numpy(model(patches.transpose(0, 1, 3, 4, 2)))
    assert out.shape == expected.shape == (2, 6, 8, 2)
    assert np.abs(out - expected).max() <= 1e-4


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_multimodal_autoencoding_parity(encoder):
    config = transformers.PerceiverConfig(
        num_frames=2, image_size=8, audio_samples_per_frame=8, samples_per_patch=4, output_shape=[1, 2, 8, 8],
        output_num_channels=12, num_labels=5, _label_trainable_num_channels=20, **ENCODERS[encoder],
    )
    reference = _perturbed(transformers.PerceiverForMultimodalAutoencoding(config))
    rng = np.random.default_rng(3)
    video = rng.normal(size=(2, 2, 3, 8, 8)).astype("float32")
    audio = rng.normal(size=(2, 16, 1)).astype("float32")
    image_points, audio_points = np.arange(40, 75), np.array([3, 0, 2])  # a chunk; any order
    with torch.no_grad():
        expected = reference(
            inputs={"image": torch.from_numpy(video), "audio": torch.from_numpy(audio), "label": torch.zeros(2, 5)},
            subsampled_output_points={
                "image": torch.from_numpy(image_points), "audio": torch.from_numpy(audio_points), "label": None,
            },
        ).logits
    model = from_transformers(reference)
    out = model({
        "image": video.transpose(0, 1, 3, 4, 2), "audio": audio,
        "image_output_points": np.tile(image_points, (2, 1)).astype("int32"),
        "audio_output_points": np.tile(audio_points, (2, 1)).astype("int32"),
    })
    ours = {"image": "reconstructed_image", "audio": "reconstructed_audio", "label": "label_logits"}
    shapes = {"image": (2, 35, 3), "audio": (2, 12), "label": (2, 5)}
    for name, shape in shapes.items():
        got = to_numpy(out[ours[name]])
        assert got.shape == tuple(expected[name].shape) == shape
        assert np.abs(got - expected[name].numpy()).max() <= 1e-4, name
