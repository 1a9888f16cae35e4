"""Saving cannot lose data: refused targets stay intact, replacements are whole, kills leave
the old or the new preset, and corrupt weights are caught at load."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import to_numpy

import keras_perceiver as kp
from keras_perceiver import presets
from keras_perceiver.cli import main as cli_main
from keras_perceiver.examples import build_small, example_inputs


def _snapshot(directory):
    """{relative path: bytes} of every file under `directory`."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}


@pytest.fixture
def user_directory(tmp_path, monkeypatch):
    """A working directory holding a user's files, as the current directory."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.npy").write_bytes(b"\x00" * 100)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def small_model():
    return build_small("perceiver_resampler")


@pytest.mark.parametrize("target", [".", "..", "data", "notes.txt"])
def test_overwrite_never_replaces_what_we_did_not_write(user_directory, small_model, target):
    before = _snapshot(user_directory)
    with pytest.raises(ValueError, match="current directory|not written by keras_perceiver"):
        small_model.save_to_preset(target, overwrite=True)
    assert _snapshot(user_directory) == before
    assert sorted(p.name for p in user_directory.iterdir()) == ["data", "notes.txt"]  # no staging left


def test_convert_never_deletes_its_source(user_directory):
    torch = pytest.importorskip("torch")
    import flamingo_pytorch

    torch.manual_seed(0)
    reference = flamingo_pytorch.PerceiverResampler(dim=8, depth=1, dim_head=4, heads=2, num_latents=2)
    torch.save(reference.state_dict(), "ckpt.pt")
    before = _snapshot(user_directory)
    assert cli_main(["convert", "ckpt.pt", ".", "--overwrite", "--num-heads", "2"]) == 2
    assert cli_main(["convert", str(user_directory / "ckpt.pt"), str(user_directory), "--overwrite"]) == 2
    assert _snapshot(user_directory) == before
    assert cli_main(["convert", "ckpt.pt", "converted", "--num-heads", "2"]) == 0
    assert presets.is_preset_directory("converted")


def test_replacing_our_preset_is_whole_with_normal_permissions(tmp_path, small_model):
    inputs = example_inputs(small_model)
    first = small_model.save_to_preset(tmp_path / "preset")
    other = build_small("perceiver_resampler")
    other.set_weights([w * 2 for w in small_model.get_weights()])
    other.save_to_preset(first, overwrite=True)
    np.testing.assert_allclose(to_numpy(kp.from_preset(str(first))(inputs)), to_numpy(other(inputs)), atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["preset"]
    umask = os.umask(0)
    os.umask(umask)
    assert first.stat().st_mode & 0o777 == 0o777 & ~umask  # not tempfile's 0700
    assert (first / "model.weights.h5").stat().st_mode & 0o777 == 0o666 & ~umask


def test_flipped_byte_and_truncation_are_caught_naming_the_file(tmp_path, small_model):
    directory = small_model.save_to_preset(tmp_path / "preset")
    weights = directory / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.weights\.h5' is corrupt or truncated.*SHA-256"):
        kp.from_preset(str(directory))
    weights.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ValueError, match=r"model\.weights\.h5' is corrupt or truncated"):
        kp.from_preset(str(directory))
    # an older preset without a recorded checksum: the truncation still names the file
    metadata = json.loads((directory / "metadata.json").read_text())
    del metadata["sha256"]
    (directory / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"model\.weights\.h5' could not be loaded"):
        kp.from_preset(str(directory))


def test_shipped_weights_are_checked(monkeypatch):
    entries = presets.zoo_entries()
    entries["perceiver_digits"] = dict(entries["perceiver_digits"], weights_sha256="0" * 64)
    monkeypatch.setattr(presets, "zoo_entries", lambda: entries)
    with pytest.raises(ValueError, match="perceiver_digits.weights.h5' is corrupt"):
        kp.from_preset("perceiver_digits")


_SAVER = """
import itertools, sys
from keras_perceiver.examples import build_small
target = sys.argv[1]
models = [build_small("perceiver_resampler", num_latents=n) for n in (8, 9)]
for i in itertools.count():
    models[i % 2].save_to_preset(target, overwrite=True)
    if i == 0:
        print("ready", flush=True)
