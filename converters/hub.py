"""An original checkpoint from the Hugging Face hub, reduced to what its converter reads.

`fetch_checkpoint(repo, into)` leaves in `into` a directory (or file) that `convert_checkpoint`
takes: config.json and, from each safetensors shard, only the tensors the converter needs
(read with range requests, so an Idefics2 connector does not download the language model). A
checkpoint already in the local Hugging Face cache is used where it lies, with no copy.
The hub client is imported only here.
"""

import json
import struct
from pathlib import Path

from keras_perceiver.converters.common import STATE_DICT_SUFFIXES

CHUNK_BYTES = 64 << 20  # one read of a remote file; bounds the memory a copy holds


class CheckpointFetchError(ConnectionError):
    """The hub could not be reached, or does not hold what was asked for."""


def is_hub_id(source):
    """Whether `source` reads as `org/name` or `org/name/file.pt` rather than a local path."""
    text = str(source)
    parts = text.split("/")
    return (
        not Path(text).exists()
        and not text.startswith((".", "/", "~"))
        and len(parts) in (2, 3)
        and all(parts)
        and (len(parts) == 2 or text.endswith(STATE_DICT_SUFFIXES))
    )


def _client():
    try:
        import huggingface_hub
    except ImportError as error:
        raise ImportError("Fetching a checkpoint from the hub needs: pip install 'keras-perceiver[convert]'") from error
    return huggingface_hub


def remote_filesystem():
    """The hub as a file system (range reads); a test replaces it with a local directory."""
    return _client().HfFileSystem()


def _in_local_cache(repo, filename, revision):
    found = _client().try_to_load_from_cache(repo, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _connector_filter(family):
    from keras_perceiver.converters.idefics import is_connector_key

    return lambda key: is_connector_key(key, family)


class _Remote:
    """Reads of one hub repository, each failure named with what was tried."""

    def __init__(self, repo, revision):
        self.repo, self.revision, self.fs = repo, revision, remote_filesystem()
        self.tried = []

    def open(self, filename):
        url = f"hf://{self.repo}@{self.revision}/{filename}"
        self.tried.append(url)
        try:
            return self.fs.open(f"{self.repo}/{filename}", "rb", revision=self.revision)
        except FileNotFoundError:
            raise
        except Exception as error:  # the hub client's network errors have no common base
            raise CheckpointFetchError(
                f"could not fetch {url} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
            ) from None

    def exists(self, filename):
        try:
            self.open(filename).close()
            return True
        except FileNotFoundError:
            return False

    def copy(self, filename, into):
        with self.open(filename) as remote, open(Path(into) / filename, "wb") as local:
            while chunk := remote.read(CHUNK_BYTES):
                local.write(chunk)

    def copy_tensors(self, filename, into, wanted):
        """A safetensors file holding only the tensors whose names pass `wanted`: the header is
        read, then each wanted tensor's byte range; the bytes are copied unchanged."""
        with self.open(filename) as remote:
            (header_size,) = struct.unpack("<Q", remote.read(8))
            header = json.loads(remote.read(header_size))
            start = 8 + header_size
            names = sorted((k for k in header if k != "__metadata__" and wanted(k)), key=lambda k: header[k]["data_offsets"][0])
            layout, offset = {}, 0
            for name in names:
                begin, end = header[name]["data_offsets"]
                layout[name] = dict(header[name], data_offsets=[offset, offset + end - begin])
                offset += end - begin
            text = json.dumps(layout).encode()
            text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
            with open(Path(into) / filename, "wb") as local:
                local.write(struct.pack("<Q", len(text)) + text)
                for name in names:
                    begin, end = header[name]["data_offsets"]
                    remote.seek(start + begin)
                    left = end - begin
                    while left:
                        chunk = remote.read(min(left, CHUNK_BYTES))
                        if not chunk:
                            raise CheckpointFetchError(f"{filename} ended inside tensor {name!r}")
                        local.write(chunk)
                        left -= len(chunk)
        return names


def _local_snapshot(repo, revision, filename=None):
    """The local Hugging Face cache's snapshot directory holding everything the converter of
    `repo` reads, or None when a file is missing there."""
    if filename is not None:
        return _in_local_cache(repo, filename, revision)
    config = _in_local_cache(repo, "config.json", revision)
    if config is None:
        return None
    directory = config.parent
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type in ("idefics", "idefics2"):
        from keras_perceiver.converters.idefics import connector_shards

        index = _in_local_cache(repo, "model.safetensors.index.json", revision)
        if index is not None:
            shards = connector_shards(json.loads(index.read_text())["weight_map"], model_type)
        else:
            shards = ["model.safetensors"]
    else:
        shards = ["model.safetensors"] if _in_local_cache(repo, "model.safetensors", revision) else ["pytorch_model.bin"]
    return directory if all(_in_local_cache(repo, s, revision) for s in shards) else None


def fetch_checkpoint(repo, into, revision="main", filename=None, progress=None):
    """`repo`'s checkpoint, as a local path `convert_checkpoint` reads: the local cache's
    snapshot when it holds everything, else a copy of just what is needed written into the
    directory `into`. `filename` names a state-dict file (OpenFlamingo's checkpoint.pt);
    without it the repository's config.json says which converter applies.
    Raises CheckpointFetchError naming what it tried."""
    say = progress or (lambda line: None)
    local = _local_snapshot(repo, revision, filename)
    if local is not None:
        say(f"using the local Hugging Face cache: {local}")
        return local
    remote = _Remote(repo, revision)
    into = Path(into)
    try:
        if filename is not None:
            say(f"fetching hf://{repo}/{filename}")
            remote.copy(filename, into)
            return into / filename
        remote.copy("config.json", into)
        model_type = json.loads((into / "config.json").read_text()).get("model_type")
        if model_type in ("idefics", "idefics2"):
            from keras_perceiver.converters.idefics import connector_shards

            if remote.exists("model.safetensors.index.json"):
                remote.copy("model.safetensors.index.json", into)
                shards = connector_shards(json.loads((into / "model.safetensors.index.json").read_text())["weight_map"], model_type)
            else:
                shards = ["model.safetensors"]
            for shard in shards:
                names = remote.copy_tensors(shard, into, _connector_filter(model_type))
                say(f"fetched {len(names)} connector tensors from hf://{repo}/{shard}")
            return into
        if model_type != "perceiver":
            raise CheckpointFetchError(
                f"hf://{repo} holds a {model_type!r} model; expected a transformers Perceiver, Idefics or Idefics2 checkpoint"
            )
        weights = "model.safetensors" if remote.exists("model.safetensors") else "pytorch_model.bin"
        say(f"fetching hf://{repo}/{weights}")
        remote.copy(weights, into)
        return into
    except FileNotFoundError:
        raise CheckpointFetchError(f"{remote.tried[-1]} does not exist (tried {', '.join(remote.tried)})") from None
    except (OSError, ValueError, KeyError, struct.error) as error:  # a dropped connection, a file not as named
        raise CheckpointFetchError(
            f"reading {remote.tried[-1]} failed ({type(error).__name__}: {error}); tried {', '.join(remote.tried)}"
        ) from None
