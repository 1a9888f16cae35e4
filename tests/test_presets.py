import gc
import json
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from conftest import to_numpy

import keras_perceiver as kp
from keras_perceiver import presets
from keras_perceiver.cli import main as cli_main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_list_presets_with_wildcards():
    names = kp.list_presets()
    for required in (
        "flamingo_resampler", "open_flamingo_resampler", "perceiver_vision_learned",
        "perceiver_vision_fourier", "perceiver_vision_conv", "perceiver_io_language", "perceiver_digits",
    ):
        assert required in names
    assert kp.list_presets("*flamingo*") == ["flamingo_resampler", "open_flamingo_resampler"]
    assert kp.list_presets("nothing*") == []


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="Unknown preset 'flamingo_resampeler'.*Did you mean 'flamingo_resampler'"):
        kp.from_preset("flamingo_resampeler")


def test_preset_without_weights_says_how_to_get_them():
    # no public checkpoint (a public one is fetched on first use: tests/test_hub.py)
    with pytest.raises(ValueError, match="ships no weights and has no public checkpoint.*keras-perceiver convert RESAMPLER"):
        kp.from_preset("flamingo_resampler")
    assert all("original" in e for n, e in presets.zoo_entries().items() if n not in ("flamingo_resampler", "perceiver_digits"))


@pytest.mark.parametrize("name", [n for n in presets.list_presets()])
def test_every_preset_builds_at_its_real_size(name):
    entry = presets.zoo_entries()[name]
    model = kp.from_preset(name, load_weights=False)
    assert type(model).__name__ == entry["class_name"]
    assert model.count_params() == entry["parameter_count"]
    for key in ("description", "provenance", "paper_figure"):
        assert entry[key]
    del model
    gc.collect()


def test_overrides_and_class_methods():
    small = kp.PerceiverResampler.from_preset("flamingo_resampler", load_weights=False, depth=1, dim=64, head_channels=8)
    assert small.config.depth == 1 and small.config.activation == "squared_relu"
    with pytest.raises(ValueError, match="Perceiver.from_preset: the preset holds a PerceiverResampler"):
        kp.Perceiver.from_preset("flamingo_resampler", load_weights=False)


def test_save_to_preset_round_trip_and_no_silent_overwrite(tmp_path):
    model = kp.from_preset("open_flamingo_resampler", load_weights=False, depth=2, dim=32, head_channels=8, num_latents=4)
    media = np.random.default_rng(0).normal(size=(2, 5, 32)).astype("float32")
    expected = to_numpy(model(media))
    directory = model.save_to_preset(tmp_path / "mine")
    assert {p.name for p in directory.iterdir()} == {"config.json", "model.weights.h5", "metadata.json"}
    metadata = json.loads((directory / "metadata.json").read_text())
    assert metadata["parameter_count"] == model.count_params()
    assert metadata["keras_version"] == keras.version()
    np.testing.assert_array_equal(to_numpy(kp.from_preset(str(directory))(media)), expected)
    np.testing.assert_array_equal(to_numpy(kp.PerceiverResampler.from_preset(directory)(media)), expected)

    before = (directory / "model.weights.h5").read_bytes()
    other = kp.from_preset("open_flamingo_resampler", load_weights=False, depth=2, dim=32, head_channels=8, num_latents=4)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        other.save_to_preset(directory)
    assert (directory / "model.weights.h5").read_bytes() == before
    other.save_to_preset(directory, overwrite=True)
    assert (directory / "model.weights.h5").read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no staging directory left behind


def test_hf_handle_resolves_through_the_downloader(tmp_path, monkeypatch):
    model = kp.from_preset("open_flamingo_resampler", load_weights=False, depth=1, dim=16, head_channels=4, num_latents=2)
    model.save_to_preset(tmp_path / "snapshot")
    asked = []

    def fake_download(handle):
        asked.append(handle)
        return tmp_path / "snapshot"

    monkeypatch.setattr(presets, "download_from_hub", fake_download)
    loaded = kp.from_preset("hf://someone/resampler")
    assert asked == ["hf://someone/resampler"]
    assert loaded.config == model.config


def test_perceiver_digits_accuracy_from_shipped_weights():
    from keras_perceiver.zoo.train_digits import accuracy, digits_split

    model = kp.from_preset("perceiver_digits")
    _, _, x_test, y_test = digits_split()
    assert len(x_test) == 450
    assert accuracy(model, x_test, y_test) >= 0.97


def test_readme_zoo_table_is_generated_from_zoo():
    assert presets.zoo_table() in README.read_text()


def test_convert_cli_from_state_dict_and_transformers_dir(tmp_path, capsys):
    import flamingo_pytorch
    import transformers

    torch.manual_seed(0)
    reference = flamingo_pytorch.PerceiverResampler(dim=16, depth=1, dim_head=4, heads=4, num_latents=3, num_media_embeds=2).eval()
    torch.save(reference.state_dict(), tmp_path / "resampler.pt")
    assert cli_main(["convert", str(tmp_path / "resampler.pt"), str(tmp_path / "out"), "--num-heads", "4"]) == 0
    media = np.random.default_rng(0).normal(size=(1, 2, 5, 16)).astype("float32")
    with torch.no_grad():
        expected = reference(torch.from_numpy(media)).numpy()
    assert np.abs(to_numpy(kp.from_preset(str(tmp_path / "out"))(media)) - expected).max() <= 1e-4
    assert cli_main(["convert", str(tmp_path / "resampler.pt"), str(tmp_path / "out")]) == 2
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err

    config = transformers.PerceiverConfig(d_model=32, d_latents=32, num_latents=4, num_self_attends_per_block=1,
                                          max_position_embeddings=16, num_cross_attention_heads=1)
    transformers.PerceiverForMaskedLM(config).save_pretrained(tmp_path / "hf")
    assert cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "lm")]) == 0
    assert type(kp.from_preset(str(tmp_path / "lm"))).__name__ == "PerceiverIO"