"""


def test_a_save_killed_at_any_instant_leaves_the_old_or_the_new_preset(tmp_path):
    target = tmp_path / "preset"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    rng = np.random.default_rng(0)
    for attempt in range(4):
        child = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], stdout=subprocess.PIPE, env=env, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.4)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        # whole: loads with its checksum verified, and is one of the two models
        model = kp.from_preset(str(target))
        assert model.config.num_latents in (8, 9)
    build_small("perceiver_resampler").save_to_preset(target, overwrite=True)  # the next save cleans up
    assert [p.name for p in tmp_path.iterdir()] == ["preset"]


def test_the_target_is_whole_between_every_step_of_a_replacement(tmp_path, small_model, monkeypatch):
    """Between any two file-system steps of a replacing save (where a kill would stop it), the
    target holds the old preset or the new one, whole."""
    from keras_perceiver import storage

    target = small_model.save_to_preset(tmp_path / "preset")
    old = _snapshot(target)
    new_model = build_small("perceiver_resampler", num_latents=9)
    seen = []

    def check_whole(step):
        where = target
        if not target.exists():  # the fallback's instant: only the old one, aside, restored at load
            where = next(tmp_path.glob(".preset.kp-old-*"))
        files = _snapshot(where)
        assert set(files) == {"config.json", "model.weights.h5", "metadata.json"}, step
        latents = json.loads(files["config.json"])["config"]["num_latents"]
        assert files == old or latents == 9, step
        seen.append(latents)

    for name in ("rename", "replace"):
        original = getattr(os, name)
        monkeypatch.setattr(storage.os, name, lambda a, b, _f=original, _n=name: (check_whole(_n), _f(a, b))[1])
    for name in ("_exchange", "_remove", "_fsync"):
        original = getattr(storage, name)
        monkeypatch.setattr(storage, name, lambda *a, _f=original, _n=name: (check_whole(_n), _f(*a))[1])
    new_model.save_to_preset(target, overwrite=True)
    check_whole("done")
    assert seen[0] == 8 and seen[-1] == 9
    # the fallback where the file system cannot exchange: old moved aside, then the new one in
    monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
    old, seen[:] = _snapshot(target), []
    build_small("perceiver_resampler", num_latents=9).save_to_preset(target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["preset"]


def test_an_old_preset_moved_aside_by_a_killed_save_is_restored(tmp_path, small_model):
    target = small_model.save_to_preset(tmp_path / "preset")
    aside = tmp_path / ".preset.kp-old-999999999-0000"  # a writer pid that is not running
    target.rename(aside)
    assert kp.from_preset(str(target)).config.num_latents == 8
    assert [p.name for p in tmp_path.iterdir()] == ["preset"]


def test_structural_overrides_need_load_weights_false():
    with pytest.raises(ValueError, match=r"\['num_cross_attention_heads'\] change the architecture.*load_weights=False"):
        kp.from_preset("perceiver_digits", num_cross_attention_heads=2)
    assert kp.from_preset("perceiver_digits", load_weights=False, num_cross_attention_heads=2).config.num_cross_attention_heads == 2
    same = kp.from_preset("perceiver_digits", num_latents=32, name="digits")  # the stored value: allowed
    assert same.name == "digits"


def test_a_zoo_name_that_is_also_a_directory_is_ambiguous(user_directory, small_model):
    small_model.save_to_preset("perceiver_digits")
    with pytest.raises(ValueError, match="both a zoo preset and a path.*'./perceiver_digits'"):
        kp.from_preset("perceiver_digits")
    assert type(kp.from_preset("./perceiver_digits")).__name__ == "PerceiverResampler"


def test_broken_preset_files_get_errors_naming_them(tmp_path, small_model):
    directory = small_model.save_to_preset(tmp_path / "preset")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({"config": config["config"]}))
    with pytest.raises(ValueError, match=r"config\.json' must hold the keys \['class_name', 'config'\]; missing \['class_name'\]"):
        kp.from_preset(str(directory))
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json' is not readable JSON"):
        kp.from_preset(str(directory))
    (directory / "config.json").write_text(json.dumps({"class_name": "os.system", "config": {}}))
    with pytest.raises(ValueError, match="preset class must be one of"):
        kp.from_preset(str(directory))
    with pytest.raises(ValueError, match="received the file"):
        kp.from_preset(str(directory / "metadata.json"))


def test_read_npz_returns_the_arrays_and_refuses_what_is_not_an_npz(tmp_path):
    from keras_perceiver.storage import read_npz

    images, mask = np.arange(6, dtype="float32").reshape(2, 3), np.ones((2, 3), bool)
    np.savez(tmp_path / "good.npz", x=images, mask=mask)
    arrays = read_npz(tmp_path / "good.npz", "--data")
    assert sorted(arrays) == ["mask", "x"]
    np.testing.assert_array_equal(arrays["x"], images)
    np.testing.assert_array_equal(arrays["mask"], mask)

    np.save(tmp_path / "one.npy", images)
    (tmp_path / "text.npz").write_text("not an npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    zipped = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(zipped[: len(zipped) // 2])  # a truncated archive
    expected = "--data: expected an .npz file of arrays; received "
    cases = {
        "missing.npz": ", which does not exist",
        "one.npy": "the array file",
        "text.npz": ", not readable as one",
        "empty.npz": ", not readable as one",
        "cut.npz": ", not readable as one",
    }
    for name, received in cases.items():
        with pytest.raises(ValueError) as refused:
            read_npz(tmp_path / name, "--data")
        message = str(refused.value)
        assert message.startswith(expected) and received in message and name in message, message
    with pytest.raises(ValueError, match=r"^data: expected an \.npz of x and y; received '.*text\.npz', not readable"):
        read_npz(str(tmp_path / "text.npz"), "data", expected="an .npz of x and y")
