"""Weights on first use: a zoo preset whose original checkpoint is public is fetched (only
what its converter reads), converted, checked against the preset's config and cached; later
loads read the cache alone. There is no hub here: the hub is a local directory laid out as a
hub snapshot (the Hugging Face cache's layout), or a local directory served as the hub's
file system, and an unreachable endpoint for the offline error."""

import json

import numpy as np
import pytest
import torch
from conftest import to_numpy
from test_connectors import IDEFICS2, _media_and_mask, idefics2_reference, write_shards

import keras_perceiver as kp
from keras_perceiver import presets
from keras_perceiver.cli import main as cli_main
from keras_perceiver.converters import hub
from keras_perceiver.converters import idefics as idefics_converter

huggingface_hub = pytest.importorskip("huggingface_hub", reason="needs the convert extra (huggingface_hub)")

REPO = "tiny-org/idefics2-tiny"
PRESET = "tiny_idefics2_connector"


def _write_checkpoint(directory, state, config):
    """A save_pretrained-style Idefics2 directory over three shards: language-model tensors
    alone in the first, connector and language-model tensors mixed in the second, connector
    alone in the third."""
    directory.mkdir(parents=True, exist_ok=True)
    connector = {f"model.connector.{k}": v.contiguous() for k, v in state.items()}
    names = sorted(connector)
    language = {f"model.text_model.layers.{i}.mlp.up_proj.weight": torch.randn(256, 64) for i in range(3)}
    shards = {
        "model-00001-of-00003.safetensors": {"model.text_model.layers.0.mlp.up_proj.weight": language["model.text_model.layers.0.mlp.up_proj.weight"]},
        "model-00002-of-00003.safetensors": {
            **{k: connector[k] for k in names[: len(names) // 2]},
            **{k: language[k] for k in ("model.text_model.layers.1.mlp.up_proj.weight", "model.text_model.layers.2.mlp.up_proj.weight")},
        },
        "model-00003-of-00003.safetensors": {k: connector[k] for k in names[len(names) // 2:]},
    }
    write_shards(directory, shards, config)
    return sum(t.numel() * t.element_size() for t in connector.values())


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A zoo entry for a tiny Idefics2 connector whose original is REPO, an empty local
    Hugging Face cache, a fresh KERAS_PERCEIVER_CACHE, and a hub that must not be called."""
    reference, config = idefics2_reference(IDEFICS2[0], seed=5)
    entry = {
        "name": PRESET, "class_name": "PerceiverResampler",
        "config": idefics_converter.idefics2_connector_config(config),
        "parameter_count": 0, "provenance": {"convert": f"keras-perceiver convert path/to/{REPO} out/"},
        "original": {"hub": REPO}, "weights": None,
    }
    entries = presets.zoo_entries()
    monkeypatch.setattr(presets, "zoo_entries", lambda: {**entries, PRESET: entry})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("KERAS_PERCEIVER_CACHE", str(tmp_path / "kp-cache"))

    def no_hub():
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(hub, "remote_filesystem", no_hub)
    return reference, config, entry, tmp_path


def _check_outputs(model, reference):
    media, mask = _media_and_mask(3, 9, IDEFICS2[0][0], seed=1)
    with torch.no_grad():
        expected = reference(torch.from_numpy(media), torch.from_numpy(mask).long()).numpy()
    got = to_numpy(model({"media": media, "media_mask": mask}))
    assert np.abs(got - expected).max() <= 1e-4
    return got


def test_first_use_converts_from_the_local_snapshot_then_reads_only_the_cache(tiny, monkeypatch):
    reference, config, entry, tmp_path = tiny
    repo_cache = tmp_path / "hf" / ("models--" + REPO.replace("/", "--"))
    (repo_cache / "refs").mkdir(parents=True)
    (repo_cache / "refs" / "main").write_text("0123abcd")
    _write_checkpoint(repo_cache / "snapshots" / "0123abcd", reference.state_dict(), config)

    first = _check_outputs(kp.from_preset(PRESET), reference)
    cached = tmp_path / "kp-cache" / "presets" / PRESET
    assert presets.is_preset_directory(cached)
    assert json.loads((cached / "metadata.json").read_text())["source"] == f"hf://{REPO}@main"
    assert sorted(p.name for p in cached.parent.iterdir()) == [PRESET]  # no staging left

    # the source is gone: the second load reads the cache alone, and gives the same function
    import shutil

    shutil.rmtree(tmp_path / "hf")
    second = kp.from_preset(PRESET)
    assert second.name == PRESET
    np.testing.assert_array_equal(_check_outputs(second, reference), first)

    # a cache converted from another source (the entry's original changed) is converted again
    metadata = json.loads((cached / "metadata.json").read_text())
    (cached / "metadata.json").write_text(json.dumps(dict(metadata, source="hf://someone/else@main")))
    with pytest.raises(AssertionError, match="the hub was asked"):
        kp.from_preset(PRESET)


class _LocalHub:
    """A directory served as the hub's file system (`org/name/file` paths), recording which
    files were opened and how many bytes were read from each."""

    def __init__(self, root):
        self.root, self.read = root, {}

    def open(self, path, mode="rb", revision=None):
        assert mode == "rb" and revision == "main"
        file = (self.root / path).open("rb")
        name, read = path.rsplit("/", 1)[-1], self.read
        read.setdefault(name, 0)

        class Recorded:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                file.close()

            def close(self):
                file.close()

            def seek(self, offset):
                file.seek(offset)

            def read(self, size=-1):
                data = file.read(size)
                read[name] += len(data)
                return data

        return Recorded()


def test_first_use_fetches_only_the_connector_tensors(tiny, monkeypatch):
    reference, config, entry, tmp_path = tiny
    connector_bytes = _write_checkpoint(tmp_path / "remote" / REPO, reference.state_dict(), config)
    served = _LocalHub(tmp_path / "remote")
    monkeypatch.setattr(hub, "remote_filesystem", lambda: served)

    _check_outputs(kp.from_preset(PRESET), reference)
    # the language model's shard is never opened, and of the mixed shard only the header and
    # the connector's byte ranges are read (its two 64 KiB language tensors are not)
    assert "model-00001-of-00003.safetensors" not in served.read
    shards = served.read["model-00002-of-00003.safetensors"] + served.read["model-00003-of-00003.safetensors"]
    headers = 2 * 4096
    assert connector_bytes <= shards <= connector_bytes + headers
    assert shards < connector_bytes + 256 * 64 * 4


def test_a_checkpoint_unlike_the_preset_is_not_cached(tiny, monkeypatch):
    reference, config, entry, tmp_path = tiny
    _write_checkpoint(tmp_path / "remote" / REPO, reference.state_dict(), config)
    monkeypatch.setattr(hub, "remote_filesystem", lambda: _LocalHub(tmp_path / "remote"))
    entry["config"] = dict(entry["config"], depth=entry["config"]["depth"] + 1)
    with pytest.raises(ValueError, match=r"unlike the preset \(depth: expected 3, received 2\)"):
        kp.from_preset(PRESET)
    assert not (tmp_path / "kp-cache" / "presets" / PRESET).exists()


def test_without_the_hub_the_error_says_what_was_tried_and_how_to_convert(tiny, monkeypatch):
    _, _, _, tmp_path = tiny
    # a real hub client against an endpoint that refuses connections
    monkeypatch.setattr(hub, "remote_filesystem", lambda: huggingface_hub.HfFileSystem(endpoint="http://127.0.0.1:9"))
    with pytest.raises(ConnectionError) as raised:
        kp.from_preset("idefics2_connector")
    message = str(raised.value)
    assert "hf://HuggingFaceM4/idefics2-8b@main/config.json" in message
    assert "keras-perceiver convert" in message and "load_weights=False" in message and "Nothing was written" in message
    assert not (tmp_path / "kp-cache" / "presets").exists() or not any((tmp_path / "kp-cache" / "presets").iterdir())
    # the CLI answers in one line
    assert cli_main(["convert", "HuggingFaceM4/idefics2-8b", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_convert_takes_a_hub_id(tiny, monkeypatch, capsys):
    reference, config, entry, tmp_path = tiny
    _write_checkpoint(tmp_path / "remote" / REPO, reference.state_dict(), config)
    monkeypatch.setattr(hub, "remote_filesystem", lambda: _LocalHub(tmp_path / "remote"))
    out = tmp_path / "converted"
    assert cli_main(["convert", REPO, str(out)]) == 0
    assert "connector tensors" in capsys.readouterr().err
    assert json.loads((out / "metadata.json").read_text())["source"] == f"hf://{REPO}"
    _check_outputs(kp.from_preset(str(out)), reference)


def test_hub_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert hub.is_hub_id("deepmind/language-perceiver")
    assert hub.is_hub_id("openflamingo/OpenFlamingo-9B-vitl-mpt7b/checkpoint.pt")
    (tmp_path / "deepmind" / "language-perceiver").mkdir(parents=True)
    assert not hub.is_hub_id("deepmind/language-perceiver")  # a local directory wins
    assert not hub.is_hub_id("./a/b") and not hub.is_hub_id("/a/b") and not hub.is_hub_id("a/b/c")


def _zoo_entry(monkeypatch, name, model, original):
    entry = {
        "name": name, "class_name": type(model).__name__, "config": model.get_config()["config"],
        "parameter_count": 0, "provenance": {}, "original": original, "weights": None,
    }
    entries = presets.zoo_entries()
    monkeypatch.setattr(presets, "zoo_entries", lambda: {**entries, name: entry})


def test_first_use_of_a_transformers_perceiver_from_the_local_snapshot(tiny, monkeypatch):
    """The transformers route: config.json and the weights file, from the local cache."""
    transformers = pytest.importorskip("transformers", reason="needs the test extra (transformers)")
    from keras_perceiver.converters.transformers_perceiver import from_transformers

    _, _, _, tmp_path = tiny
    config = transformers.PerceiverConfig(d_model=32, vocab_size=262, max_position_embeddings=24, d_latents=32,
                                          num_latents=4, num_blocks=1, num_self_attends_per_block=1)
    torch.manual_seed(0)
    reference = transformers.PerceiverForMaskedLM(config).eval()
    snapshot = tmp_path / "hf" / "models--tiny-org--language-perceiver" / "snapshots" / "feed"
    reference.save_pretrained(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("feed")
    _zoo_entry(monkeypatch, "tiny_language", from_transformers(reference), {"hub": "tiny-org/language-perceiver"})

    ids = np.random.default_rng(0).integers(0, 262, size=(2, 24))
    with torch.no_grad():
        expected = reference(inputs=torch.from_numpy(ids)).logits.numpy()
    model = kp.from_preset("tiny_language")
    got = to_numpy(model({"token_ids": ids.astype("int32"), "input_mask": np.ones((2, 24), bool)}))
    assert np.abs(got - expected).max() <= 1e-4


def test_first_use_of_an_open_flamingo_state_dict_over_the_hub(tiny, monkeypatch):
    """The state-dict route: the zoo entry names the file (OpenFlamingo's checkpoint.pt)."""
    flamingo_pytorch = pytest.importorskip("flamingo_pytorch", reason="needs the test extra (flamingo-pytorch)")
    from keras_perceiver.converters.flamingo import resampler_from_state_dict

    _, _, _, tmp_path = tiny
    torch.manual_seed(0)
    reference = flamingo_pytorch.PerceiverResampler(dim=16, depth=1, dim_head=8, heads=2, num_latents=3, num_media_embeds=1).eval()
    with torch.no_grad():
        reference.media_pos_emb.zero_()
    state = {f"perceiver.{k}": v for k, v in reference.state_dict().items() if k != "media_pos_emb"}
    (tmp_path / "remote" / "tiny-org" / "flamingo").mkdir(parents=True)
    torch.save(state, tmp_path / "remote" / "tiny-org" / "flamingo" / "checkpoint.pt")
    served = _LocalHub(tmp_path / "remote")
    monkeypatch.setattr(hub, "remote_filesystem", lambda: served)
    _zoo_entry(monkeypatch, "tiny_flamingo", resampler_from_state_dict(state, num_heads=2),
               {"hub": "tiny-org/flamingo", "file": "checkpoint.pt"})

    media = np.random.default_rng(1).normal(size=(2, 1, 1, 5, 16)).astype("float32")
    with torch.no_grad():
        expected = reference(torch.from_numpy(media[:, :, 0])).numpy()
    assert np.abs(to_numpy(kp.from_preset("tiny_flamingo")(media)) - expected).max() <= 1e-4
    assert list(served.read) == ["checkpoint.pt"]


def test_export_of_a_preset_with_a_public_original_uses_its_first_use_conversion(tiny, monkeypatch):
    from keras_perceiver.converters import artefacts

    reference, config, entry, tmp_path = tiny
    _write_checkpoint(tmp_path / "remote" / REPO, reference.state_dict(), config)
    monkeypatch.setattr(hub, "remote_filesystem", lambda: _LocalHub(tmp_path / "remote"))
    cached = tmp_path / "kp-cache" / "presets" / PRESET
    assert artefacts.with_original_weights(PRESET) == str(cached) and presets.is_preset_directory(cached)
    assert artefacts.weights_problem(str(cached)) is None
    assert artefacts.with_original_weights(PRESET, random_weights=True) == PRESET  # random weights: no fetch
    assert artefacts.with_original_weights("flamingo_resampler") == "flamingo_resampler"  # nothing public
